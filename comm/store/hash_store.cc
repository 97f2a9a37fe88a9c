// In-process Store: a map under a mutex; waiters sleep on a condition variable.
#include <condition_variable>
#include <map>
#include <mutex>

#include "tessera/comm/store.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

class HashStore final : public Store {
 public:
  void set(const std::string& key, const Bytes& value) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      data_[key] = value;
    }
    changed_.notify_all();
  }

  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    waitLocked(lock, {key}, timeout);
    return data_.at(key);
  }

  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    waitLocked(lock, keys, timeout);
  }

  int64_t add(const std::string& key, int64_t delta) override {
    int64_t value = delta;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = data_.find(key);
      if (it != data_.end()) value += std::stoll(toString(it->second));
      data_[key] = toBytes(std::to_string(value));
    }
    changed_.notify_all();
    return value;
  }

  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override {
    Bytes result;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = data_.find(key);
      if (it == data_.end()) {
        if (!expected.empty()) return expected;
        data_[key] = desired;
        result = desired;
      } else {
        if (it->second == expected) it->second = desired;
        result = it->second;
      }
    }
    changed_.notify_all();
    return result;
  }

  bool deleteKey(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return data_.erase(key) > 0;
  }

  bool check(const std::vector<std::string>& keys) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return allPresentLocked(keys);
  }

  std::string describe() const override { return "hash store (in-process)"; }

 private:
  bool allPresentLocked(const std::vector<std::string>& keys) const {
    for (const auto& key : keys) {
      if (data_.count(key) == 0) return false;
    }
    return true;
  }

  void waitLocked(std::unique_lock<std::mutex>& lock, const std::vector<std::string>& keys,
                  std::chrono::milliseconds timeout) {
    if (changed_.wait_for(lock, timeout, [&] { return allPresentLocked(keys); })) return;
    std::string missing;
    for (const auto& key : keys) {
      if (data_.count(key) == 0) missing += (missing.empty() ? "" : ", ") + key;
    }
    throw TimeoutError("store wait timed out after " + std::to_string(timeout.count()) +
                       " ms on " + describe() + "; missing keys: " + missing);
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, Bytes> data_;
};

}  // namespace

Bytes toBytes(const std::string& text) { return Bytes(text.begin(), text.end()); }
std::string toString(const Bytes& bytes) { return std::string(bytes.begin(), bytes.end()); }

StorePtr makeHashStore() { return std::make_shared<HashStore>(); }

std::string describeMissingKeys(Store& store, const std::vector<std::string>& keys) {
  std::string missing;
  for (const auto& key : keys) {
    bool present = false;
    try {
      present = store.check({key});
    } catch (const std::exception&) {
      present = false;
    }
    if (!present) missing += (missing.empty() ? "" : ", ") + key;
  }
  return missing.empty() ? "(none)" : missing;
}

}  // namespace tessera::comm
