// Private: lets Gloo's rendezvous (gloo::rendezvous::Store) run over any
// tessera Store, with tessera's timeouts and error messages.
#pragma once

#include <gloo/rendezvous/store.h>

#include "tessera/comm/store.h"
#include "tessera/comm/types.h"

namespace tessera::comm::detail {

class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(StorePtr store, Timeout timeout) : store_(std::move(store)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;

 private:
  StorePtr store_;
  Timeout timeout_;
};

}  // namespace tessera::comm::detail
