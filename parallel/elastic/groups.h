// Group formation of the elastic mesh (private): the node's local group here;
// the elastic global groups are ElasticMesh::formGroup/dropGroup (groups.cc).
// Both go through comm::makeStoreGroup, never a backend directly.
#pragma once

#include <atomic>
#include <functional>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel::elastic {

// The local group: the node's processes, under the store prefix
// "elastic/node/<member>" (the member id is fresh per incarnation, so a
// restarted node never meets its predecessor's keys), named "node<slot>" in
// errors. Collective over the node's processes. Throws TimeoutError naming the
// local ranks that did not arrive, StoreError when the store is unreachable.
// The store an elastic group is formed over, with two ways to stop waiting
// for a member that is known dead:
//   forming  wait() and get() poll base->check() every kPoll and, between
//            polls, call giveUpIf(false), which throws (CommError, naming
//            why) to abandon the rendezvous;
//   formed() the group keeps this store only for the diagnosis of a failed
//            collective, which waits up to a few seconds for every rank's
//            report: check() calls giveUpIf(true) first, whose throw ends
//            that wait (the diagnosis then says why instead of waiting for
//            a dead rank's report);
//   disarm() plain forwarding.
// Everything else forwards to `base`. Thread-safe as `base` is; giveUpIf
// runs on the waiting thread (the training thread while forming, the
// group's operation thread in a diagnosis: never both at once).
class WatchfulStore final : public comm::Store {
 public:
  WatchfulStore(comm::StorePtr base, std::function<void(bool formed)> giveUpIf);
  void formed() { mode_ = kFormed; }
  void disarm() { mode_ = kDisarmed; }

  void set(const std::string& key, const comm::Bytes& value) override { base_->set(key, value); }
  comm::Bytes get(const std::string& key, std::chrono::milliseconds timeout) override;
  // TimeoutError names the missing keys, like every store's.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override { return base_->add(key, delta); }
  comm::Bytes compareSet(const std::string& key, const comm::Bytes& expected, const comm::Bytes& desired) override {
    return base_->compareSet(key, expected, desired);
  }
  bool deleteKey(const std::string& key) override { return base_->deleteKey(key); }
  bool check(const std::vector<std::string>& keys) override;
  std::string describe() const override { return base_->describe(); }
  using comm::Store::get;
  using comm::Store::wait;

 private:
  enum Mode { kForming, kFormed, kDisarmed };
  comm::StorePtr base_;
  std::function<void(bool)> giveUpIf_;
  std::atomic<Mode> mode_{kForming};
};

comm::CommPtr makeLocalGroup(const comm::StorePtr& store, const ElasticIdentity& identity,
                             const ElasticConfig& config);

}  // namespace tessera::parallel::elastic
