// Group formation of the elastic mesh: the node's local group (fixed for the
// node's life) and the elastic global group of local rank l, re-formed under
// the store prefix "elastic/e<epoch>/l<l>" whenever a decision changes the
// epoch. Gloo is the backend: the groups carry CPU tensors (DiLoCo's
// pseudo-gradients) between nodes.
//
// A formation waits for every member of the decision; one that died meanwhile
// never comes. Instead of waiting out the formation timeout, the rendezvous
// runs over a WatchfulStore whose waits poll and, between polls, give up as
// soon as a member of the decision is dead in this node's monitor (a dead
// mark, a vanished lease, a confirmed suspicion or a heartbeat timeout) or
// another process gave up on this epoch ("elastic/e<epoch>/abandon"; the
// processes without a monitor, local ranks > 0, read the dead and left marks
// themselves and learn of the rest through this key). The one
// window this cannot cover: a member that dies after publishing its address
// and before its peers connected to it (milliseconds) is still waited for
// in Gloo's connect, up to the formation timeout.
// Once formed, the same store cuts short the diagnosis of a failed collective
// (which otherwise waits seconds for every rank's report, a dead one's too):
// it raises the suspicion (heartbeat_monitor.h) at once and stops the wait
// when a member is dead.
#include "parallel/elastic/groups.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>

#include "parallel/elastic/heartbeat_monitor.h"
#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/comm/store_group.h"
#include "tessera/core/logging.h"

namespace tessera::parallel {
namespace elastic {

WatchfulStore::WatchfulStore(comm::StorePtr base, std::function<void(bool)> giveUpIf)
    : base_(std::move(base)), giveUpIf_(std::move(giveUpIf)) {}

comm::Bytes WatchfulStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  if (mode_ != kForming) return base_->get(key, timeout);
  wait({key}, timeout);
  return base_->get(key, timeout);
}

void WatchfulStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  if (mode_ != kForming) return base_->wait(keys, timeout);
  const auto deadline = Clock::now() + timeout;
  while (!base_->check(keys)) {
    if (mode_ == kForming) giveUpIf_(false);
    if (Clock::now() >= deadline) {
      throw TimeoutError("waited " + std::to_string(timeout.count()) + " ms on " + base_->describe() + " for " +
                         comm::describeMissingKeys(*base_, keys));
    }
    std::this_thread::sleep_for(kPoll);
  }
}

bool WatchfulStore::check(const std::vector<std::string>& keys) {
  if (mode_ == kFormed) giveUpIf_(true);
  return base_->check(keys);
}

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
  const std::string epoch = "elastic/e" + std::to_string(decision.epoch);
  const std::string prefix = epoch + "/l" + std::to_string(identity_.localRank);
  const std::string abandonKey = epoch + "/abandon";
  std::vector<std::string> others;
  for (const auto& m : decision.members) {
    if (m != me_) others.push_back(m);
  }
  if (monitor_) monitor_->watch(others);
  // Dead marks live in the job's store, unprefixed (elastic.h); processes
  // without a monitor (local ranks > 0) read them there directly.
  const comm::StorePtr marks = jobStore_ ? jobStore_ : store_;
  // Asked between the rendezvous' polls, and before the diagnosis of a failed
  // collective reads the store (see WatchfulStore); throws to stop waiting.
  auto giveUpIf = [this, others, abandonKey, marks, epochNumber = decision.epoch, suspected = false,
                   lastLook = elastic::Clock::now() - std::chrono::seconds(1)](bool formed) mutable {
    if (formed && monitor_ && !suspected) {
      // A collective of this group failed: its peers are suspects (heartbeat_monitor.h).
      suspected = true;
      monitor_->suspectPeers("a collective of the elastic group of epoch " + std::to_string(epochNumber) + " failed");
    }
    if (elastic::Clock::now() - lastLook < std::chrono::milliseconds(50)) return;
    lastLook = elastic::Clock::now();
    std::string why;
    if (monitor_) {
      monitor_->refresh(others);
      for (const auto& m : others) {
        if (auto death = monitor_->death(m)) {
          why = "member " + m + " is dead (" + death->cause + ")";
          break;
        }
      }
    } else {
      for (const auto& m : others) {
        if (marks->check({elastic::deadKey(m)}) || marks->check({elastic::leftKey(m)})) {
          why = "member " + m + " is dead (dead or left mark)";
          break;
        }
      }
    }
    if (formed) {
      if (!why.empty()) throw CommError(why + ": not waiting for its rank's report");
      return;
    }
    if (!why.empty()) {
      try {
        store_->compareSet(abandonKey, {}, comm::toBytes(why));
      } catch (const Error&) {  // telling the others is best effort; the timeout still bounds them
      }
    } else if (store_->check({abandonKey})) {
      why = store_->getString(abandonKey, elastic::kPoll * 50);
    }
    if (!why.empty()) {
      throw CommError("forming the elastic group of epoch " + std::to_string(epochNumber) + " abandoned: " + why);
    }
  };
  auto watchful = std::make_shared<elastic::WatchfulStore>(store_, giveUpIf);
  comm::GroupOptions options;
  options.backend = "gloo";
  options.hostname = identity_.advertiseHost;
  // Members read the decision within milliseconds of each other, so forming
  // the group takes well under a second; a member that does not show up is
  // dead (or cut off) and will be declared so by its heartbeat: waiting
  // longer than that only delays the retry.
  options.timeout = elastic::ms(std::min(config_.collective_timeout_s, config_.heartbeat_timeout_s + 2.0));
  options.operationTimeout = elastic::ms(config_.collective_timeout_s);
  const auto begin = elastic::Clock::now();
  auto event = [&](bool ok, const std::string& error) {
    nlohmann::json j{{"event", "group"},       {"epoch", decision.epoch},
                     {"outer_step", decision.outerStep}, {"attempt", decision.attempt},
                     {"members", decision.members.size()}, {"ok", ok},
                     {"seconds", elastic::secondsSince(begin)}, {"time_s", elastic::unixSeconds()}};
    if (!ok) j["error"] = error;
    emit(j.dump());
  };
  comm::CommPtr group;
  try {
    group = comm::makeStoreGroup(watchful, prefix, decision.indexOf(me_), static_cast<int>(decision.members.size()),
                                 options);
  } catch (const std::exception& e) {
    watchful->disarm();
    event(false, e.what());
    throw;
  }
  watchful->formed();
  event(true, "");
  group_ = wrapGroup ? wrapGroup(group) : group;
  groupEpoch_ = decision.epoch;
}

}  // namespace tessera::parallel
