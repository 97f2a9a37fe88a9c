// PrefixStore: a namespace inside another store, so that each group (and each
// re-formed elastic group) rendezvous under its own keys.
#include "tessera/comm/store.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

class PrefixStore final : public Store {
 public:
  PrefixStore(std::string prefix, StorePtr base) : prefix_(std::move(prefix) + "/"), base_(std::move(base)) {
    TESSERA_CHECK_ARG(base_ != nullptr, "PrefixStore needs a base store");
  }

  void set(const std::string& key, const Bytes& value) override { base_->set(prefix_ + key, value); }
  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override {
    return base_->get(prefix_ + key, timeout);
  }
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    base_->wait(prefixed(keys), timeout);
  }
  int64_t add(const std::string& key, int64_t delta) override { return base_->add(prefix_ + key, delta); }
  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override {
    return base_->compareSet(prefix_ + key, expected, desired);
  }
  bool deleteKey(const std::string& key) override { return base_->deleteKey(prefix_ + key); }
  bool check(const std::vector<std::string>& keys) override { return base_->check(prefixed(keys)); }
  std::string describe() const override { return base_->describe() + " under '" + prefix_ + "'"; }
  bool supportsLeases() const override { return base_->supportsLeases(); }
  int64_t grantLease(std::chrono::milliseconds ttl) override { return base_->grantLease(ttl); }
  void keepAlive(int64_t lease) override { base_->keepAlive(lease); }
  void revokeLease(int64_t lease) override { base_->revokeLease(lease); }
  void setWithLease(const std::string& key, const Bytes& value, int64_t lease) override {
    base_->setWithLease(prefix_ + key, value, lease);
  }

 private:
  std::vector<std::string> prefixed(const std::vector<std::string>& keys) const {
    std::vector<std::string> out;
    out.reserve(keys.size());
    for (const auto& key : keys) out.push_back(prefix_ + key);
    return out;
  }

  std::string prefix_;
  StorePtr base_;
};

}  // namespace

StorePtr makePrefixStore(std::string prefix, StorePtr base) {
  return std::make_shared<PrefixStore>(std::move(prefix), std::move(base));
}

}  // namespace tessera::comm
