// Group formation of the elastic mesh: the node's local group (fixed for the
// node's life) and the elastic global group of local rank l, re-formed under
// the store prefix "elastic/e<epoch>/l<l>" whenever a decision changes the
// epoch. Gloo is the backend: the groups carry CPU tensors (DiLoCo's
// pseudo-gradients) between nodes.
#include "parallel/elastic/groups.h"

#include <algorithm>

#include "parallel/elastic/timing.h"
#include "tessera/comm/store_group.h"

namespace tessera::parallel {
namespace elastic {

comm::CommPtr makeLocalGroup(const comm::StorePtr& store, const ElasticIdentity& identity,
                             const ElasticConfig& config) {
  comm::GroupOptions options;
  options.backend = "gloo";
  options.name = "node" + std::to_string(identity.slot);
  options.hostname = identity.advertiseHost;
  options.timeout = ms(std::max(60.0, config.collective_timeout_s));
  return comm::makeStoreGroup(store, "elastic/node/" + identity.memberId(), identity.localRank, identity.localSize,
                              options);
}

}  // namespace elastic

uint64_t ElasticMesh::bytesSent() const {
  return retiredBytes_ + (group_ ? group_->stats().totalBytesSent() : 0);
}

double ElasticMesh::secondsInGroups() const {
  return retiredSeconds_ + (group_ ? group_->stats().totalSeconds() : 0.0);
}

void ElasticMesh::dropGroup() {
  if (group_) {
    retiredBytes_ += group_->stats().totalBytesSent();
    retiredSeconds_ += group_->stats().totalSeconds();
  }
  group_.reset();
  groupEpoch_ = -1;
}

void ElasticMesh::formGroup(const Membership& decision) {
  dropGroup();
  const std::string prefix =
      "elastic/e" + std::to_string(decision.epoch) + "/l" + std::to_string(identity_.localRank);
  comm::GroupOptions options;
  options.backend = "gloo";
  options.hostname = identity_.advertiseHost;
  // Members read the decision within milliseconds of each other, so forming
  // the group takes well under a second; a member that does not show up is
  // dead (or cut off) and will be declared so by its heartbeat: waiting
  // longer than that only delays the retry.
  options.timeout = elastic::ms(std::min(config_.collective_timeout_s, config_.heartbeat_timeout_s + 2.0));
  options.operationTimeout = elastic::ms(config_.collective_timeout_s);
  comm::CommPtr group = comm::makeStoreGroup(store_, prefix, decision.indexOf(me_),
                                             static_cast<int>(decision.members.size()), options);
  group_ = wrapGroup ? wrapGroup(group) : group;
  groupEpoch_ = decision.epoch;
}

}  // namespace tessera::parallel
