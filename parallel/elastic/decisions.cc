// The decision protocol of the elastic mesh (see elastic.h's file comment):
// the founders' start decision, each outer step's decision (arrive, the
// leader decides with compareSet, everyone reads it back) and the commit vote
// after an attempt. The store is the only authority: every decision and
// outcome is written once (compareSet) and read back by everyone, so two
// nodes that both believe they lead still agree.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "parallel/elastic/heartbeat_monitor.h"
#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/core/logging.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel {
namespace {

using elastic::Clock;
using elastic::contains;
using elastic::joinList;
using elastic::secondsSince;

// Rides out an unreachable store (the tessera store restarting, etcd without
// quorum) for elastic.store_outage_timeout_s, then stops the job naming the
// cause: nothing waits forever on a store that does not come back. One per
// protocol loop: begin() before each round of store calls, ok() after a
// round that reached the store, failed() from its StoreError handler.
class StoreOutage {
 public:
  StoreOutage(const ElasticConfig& config, std::string what) : limit_(config.store_outage_timeout_s), what_(std::move(what)) {}
  void begin() { roundStart_ = Clock::now(); }
  void ok() { since_.reset(); }
  // Throws StoreError once the store has been unreachable for the limit.
  void failed(const StoreError& e) {
    if (!since_) since_ = roundStart_;
    const double lasted = secondsSince(*since_);
    if (lasted < limit_) {
      TESSERA_LOG(kWarn) << what_ << ": store unreachable for " << static_cast<int>(lasted) << " s, riding it out (up to "
                         << limit_ << " s, elastic.store_outage_timeout_s): " << e.what();
      return;
    }
    throw StoreError(what_ + ": the store has been unreachable for " + std::to_string(static_cast<int>(lasted)) +
                     " s, beyond elastic.store_outage_timeout_s = " + std::to_string(limit_) +
                     " s; the job stops (restart it when the store is back: nodes resume from the latest "
                     "checkpoint or a live peer). Last error: " + e.what());
  }

 private:
  double limit_;
  std::string what_;
  Clock::time_point roundStart_ = Clock::now();
  std::optional<Clock::time_point> since_;
};

// --- The start ---

struct Registrations {
  std::vector<std::string> latest;  // newest incarnation of each registered slot, ascending slot
  int64_t cursor = 0;               // registrations read ("elastic/join/<n>", n < cursor)
};

// Reads "elastic/join/<n>" in order up to the first one still being written.
// A restarted slot registers again: its newest incarnation counts.
Registrations readRegistrations(comm::Store& store) {
  const int64_t count = store.add("elastic/join/count", 0);
  std::map<int, std::string> latestBySlot;
  Registrations out;
  for (int64_t n = 0; n < count; ++n) {
    const std::string key = "elastic/join/" + std::to_string(n);
    if (!store.check({key})) break;
    const std::string id = store.getString(key);
    out.cursor = n + 1;
    auto& slot = latestBySlot[slotOf(id)];
    if (slot.empty() || elastic::memberLess(slot, id)) slot = id;
  }
  for (const auto& [slot, id] : latestBySlot) out.latest.push_back(id);
  return out;
}

// The founders: the live registered nodes (sorted), at most maxNodes (0: no
// limit). Registrations beyond max_nodes stay unhandled (the join cursor
// stops at the first one left out): later decisions admit them when there is
// room.
Membership startDecision(comm::Store& store, const std::vector<std::string>& alive, int64_t cursor, int maxNodes) {
  Membership d;
  d.epoch = 1;
  d.outerStep = -1;
  d.members = alive;
  if (maxNodes > 0 && static_cast<int>(d.members.size()) > maxNodes) d.members.resize(maxNodes);
  d.joinCursor = cursor;
  for (int64_t n = 0; n < cursor; ++n) {
    const std::string id = store.getString("elastic/join/" + std::to_string(n));
    if (!contains(d.members, id) && contains(alive, id)) {
      d.joinCursor = n;
      break;
    }
  }
  return d;
}

// --- One outer step ---

// Whom the decision is about: the last decision's members, pending joiners and
// admitted joiners, in member order.
std::vector<std::string> candidatesOf(const Membership& prev) {
  std::vector<std::string> candidates = prev.members;
  for (const auto& p : prev.pending) {
    if (!contains(candidates, p)) candidates.push_back(p);
  }
  for (const auto& [joiner, source] : prev.joiners) {
    if (!contains(candidates, joiner)) candidates.push_back(joiner);
  }
  elastic::sortMembers(candidates);
  return candidates;
}

// Who may lead, in order: the live members of the last decision (a joiner
// never leads: it may still be receiving its state), or every live candidate
// when none of those is alive.
std::vector<std::string> leaderOrder(const std::vector<std::string>& alive, const Membership& prev) {
  std::vector<std::string> leaders;
  for (const auto& c : alive) {
    if (contains(prev.members, c)) leaders.push_back(c);
  }
  return leaders.empty() ? alive : leaders;
}

// The members of `alive` that marked themselves arrived at round `base`, in
// order; *waiting: at least one did not.
std::vector<std::string> arrivals(comm::Store& store, const std::string& base, const std::vector<std::string>& alive,
                                  bool* waiting) {
  std::vector<std::string> arrived;
  *waiting = false;
  for (const auto& c : alive) {
    if (store.check({base + "/arrived/" + c})) {
      arrived.push_back(c);
    } else {
      *waiting = true;
    }
  }
  return arrived;
}

// A late round's leader: the first choice if it arrived, else the first
// candidate that did. `leaders` is not empty.
std::string lateLeader(const std::vector<std::string>& leaders, const std::vector<std::string>& arrived) {
  if (contains(arrived, leaders.front())) return leaders.front();
  for (const auto& c : leaders) {
    if (contains(arrived, c)) return c;
  }
  return leaders.front();
}

// New registrations from prev.joinCursor on, oldest first, while there is
// room next to `members` nodes (max_nodes). Advances *cursor past every
// registration handled (admitted, superseded, already known or dead); one
// left for lack of room stays unhandled, so it is admitted when a node leaves.
std::vector<std::string> admitJoiners(comm::Store& store, elastic::HeartbeatMonitor& monitor, int maxNodes,
                                      const std::vector<std::string>& candidates, size_t members, int64_t* cursor) {
  const int64_t count = store.add("elastic/join/count", 0);
  std::vector<std::string> admitted;
  for (int64_t n = *cursor; n < count; ++n) {
    const std::string key = "elastic/join/" + std::to_string(n);
    if (!store.check({key})) {
      // A registration being written -- or one whose writer died between
      // taking the number and writing it: skipped once a later one exists.
      if (n + 1 < count && store.check({"elastic/join/" + std::to_string(n + 1)})) {
        *cursor = n + 1;
        continue;
      }
      break;
    }
    const std::string id = store.getString(key);
    // A slot that registered again (restarted) supersedes its older incarnations.
    bool superseded = false;
    for (int64_t later = n + 1; later < count && !superseded; ++later) {
      const std::string laterKey = "elastic/join/" + std::to_string(later);
      superseded = store.check({laterKey}) && slotOf(store.getString(laterKey)) == slotOf(id);
    }
    if (superseded) {
      *cursor = n + 1;
      continue;
    }
    monitor.watch({id});
    const bool known = contains(candidates, id);
    const bool room = maxNodes == 0 || static_cast<int>(members + admitted.size()) < maxNodes;
    if (!known && monitor.alive(id)) {
      if (!room) break;  // admitted later, when a node leaves
      admitted.push_back(id);
    }
    *cursor = n + 1;
  }
  return admitted;
}

// The stop reason of a decision with `total` nodes below min_nodes.
std::string belowMinStop(const Membership& d, int total, int64_t outerStep, const ElasticConfig& config) {
  std::ostringstream why;
  why << "only " << total << " node(s) " << joinList(d.members) << " alive at outer step " << outerStep
      << ", below min_nodes = " << config.min_nodes << ", after waiting " << config.wait_timeout_s
      << " s (lost: " << joinList(d.dropped) << "); the job stops: start more nodes in time, or lower MIN in "
      << "tessera-run --nnodes MIN:MAX";
  return why.str();
}

// The "decision" event line of a decision this node published (elastic.h's
// event list): who was dropped and, for those its monitor holds dead, why and
// since when (Unix seconds): the detection part of a recovery.
std::string decisionEvent(const Membership& d, elastic::HeartbeatMonitor& monitor, const std::string& leader,
                          double waitedSeconds) {
  nlohmann::json dead = nlohmann::json::array();
  for (const auto& m : d.dropped) {
    if (auto death = monitor.death(m)) dead.push_back({{"member", m}, {"cause", death->cause}, {"seen_s", death->unix}});
  }
  std::vector<std::string> joined;
  for (const auto& [joiner, source] : d.joiners) joined.push_back(joiner);
  return nlohmann::json{{"event", "decision"}, {"outer_step", d.outerStep}, {"attempt", d.attempt},
                        {"epoch", d.epoch},    {"leader", leader},         {"members", d.members},
                        {"joined", joined},    {"dropped", d.dropped},     {"dead", dead},
                        {"waited_s", waitedSeconds}, {"time_s", elastic::unixSeconds()}}
      .dump();
}

}  // namespace

Membership ElasticMesh::decideStart() {
  const std::string key = "elastic/start/decision";
  const auto start = Clock::now();
  bool enough = false;  // min_nodes registered since enoughSince
  Clock::time_point enoughSince = start;
  StoreOutage outage(config_, "elastic start");
  while (true) {
    outage.begin();
    try {
      if (store_->check({key})) return Membership::fromJson(store_->getString(key));
      if (identity_.localRank == 0) {
        const Registrations registrations = readRegistrations(*store_);
        monitor_->watch(registrations.latest);
        std::vector<std::string> alive;
        for (const auto& id : registrations.latest) {
          if (monitor_->alive(id)) alive.push_back(id);
        }
        elastic::sortMembers(alive);
        if (static_cast<int>(alive.size()) >= config_.min_nodes) {
          if (!enough) enoughSince = Clock::now();
          enough = true;
          const bool full = config_.max_nodes > 0 && static_cast<int>(alive.size()) >= config_.max_nodes;
          if ((full || secondsSince(enoughSince) >= config_.start_grace_s) && alive.front() == me_) {
            const Membership d = startDecision(*store_, alive, registrations.cursor, config_.max_nodes);
            store_->compareSet(key, {}, comm::toBytes(d.toJson()));
            continue;  // read back through the loop
          }
        } else {
          enough = false;
        }
      }
      outage.ok();
    } catch (const StoreError& e) {
      outage.failed(e);
    }
    if (secondsSince(start) > config_.join_timeout_s) {
      throw TimeoutError("elastic start: fewer than min_nodes = " + std::to_string(config_.min_nodes) +
                         " nodes registered within join_timeout_s = " + std::to_string(config_.join_timeout_s) +
                         " s; start more nodes (tessera-run --nnodes MIN:MAX) or lower the minimum");
    }
    std::this_thread::sleep_for(elastic::kPoll);
  }
}

std::optional<Membership> ElasticMesh::tryDecide(const std::string& base, int64_t outerStep, int attempt) {
  const Membership& prev = committed_;
  const std::vector<std::string> candidates = candidatesOf(prev);
  monitor_->watch(candidates);
  std::vector<std::string> alive;
  for (const auto& c : candidates) {
    if (monitor_->alive(c)) alive.push_back(c);
  }
  // A leader that is alive but does not arrive within wait_timeout (hung, or
  // far behind) loses the role to the first member that did arrive. Nodes
  // that cannot lead stop here, before any store traffic.
  const std::vector<std::string> leaders = leaderOrder(alive, prev);
  const bool late = secondsSince(roundStart_) >= config_.wait_timeout_s;
  const bool firstChoice = leaders.empty() || leaders.front() == me_;
  if (!firstChoice && !late) {
    // The nodes ahead in line: a launcher's dead mark makes this node lead at once.
    monitor_->refresh(std::vector<std::string>(leaders.begin(), std::find(leaders.begin(), leaders.end(), me_)));
    return std::nullopt;
  }
  bool waiting = false;
  const std::vector<std::string> arrived = arrivals(*store_, base, alive, &waiting);
  if (!firstChoice && lateLeader(leaders, arrived) != me_) return std::nullopt;
  if (waiting && !late) {
    // React at once to a dead mark (or a vanished lease) of a node waited for.
    std::vector<std::string> missing;
    for (const auto& c : alive) {
      if (!contains(arrived, c)) missing.push_back(c);
    }
    monitor_->refresh(missing);
    return std::nullopt;
  }

  Membership d;
  d.outerStep = outerStep;
  d.attempt = attempt;
  d.members = arrived;
  for (const auto& c : candidates) {
    if (!contains(arrived, c)) d.dropped.push_back(c);
  }
  d.joinCursor = prev.joinCursor;
  const std::vector<std::string> joinerIds =
      admitJoiners(*store_, *monitor_, config_.max_nodes, candidates, d.members.size(), &d.joinCursor);
  const int total = static_cast<int>(d.members.size() + joinerIds.size());
  if (total < config_.min_nodes) {
    if (!belowMinSince_) {
      belowMinSince_ = Clock::now();
      TESSERA_LOG(kWarn) << "only " << total << " of min_nodes = " << config_.min_nodes
                         << " nodes alive at outer step " << outerStep << "; waiting up to " << config_.wait_timeout_s
                         << " s for nodes to join";
    }
    if (secondsSince(*belowMinSince_) < config_.wait_timeout_s) return std::nullopt;
    d.stop = belowMinStop(d, total, outerStep, config_);
  }
  const bool sameGroup = d.members == prev.members && attempt == 0 && prev.outerStep >= 0;
  // Every attempt that re-forms gets an epoch never used before (its store
  // prefix must be fresh): attempts of one step build on the same committed
  // decision, so they count up from it.
  d.epoch = prev.epoch + (sameGroup ? 0 : 1 + attempt);
  // Sources round-robin over the members.
  for (size_t i = 0; i < joinerIds.size(); ++i) {
    d.joiners.emplace_back(joinerIds[i], d.members.empty() ? me_ : d.members[i % d.members.size()]);
  }
  const std::string mine = d.toJson();
  store_->compareSet(base + "/decision", {}, comm::toBytes(mine));
  const std::string published = store_->getString(base + "/decision");
  // This node's decision won: say what it saw, for the recovery breakdown
  // (only where something changed, so a steady job logs nothing extra).
  if (published == mine && (!d.dropped.empty() || !d.joiners.empty() || attempt > 0)) {
    emit(decisionEvent(d, *monitor_, me_, secondsSince(roundStart_)));
  }
  return Membership::fromJson(published);
}

Membership ElasticMesh::decide(int64_t outerStep, int attempt) {
  const std::string base = "elastic/round/" + std::to_string(outerStep) + "/" + std::to_string(attempt);
  roundStart_ = Clock::now();
  belowMinSince_.reset();
  const double bound = 2 * config_.wait_timeout_s + config_.heartbeat_timeout_s + 10;
  bool announced = false;
  StoreOutage outage(config_, "outer step " + std::to_string(outerStep));
  while (true) {
    if (!announced) leaveIfRequested();  // once arrived, this step is seen through
    outage.begin();
    try {
      if (!announced && identity_.localRank == 0) {
        store_->setString(base + "/arrived/" + me_, "1");
        announced = true;
      }
      if (store_->check({base + "/decision"})) {
        Membership d = Membership::fromJson(store_->getString(base + "/decision"));
        if (!d.stop.empty()) throw Error("the elastic job stopped: " + d.stop);
        if (!contains(d.members, me_)) {
          throw Evicted("node " + me_ + " was dropped from the job at outer step " + std::to_string(outerStep) +
                        " (members now " + joinList(d.members) + "); it must rejoin with fresh state");
        }
        return d;
      }
      if (identity_.localRank == 0 && announced) {
        if (auto d = tryDecide(base, outerStep, attempt)) continue;  // read back through the loop
      }
      outage.ok();
    } catch (const StoreError& e) {
      outage.failed(e);
    }
    if (secondsSince(roundStart_) > bound) {
      throw TimeoutError("no membership decision for outer step " + std::to_string(outerStep) + " within " +
                         std::to_string(static_cast<int>(bound)) + " s (the leader is the first alive of " +
                         joinList(committed_.members) + "; is the store at " + store_->describe() +
                         " reachable?)");
    }
    std::this_thread::sleep_for(elastic::kPoll);
  }
}

bool ElasticMesh::vote(const Membership& decision, bool ok) {
  const std::string base =
      "elastic/round/" + std::to_string(decision.outerStep) + "/" + std::to_string(decision.attempt);
  const auto begin = Clock::now();
  const double bound = config_.collective_timeout_s + config_.heartbeat_timeout_s + 5;
  bool voted = false;
  StoreOutage outage(config_, "outer step " + std::to_string(decision.outerStep) + " vote");
  // This process's collective failed: its peers are suspects (heartbeat_monitor.h).
  if (!ok && monitor_) monitor_->suspectPeers("outer step " + std::to_string(decision.outerStep) + " attempt " +
                                              std::to_string(decision.attempt + 1));
  while (true) {
    outage.begin();
    try {
      if (!voted) {
        store_->setString(base + "/vote/" + me_ + "/l" + std::to_string(identity_.localRank), ok ? "ok" : "fail");
        voted = true;
      }
      if (store_->check({base + "/outcome"})) return store_->getString(base + "/outcome") == "commit";
      if (identity_.localRank == 0) {
        bool anyFail = false, complete = true;
        std::vector<std::string> missing;  // alive, some vote not in yet
        for (const auto& m : decision.members) {
          const bool alive = monitor_->alive(m);
          for (int l = 0; l < identity_.localSize; ++l) {
            const std::string key = base + "/vote/" + m + "/l" + std::to_string(l);
            if (store_->check({key})) {
              if (store_->getString(key) != "ok") anyFail = true;
            } else if (alive) {
              complete = false;
              if (!contains(missing, m)) missing.push_back(m);
            }
          }
        }
        if (!anyFail && !complete) monitor_->refresh(missing);  // a dead mark ends the wait at once
        const bool late = secondsSince(begin) > bound;
        if (anyFail || complete || late) {
          // A member that died after the all-reduce completed everywhere else
          // does not spoil the step: the survivors hold the same values.
          const std::string outcome = !anyFail && complete ? "commit" : "retry";
          store_->compareSet(base + "/outcome", {}, comm::toBytes(outcome));
          continue;
        }
      }
      outage.ok();
    } catch (const StoreError& e) {
      outage.failed(e);
    }
    if (secondsSince(begin) > 2 * bound) {
      throw TimeoutError("no commit/retry outcome for outer step " + std::to_string(decision.outerStep) +
                         " within " + std::to_string(static_cast<int>(2 * bound)) + " s");
    }
    std::this_thread::sleep_for(elastic::kPoll);
  }
}

}  // namespace tessera::parallel
