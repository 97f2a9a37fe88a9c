// In-process Store: a map under a mutex; waiters sleep on a condition variable.
// Leases expire lazily: every call first drops the keys of expired leases.
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>

#include "tessera/comm/store.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

class HashStore final : public Store {
 public:
  void set(const std::string& key, const Bytes& value) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      purgeExpiredLocked();
      unbindLocked(key);
      data_[key] = value;
    }
    changed_.notify_all();
  }

  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    purgeExpiredLocked();
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
      purgeExpiredLocked();
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
      purgeExpiredLocked();
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
    purgeExpiredLocked();
    unbindLocked(key);
    return data_.erase(key) > 0;
  }

  bool check(const std::vector<std::string>& keys) override {
    std::lock_guard<std::mutex> lock(mutex_);
    purgeExpiredLocked();
    return allPresentLocked(keys);
  }

  std::string describe() const override { return "hash store (in-process)"; }

  bool supportsLeases() const override { return true; }

  int64_t grantLease(std::chrono::milliseconds ttl) override {
    TESSERA_CHECK_ARG(ttl.count() > 0, "grantLease: the ttl must be positive");
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = nextLease_++;
    leases_[id] = Lease{ttl, std::chrono::steady_clock::now() + ttl, {}};
    return id;
  }

  void keepAlive(int64_t lease) override {
    std::lock_guard<std::mutex> lock(mutex_);
    purgeExpiredLocked();
    auto it = leases_.find(lease);
    if (it == leases_.end()) {
      throw StoreError("lease " + std::to_string(lease) + " on " + describe() +
                       " has expired or was revoked; its keys are gone");
    }
    it->second.deadline = std::chrono::steady_clock::now() + it->second.ttl;
  }

  void revokeLease(int64_t lease) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = leases_.find(lease);
    if (it == leases_.end()) return;
    for (const std::string& key : it->second.keys) data_.erase(key);
    leases_.erase(it);
  }

  void setWithLease(const std::string& key, const Bytes& value, int64_t lease) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      purgeExpiredLocked();
      auto it = leases_.find(lease);
      if (it == leases_.end()) {
        throw StoreError("setWithLease(" + key + "): lease " + std::to_string(lease) + " on " + describe() +
                         " has expired or was revoked");
      }
      unbindLocked(key);
      it->second.keys.insert(key);
      data_[key] = value;
    }
    changed_.notify_all();
  }

 private:
  struct Lease {
    std::chrono::milliseconds ttl;
    std::chrono::steady_clock::time_point deadline;
    std::set<std::string> keys;
  };

  void purgeExpiredLocked() {
    const auto now = std::chrono::steady_clock::now();
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (it->second.deadline > now) {
        ++it;
        continue;
      }
      for (const std::string& key : it->second.keys) data_.erase(key);
      it = leases_.erase(it);
    }
  }

  // A key written again without a lease (or with another) leaves its old lease.
  void unbindLocked(const std::string& key) {
    for (auto& [id, lease] : leases_) lease.keys.erase(key);
  }

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
  std::map<int64_t, Lease> leases_;
  int64_t nextLease_ = 1;
};

}  // namespace

Bytes toBytes(const std::string& text) { return Bytes(text.begin(), text.end()); }
std::string toString(const Bytes& bytes) { return std::string(bytes.begin(), bytes.end()); }

StorePtr makeHashStore() { return std::make_shared<HashStore>(); }

int64_t Store::grantLease(std::chrono::milliseconds) {
  throw InvalidArgument(describe() + " has no leases (supportsLeases() is false); keep a heartbeat counter instead");
}
void Store::keepAlive(int64_t) { grantLease(std::chrono::milliseconds(1)); }
void Store::revokeLease(int64_t) { grantLease(std::chrono::milliseconds(1)); }
void Store::setWithLease(const std::string&, const Bytes&, int64_t) { grantLease(std::chrono::milliseconds(1)); }

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
