// Joining the elastic job: a founder is part of the start decision; a joiner
// waits to be admitted at an outer step and for its source to publish the
// recovery record "elastic/recovery/<joiner>/l<l>" (JSON: source, address of
// the source's StateSender, outer step, the admitting decision), which
// publishRecoverySource writes on the source's side.
//
// Generations (elastic.h's file comment): a joiner that finds every candidate
// of its generation's last decision dead re-founds the job in generation
// G + 1. The store's compareSet on "elastic/generation" is the only
// authority: two restarted nodes racing to re-found both read back the one
// value that won, so they meet in the same generation. Each generation's
// records live under their own prefix, so a new start decision, rounds from
// outer step 1 again and fresh epochs never meet the old generation's.
#include <nlohmann/json.hpp>

#include <thread>

#include "parallel/elastic/heartbeat_monitor.h"
#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/core/logging.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel {
namespace {

using Json = nlohmann::json;

constexpr const char* kGenerationKey = "elastic/generation";
// Written by the members when training reached its last step: a node that
// comes later stops (LeftJob) instead of re-founding a finished job.
constexpr const char* kFinishedKey = "elastic/finished";

std::string recoveryKey(const std::string& joiner, int localRank) {
  return "elastic/recovery/" + joiner + "/l" + std::to_string(localRank);
}

// Where local rank 0 tells its node's other processes which generation the
// node is in (in the job's store, unprefixed: member ids are unique).
std::string nodeGenerationKey(const std::string& member) { return "elastic/nodegen/" + member; }

int64_t parseGeneration(const std::string& text, const std::string& key) {
  try {
    size_t used = 0;
    const long long g = std::stoll(text, &used);
    if (used == text.size() && g >= 0) return g;
  } catch (const std::exception&) {
  }
  throw Error("bad generation record \"" + key + "\" = \"" + text + "\" in the store (a whole number >= 0 expected)");
}

// The job's current generation (0 when none was ever founded again).
int64_t readGeneration(comm::Store& store) {
  return store.check({kGenerationKey}) ? parseGeneration(store.getString(kGenerationKey), kGenerationKey) : 0;
}

}  // namespace

void ElasticMesh::enterGeneration(int64_t generation) {
  if (generation == generation_) return;
  generation_ = generation;
  store_ = generation == 0 ? jobStore_ : comm::makePrefixStore("g" + std::to_string(generation), jobStore_);
  committed_ = Membership{};
  dropGroup();
  if (identity_.localRank == 0) {
    // The constructor registered in generation 0's records: register again here.
    const int64_t index = store_->add("elastic/join/count", 1) - 1;
    store_->setString("elastic/join/" + std::to_string(index), me_);
    TESSERA_LOG(kInfo) << "node " << me_ << " registered with generation " << generation << " of the elastic job";
  }
}

int64_t ElasticMesh::agreedGeneration() {
  const std::string key = nodeGenerationKey(me_);
  if (identity_.localRank == 0) {
    const int64_t g = readGeneration(*jobStore_);
    jobStore_->setString(key, std::to_string(g));
    return g;
  }
  return parseGeneration(jobStore_->getString(key, elastic::ms(config_.join_timeout_s)), key);
}

bool ElasticMesh::generationSuperseded() {
  if (!jobStore_) return false;  // before join(): nothing to be superseded in
  return readGeneration(*jobStore_) > generation_;
}

bool ElasticMesh::generationAbandoned() {
  std::string text;
  if (store_->check({"elastic/membership"})) {
    text = store_->getString("elastic/membership");
  } else if (store_->check({"elastic/start/decision"})) {
    text = store_->getString("elastic/start/decision");
  } else {
    return false;  // still starting
  }
  const Membership last = Membership::fromJson(text);
  // Whoever the decision is about: its members, and the joiners admitted
  // earlier or by it (one of them may have become a member since).
  std::vector<std::string> candidates;
  auto add = [&](const std::string& m) {
    if (m != me_ && !elastic::contains(candidates, m)) candidates.push_back(m);
  };
  for (const auto& m : last.members) add(m);
  for (const auto& m : last.pending) add(m);
  for (const auto& [joiner, source] : last.joiners) add(joiner);
  if (candidates.empty()) return false;
  // First sight counts as a sign of life: a candidate is dead here only
  // after a heartbeat timeout of silence (or at once, once it left or was
  // marked dead).
  monitor_->watch(candidates);
  for (const auto& c : candidates) {
    if (monitor_->alive(c)) return false;
  }
  return true;
}

std::optional<int64_t> ElasticMesh::newerGeneration() {
  if (identity_.localRank != 0) {
    const std::string key = nodeGenerationKey(me_);
    const int64_t g = parseGeneration(jobStore_->getString(key, elastic::ms(config_.join_timeout_s)), key);
    return g > generation_ ? std::optional<int64_t>(g) : std::nullopt;
  }
  int64_t g = readGeneration(*jobStore_);
  if (g <= generation_ && generationAbandoned()) {
    const comm::Bytes expected = generation_ == 0 ? comm::Bytes{} : comm::toBytes(std::to_string(generation_));
    const std::string now =
        comm::toString(jobStore_->compareSet(kGenerationKey, expected, comm::toBytes(std::to_string(generation_ + 1))));
    g = parseGeneration(now, kGenerationKey);
    TESSERA_LOG(kWarn) << "no node of generation " << generation_ << " of the elastic job is alive (each silent for "
                       << config_.heartbeat_timeout_s << " s, left or dead): the job starts again as generation " << g
                       << (g == generation_ + 1 ? " (founded by this node)" : " (founded by another node)");
  }
  if (g <= generation_) return std::nullopt;
  jobStore_->setString(nodeGenerationKey(me_), std::to_string(g));
  return g;
}

// A joiner admitted with a source that died before publishing its sender
// would wait for it until join_timeout_s, and the leader for the joiner
// until wait_timeout_s. Instead it leaves at once (so the leader drops it
// without waiting) and rejoins as a new incarnation. The admitting decision
// is the one the leader recorded in "elastic/membership".
void ElasticMesh::throwIfSourceDied() {
  if (!store_->check({"elastic/membership"})) return;
  const Membership latest = Membership::fromJson(store_->getString("elastic/membership"));
  for (const auto& [joiner, source] : latest.joiners) {
    if (joiner != me_) continue;
    monitor_->watch({source});
    monitor_->refresh({source});
    if (monitor_->alive(source)) return;
    monitor_->announceLeave();
    throw Evicted("node " + me_ + " was admitted at outer step " + std::to_string(latest.outerStep) +
                  " with source " + source + ", which died before sending the state; rejoining");
  }
}

std::optional<RecoveryTicket> ElasticMesh::waitForAdmission() {
  // A joiner: wait to be admitted and for the source to publish its sender.
  const std::string key = recoveryKey(me_, identity_.localRank);
  TESSERA_LOG(kInfo) << "node " << me_ << " joins a running job: waiting for the next outer step";
  const auto begin = elastic::Clock::now();
  while (true) {
    leaveIfRequested();
    try {
      if (store_->check({key})) {
        const Json j = Json::parse(store_->getString(key));
        RecoveryTicket ticket;
        ticket.source = j.at("source").get<std::string>();
        ticket.address = j.at("address").get<std::string>();
        ticket.outerStep = j.at("outer_step").get<int64_t>();
        ticket.decision = Membership::fromJson(j.at("decision").get<std::string>());
        return ticket;
      }
      if (monitor_) throwIfSourceDied();
      if (store_->check({kFinishedKey})) {
        throw LeftJob("the elastic job already finished (at step " + store_->getString(kFinishedKey) +
                      "): nothing to join; start a new job (another --rdzv-id or a fresh store) to train again");
      }
      if (const auto next = newerGeneration()) {
        enterGeneration(*next);
        return std::nullopt;
      }
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "waiting for admission: store error, retrying: " << e.what();
    } catch (const Json::exception& e) {
      throw Error(std::string("bad recovery record in the store: ") + e.what());
    }
    if (elastic::secondsSince(begin) > config_.join_timeout_s) {
      throw TimeoutError("node " + me_ + " was not admitted with a state source within join_timeout_s = " +
                         std::to_string(config_.join_timeout_s) + " s (is the job past its last outer step, or at max_nodes?)");
    }
    std::this_thread::sleep_for(elastic::kPoll * 5);
  }
}

std::optional<RecoveryTicket> ElasticMesh::join() {
  if (!jobStore_) jobStore_ = store_;
  enterGeneration(agreedGeneration());
  while (true) {
    const Membership start = decideStart();
    if (!start.stop.empty()) throw Error("the elastic job stopped: " + start.stop);
    if (elastic::contains(start.members, me_)) {
      committed_ = start;
      if (identity_.localRank == 0) {
        store_->compareSet("elastic/membership", {}, comm::toBytes(start.toJson()));
        emit(elastic::membershipEvent(start));
        TESSERA_LOG(kInfo) << "elastic job started with nodes " << elastic::joinList(start.members)
                           << (generation_ > 0 ? " (generation " + std::to_string(generation_) + ")" : "");
      }
      return std::nullopt;
    }
    if (auto ticket = waitForAdmission()) return ticket;
    // Moved to a newer generation: its start protocol runs from the top.
  }
}

void ElasticMesh::finished(int64_t step) {
  if (identity_.localRank != 0) return;
  try {
    store_->compareSet(kFinishedKey, {}, comm::toBytes(std::to_string(step)));
  } catch (const Error& e) {  // a late joiner then re-founds instead of stopping: not worth failing the run
    TESSERA_LOG(kWarn) << "could not record the end of the job in the store: " << e.what();
  }
}

void ElasticMesh::recovered(const RecoveryTicket& ticket) {
  committed_ = ticket.decision;
  dropGroup();
}

std::vector<std::string> ElasticMesh::joinersToServe() const {
  std::vector<std::string> out;
  for (const auto& [joiner, source] : committed_.joiners) {
    if (source == me_) out.push_back(joiner);
  }
  return out;
}

void ElasticMesh::publishRecoverySource(const std::string& member, const std::string& address) {
  Json j{{"source", me_},
         {"address", address},
         {"outer_step", committed_.outerStep},
         {"decision", committed_.toJson()}};
  store_->setString(recoveryKey(member, identity_.localRank), j.dump());
}

}  // namespace tessera::parallel
