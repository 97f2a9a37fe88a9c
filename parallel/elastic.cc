// ElasticMesh: a node's life in the elastic job (connect, register, leave) and
// the outer step's all-reduce (decide, form the group, all-reduce, vote,
// commit or retry). The protocol is described in elastic.h; its parts live in
// parallel/elastic/ by idea:
//   membership.cc         the records: config checks, identity, member ids, decision JSON
//   heartbeat_monitor.cc  who is alive (the heartbeat thread)
//   decisions.cc          the start decision, each outer step's decision, the commit vote
//   join.cc               founders and joiners; the recovery record
//   groups.cc             the local group and the elastic groups (via comm::makeStoreGroup)
#include "tessera/parallel/elastic.h"

#include <nlohmann/json.hpp>

#include <algorithm>

#include "parallel/elastic/groups.h"
#include "parallel/elastic/heartbeat_monitor.h"
#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/logging.h"

namespace tessera::parallel {
namespace {

using elastic::joinList;
using elastic::ms;

// The store's client timeouts: a wait as long as the longest protocol wait,
// and a request no longer than a heartbeat timeout (a slow store must not make
// the observer blind for longer than it takes to declare a node dead).
comm::StorePtr connectStore(const ElasticIdentity& identity, const std::string& secret, const ElasticConfig& config) {
  const auto [host, port] = comm::net::parseHostPort(identity.storeAddress, "TESSERA_STORE_ADDR");
  comm::StoreClientOptions options;
  options.host = host;
  options.port = port;
  options.secret = secret;
  options.timeout = ms(std::max(30.0, config.wait_timeout_s));
  options.requestTimeout = ms(std::max(2.0, config.heartbeat_timeout_s));
  return comm::makeStoreClient(options);
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

Membership ElasticMesh::averageAcrossNodes(at::Tensor flat, int64_t outerStep) {
  const at::Tensor original = flat.clone();
  std::string lastError;
  for (int attempt = 0; attempt < config_.max_retries; ++attempt) {
    if (attempt > 0) flat.copy_(original);
    const Membership d = decide(outerStep, attempt);
    bool ok = true;
    try {
      if (!group_ || groupEpoch_ != d.epoch) formGroup(d);
      if (flat.numel() > 0) comm::allReduceCompressed(*group_, flat, comm::ReduceOp::kAvg, compression_);
    } catch (const std::exception& e) {  // tessera's errors and libtorch's alike: every failure must vote
      ok = false;
      lastError = e.what();
      // Dropping the group closes its sockets, so peers blocked on this
      // process fail now instead of at their timeout.
      dropGroup();
      TESSERA_LOG(kWarn) << "outer step " << outerStep << " attempt " << attempt + 1 << " failed: " << lastError;
    }
    const bool commit = vote(d, ok);
    if (commit && !ok) {
      throw Evicted("outer step " + std::to_string(outerStep) + " committed without this node's result (" + lastError +
                    "); rejoining with fresh state");
    }
    if (commit) {
      const bool changed = d.epoch != committed_.epoch || !d.joiners.empty() || !d.dropped.empty();
      committed_ = d;
      if (changed && identity_.localRank == 0) {
        std::vector<std::string> joined;
        for (const auto& [joiner, source] : d.joiners) joined.push_back(joiner);
        if (d.members.front() == me_) {
          try {
            store_->setString("elastic/membership", d.toJson());
          } catch (const Error&) {  // reporting only
          }
        }
        emit(elastic::membershipEvent(d));
        TESSERA_LOG(kInfo) << "outer step " << outerStep << ": epoch " << d.epoch << ", nodes " << joinList(d.members)
                           << (joined.empty() ? "" : ", admitted " + joinList(joined))
                           << (d.dropped.empty() ? "" : ", dropped " + joinList(d.dropped));
      }
      lastAttempts_ = attempt + 1;
      return d;
    }
    dropGroup();
    emit(nlohmann::json{{"event", "retry"}, {"outer_step", outerStep}, {"attempt", attempt + 1},
                        {"error", ok ? "another node failed" : lastError}, {"time_s", elastic::unixSeconds()}}
             .dump());
  }
  throw CommError("outer step " + std::to_string(outerStep) + " failed in all " + std::to_string(config_.max_retries) +
                  " attempts (elastic.max_retries); last error: " + lastError);
}

}  // namespace tessera::parallel
