// ElasticMesh: a node's life in the elastic job (connect, register, leave).
// The protocol is described in elastic.h; its parts live in parallel/elastic/
// by idea:
//   membership.cc         the records: config checks, identity, member ids, decision JSON
//   heartbeat_monitor.cc  who is alive (the heartbeat thread)
//   decisions.cc          the start decision, each outer step's decision, the commit vote
//   join.cc               founders and joiners; the recovery record
//   groups.cc             the local group and the elastic groups (via comm::makeStoreGroup)
//   collective.cc         one sync across the nodes (decide, form the group, run the
//                         optimizer's collective, vote, commit or retry); averageAcrossNodes
#include "tessera/parallel/elastic.h"

#include <algorithm>

#include "parallel/elastic/groups.h"
#include "parallel/elastic/heartbeat_monitor.h"
#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/comm/net.h"
#include "tessera/comm/rendezvous.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/logging.h"

namespace tessera::parallel {
namespace {

using elastic::ms;

// The job's store (comm/rendezvous.h; the launcher's TESSERA_RDZV_* win over
// [elastic] rdzv_*). Timeouts: connecting (and riding out an outage) bounded
// by store_outage_timeout_s, and a request no longer than a heartbeat timeout
// (a slow store must not make the observer blind for longer than it takes to
// declare a node dead).
comm::StorePtr connectStore(const ElasticIdentity& identity, const std::string& secret, const ElasticConfig& config) {
  const ElasticIdentity id = identity.resolved(config);
  comm::RendezvousOptions options;
  options.backend = id.backend;
  options.endpoints = id.endpoints;
  options.runId = id.runId;
  options.secret = secret;
  if (id.backend == "etcd" && !id.etcdUser.empty()) {
    TESSERA_CHECK_ARG(!id.etcdPasswordFile.empty(), "elastic mode: TESSERA_ETCD_USER=" << id.etcdUser
                                                        << " without TESSERA_ETCD_PASSWORD_FILE (the file holding "
                                                           "its etcd password)");
    options.user = id.etcdUser;
    // Same rules as the join secret's file: trailing newline dropped, empty refused.
    options.password = comm::net::loadJoinSecretFile(id.etcdPasswordFile);
  }
  options.timeout = ms(config.store_outage_timeout_s);
  options.requestTimeout = ms(std::max(2.0, config.heartbeat_timeout_s));
  return comm::connectRendezvousStore(options);
}

}  // namespace

ElasticMesh::ElasticMesh(ElasticIdentity identity, ElasticConfig config, comm::Compression compression)
    : identity_(std::move(identity)), config_(config), compression_(compression) {
  if (identity_.minNodes > config_.min_nodes) config_.min_nodes = identity_.minNodes;
  if (config_.max_nodes == 0) config_.max_nodes = identity_.maxNodes;
  config_.validate();  // with tessera-run's MIN:MAX applied
  me_ = identity_.memberId();
  secret_ = comm::net::loadJoinSecret();
  store_ = connectStore(identity_, secret_, config_);
  local_ = elastic::makeLocalGroup(store_, identity_, config_);
  if (identity_.localRank == 0) {
    monitor_ = std::make_unique<Monitor>(connectStore(identity_, secret_, config_), me_, config_);
    const int64_t index = store_->add("elastic/join/count", 1) - 1;
    store_->setString("elastic/join/" + std::to_string(index), me_);
    TESSERA_LOG(kInfo) << "node " << me_ << " registered with the elastic job at " << store_->describe();
  }
}

ElasticMesh::~ElasticMesh() = default;

void ElasticMesh::emit(const std::string& jsonLine) {
  if (identity_.localRank == 0 && onEvent) onEvent(jsonLine);
}

void ElasticMesh::leave() {
  leaveRequested_ = true;
  if (announcedLeave_.exchange(true)) return;
  if (monitor_) monitor_->announceLeave();
  TESSERA_LOG(kInfo) << "node " << me_ << " leaves the job";
}

void ElasticMesh::leaveIfRequested() {
  if (!leaveRequested_.load()) return;
  leave();
  throw LeftJob("node " + me_ + " left the job (SIGTERM)");
}

}  // namespace tessera::parallel
