// Private: adapts a libtorch c10d::Store (TCPStore, FileStore) to tessera's
// Store, turning libtorch's exceptions into TimeoutError/StoreError that name
// the store and the missing keys.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "tessera/comm/store.h"

namespace tessera::comm::detail {

class C10dStore {
 public:
  C10dStore(c10::intrusive_ptr<c10d::Store> store, std::string description)
      : store_(std::move(store)), description_(std::move(description)) {}

  void set(const std::string& key, const Bytes& value);
  Bytes get(const std::string& key, std::chrono::milliseconds timeout);
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  int64_t add(const std::string& key, int64_t delta);
  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired);
  bool deleteKey(const std::string& key);
  bool check(const std::vector<std::string>& keys);
  const std::string& describe() const { return description_; }

 private:
  [[noreturn]] void rethrow(const char* operation, const std::string& key, const std::exception& error) const;

  c10::intrusive_ptr<c10d::Store> store_;
  std::string description_;
};

}  // namespace tessera::comm::detail
