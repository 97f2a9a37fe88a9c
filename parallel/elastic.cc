#include "tessera/parallel/elastic.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "tessera/comm/gloo.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/config.h"
#include "tessera/core/logging.h"

namespace tessera::parallel {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

constexpr auto kPoll = std::chrono::milliseconds(20);

std::chrono::milliseconds ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

double secondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Members ordered by (slot, incarnation): the leader is the first alive one.
bool memberLess(const std::string& a, const std::string& b) {
  const int sa = slotOf(a), sb = slotOf(b);
  if (sa != sb) return sa < sb;
  return std::atoi(a.c_str() + a.find('.') + 1) < std::atoi(b.c_str() + b.find('.') + 1);
}

void sortMembers(std::vector<std::string>& members) { std::sort(members.begin(), members.end(), memberLess); }

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

std::string joinList(const std::vector<std::string>& list) {
  std::string out;
  for (const auto& item : list) out += (out.empty() ? "" : ", ") + item;
  return "[" + out + "]";
}

int envInt(const char* name, int fallback, bool required) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    TESSERA_CHECK_ARG(!required, "elastic mode: " << name << " is not set (start workers with tessera-run --nnodes MIN:MAX)");
    return fallback;
  }
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TESSERA_CHECK_ARG(end != value && *end == '\0' && parsed >= 0 && parsed < (1L << 30),
                    "elastic mode: " << name << "=\"" << value << "\" is not a whole number >= 0");
  return static_cast<int>(parsed);
}

std::string envString(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::string(value) : fallback;
}

}  // namespace

// ---------------------------------------------------------------------------
// Config, identity, decisions

void ElasticConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(heartbeat_interval_s > 0, prefix + "heartbeat_interval_s", "must be > 0, got " << heartbeat_interval_s);
  TESSERA_CHECK_CONFIG(heartbeat_timeout_s >= 2 * heartbeat_interval_s, prefix + "heartbeat_timeout_s",
                       "must be at least twice heartbeat_interval_s (" << heartbeat_interval_s << "), got "
                                                                       << heartbeat_timeout_s);
  TESSERA_CHECK_CONFIG(min_nodes >= 1, prefix + "min_nodes", "must be >= 1, got " << min_nodes);
  TESSERA_CHECK_CONFIG(max_nodes == 0 || max_nodes >= min_nodes, prefix + "max_nodes",
                       "must be 0 (no limit) or >= min_nodes (" << min_nodes << "), got " << max_nodes);
  TESSERA_CHECK_CONFIG(wait_timeout_s > 0, prefix + "wait_timeout_s", "must be > 0, got " << wait_timeout_s);
  TESSERA_CHECK_CONFIG(collective_timeout_s > 0, prefix + "collective_timeout_s",
                       "must be > 0, got " << collective_timeout_s);
  TESSERA_CHECK_CONFIG(max_retries >= 1, prefix + "max_retries", "must be >= 1, got " << max_retries);
  TESSERA_CHECK_CONFIG(join_timeout_s > 0, prefix + "join_timeout_s", "must be > 0, got " << join_timeout_s);
  TESSERA_CHECK_CONFIG(start_grace_s >= 0, prefix + "start_grace_s", "must be >= 0, got " << start_grace_s);
}

std::string ElasticIdentity::memberId() const { return std::to_string(slot) + "." + std::to_string(incarnation); }

ElasticIdentity ElasticIdentity::fromEnv() {
  ElasticIdentity id;
  id.slot = envInt("TESSERA_NODE_SLOT", 0, true);
  id.incarnation = envInt("TESSERA_NODE_INCARNATION", 0, false);
  id.localRank = envInt("LOCAL_RANK", 0, false);
  id.localSize = std::max(1, envInt("LOCAL_WORLD_SIZE", 1, false));
  TESSERA_CHECK_ARG(id.localRank < id.localSize,
                    "elastic mode: LOCAL_RANK " << id.localRank << " >= LOCAL_WORLD_SIZE " << id.localSize);
  const std::string nnodes = envString("TESSERA_NNODES", "1:0");
  const size_t colon = nnodes.find(':');
  try {
    id.minNodes = std::stoi(nnodes.substr(0, colon));
    id.maxNodes = colon == std::string::npos ? id.minNodes : std::stoi(nnodes.substr(colon + 1));
  } catch (const std::exception&) {
    throw InvalidArgument("elastic mode: TESSERA_NNODES=\"" + nnodes + "\" is not MIN:MAX (e.g. 2:4)");
  }
  id.storeAddress = envString("TESSERA_STORE_ADDR", "");
  TESSERA_CHECK_ARG(!id.storeAddress.empty(),
                    "elastic mode: TESSERA_STORE_ADDR is not set (host:port of a tessera-store, set by tessera-run)");
  id.advertiseHost = envString("TESSERA_ADVERTISE_HOST", "127.0.0.1");
  return id;
}

int slotOf(const std::string& member) {
  const size_t dot = member.find('.');
  TESSERA_CHECK_ARG(dot != std::string::npos && dot > 0, "bad elastic member id \"" << member << "\" (want slot.incarnation)");
  return std::atoi(member.substr(0, dot).c_str());
}

std::string Membership::toJson() const {
  Json j;
  j["epoch"] = epoch;
  j["outer_step"] = outerStep;
  j["attempt"] = attempt;
  j["members"] = members;
  Json joined = Json::array();
  for (const auto& [joiner, source] : joiners) joined.push_back({{"member", joiner}, {"source", source}});
  j["joiners"] = joined;
  j["pending"] = pending;
  j["dropped"] = dropped;
  j["join_cursor"] = joinCursor;
  if (!stop.empty()) j["stop"] = stop;
  return j.dump();
}

Membership Membership::fromJson(const std::string& text) {
  try {
    const Json j = Json::parse(text);
    Membership m;
    m.epoch = j.at("epoch").get<int64_t>();
    m.outerStep = j.at("outer_step").get<int64_t>();
    m.attempt = j.at("attempt").get<int>();
    m.members = j.at("members").get<std::vector<std::string>>();
    for (const auto& joiner : j.at("joiners")) {
      m.joiners.emplace_back(joiner.at("member").get<std::string>(), joiner.at("source").get<std::string>());
    }
    m.pending = j.at("pending").get<std::vector<std::string>>();
    m.dropped = j.at("dropped").get<std::vector<std::string>>();
    m.joinCursor = j.at("join_cursor").get<int64_t>();
    if (j.contains("stop")) m.stop = j.at("stop").get<std::string>();
    return m;
  } catch (const Json::exception& e) {
    throw InvalidArgument(std::string("elastic membership record is not valid: ") + e.what());
  }
}

int Membership::indexOf(const std::string& member) const {
  const auto it = std::find(members.begin(), members.end(), member);
  return it == members.end() ? -1 : static_cast<int>(it - members.begin());
}

// ---------------------------------------------------------------------------
// Heartbeats: this node's counter goes up every interval; the others' are
// watched, and a counter that has not moved for heartbeat_timeout (by this
// process's clock) means its node is dead. Runs on its own store client so a
// main thread blocked elsewhere never stops the heartbeat.

struct ElasticMesh::Monitor {
  Monitor(comm::StorePtr store, std::string me, const ElasticConfig& config)
      : store_(std::move(store)), me_(std::move(me)), interval_(ms(config.heartbeat_interval_s)),
        timeout_(ms(config.heartbeat_timeout_s)) {
    beat();
    thread_ = std::thread([this] { loop(); });
  }
  ~Monitor() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  // Start watching these members (first sight counts as a sign of life).
  void watch(const std::vector<std::string>& members) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& m : members) {
      if (m != me_ && !watched_.count(m)) watched_[m] = Seen{-1, Clock::now(), false};
    }
  }
  bool alive(const std::string& member) {
    if (member == me_) return true;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = watched_.find(member);
    if (it == watched_.end()) return true;  // not watched yet: no evidence either way
    if (it->second.left) return false;
    if (blind_) return true;                // the store is unreachable: no evidence either way
    return Clock::now() - it->second.changed < timeout_;
  }
  // Why a member is considered dead (for events and errors).
  std::string reason(const std::string& member) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = watched_.find(member);
    if (it == watched_.end()) return "unknown";
    if (it->second.left) return "left";
    return "no heartbeat for " + std::to_string(secondsSince(it->second.changed)).substr(0, 4) + " s";
  }
  void announceLeave() {
    try {
      store_->setString("elastic/left/" + me_, "1");
    } catch (const Error& e) {
      TESSERA_LOG(kWarn) << "could not announce the leave: " << e.what();
    }
  }
  bool storeReachable() const { return reachable_.load(); }

 private:
  struct Seen {
    int64_t counter;
    Clock::time_point changed;
    bool left;
  };

  void beat() {
    try {
      store_->add("elastic/hb/" + me_, 1);
      reachable_ = true;
    } catch (const Error& e) {
      if (reachable_.exchange(false)) {
        TESSERA_LOG(kWarn) << "heartbeat: store unreachable: " << e.what();
      }
    }
  }

  void observe() {
    std::vector<std::string> members;
    {
      // A member that left, or has been silent for three timeouts, stays
      // dead (a restarted node comes back under a new incarnation id): no
      // need to keep polling it. An outage resets every age (below), so
      // nobody is written off because of it.
      std::lock_guard<std::mutex> lock(mutex_);
      const auto now = Clock::now();
      for (const auto& [m, seen] : watched_) {
        if (!seen.left && now - seen.changed < 3 * timeout_) members.push_back(m);
      }
    }
    for (const auto& m : members) {
      int64_t counter = 0;
      bool left = false;
      try {
        counter = store_->add("elastic/hb/" + m, 0);
        left = store_->check({"elastic/left/" + m});
      } catch (const Error&) {
        std::lock_guard<std::mutex> lock(mutex_);
        blind_ = true;  // no news is not evidence of death (see alive())
        return;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (blind_) {
        // The first view after an outage: every counter's age restarts now,
        // or the outage itself would make every other node look dead.
        for (auto& [id, s] : watched_) s.changed = Clock::now();
        blind_ = false;
      }
      Seen& seen = watched_[m];
      if (counter != seen.counter) {
        seen.counter = counter;
        seen.changed = Clock::now();
      }
      seen.left = left;
    }
  }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      lock.unlock();
      beat();
      observe();
      lock.lock();
      wake_.wait_for(lock, std::min(interval_, std::chrono::milliseconds(500)), [this] { return stopping_; });
      // Observe every 500 ms at least (a fast view of deaths), beat every interval.
      if (!stopping_ && interval_ > std::chrono::milliseconds(500)) {
        const auto until = Clock::now() + interval_ - std::chrono::milliseconds(500);
        while (!stopping_ && Clock::now() < until) {
          lock.unlock();
          observe();
          lock.lock();
          wake_.wait_for(lock, std::chrono::milliseconds(500), [this] { return stopping_; });
        }
      }
    }
  }

  comm::StorePtr store_;
  std::string me_;
  std::chrono::milliseconds interval_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::atomic<bool> reachable_{true};
  bool blind_ = false;  // the last observation failed (guarded by mutex_)
  std::map<std::string, Seen> watched_;
  std::thread thread_;
};

// ---------------------------------------------------------------------------

namespace {

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
  comm::GlooOptions local;
  local.name = "node" + std::to_string(identity_.slot);
  local.hostname = identity_.advertiseHost;
  local.timeout = ms(std::max(60.0, config_.collective_timeout_s));
  local_ = comm::makeGlooCommunicator(store_, "elastic/node/" + me_, identity_.localRank, identity_.localSize, local);
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

// --- Start: the founders' decision --------------------------------------------

Membership ElasticMesh::decideStart() {
  const std::string key = "elastic/start/decision";
  const auto start = Clock::now();
  bool enough = false;  // min_nodes registered since enoughSince
  Clock::time_point enoughSince = start;
  while (true) {
    try {
      if (store_->check({key})) return Membership::fromJson(store_->getString(key));
      if (identity_.localRank == 0) {
        const int64_t count = store_->add("elastic/join/count", 0);
        std::map<int, std::string> latestBySlot;  // a restarted slot registers again: its newest incarnation counts
        int64_t cursor = 0;
        for (int64_t n = 0; n < count; ++n) {
          const std::string k = "elastic/join/" + std::to_string(n);
          if (!store_->check({k})) break;
          const std::string id = store_->getString(k);
          cursor = n + 1;
          auto& slot = latestBySlot[slotOf(id)];
          if (slot.empty() || memberLess(slot, id)) slot = id;
        }
        std::vector<std::string> registered;
        for (const auto& [slot, id] : latestBySlot) registered.push_back(id);
        monitor_->watch(registered);
        std::vector<std::string> alive;
        for (const auto& id : registered) {
          if (monitor_->alive(id)) alive.push_back(id);
        }
        sortMembers(alive);
        if (static_cast<int>(alive.size()) >= config_.min_nodes) {
          if (!enough) enoughSince = Clock::now();
          enough = true;
          const bool full = config_.max_nodes > 0 && static_cast<int>(alive.size()) >= config_.max_nodes;
          if ((full || secondsSince(enoughSince) >= config_.start_grace_s) && alive.front() == me_) {
            Membership d;
            d.epoch = 1;
            d.outerStep = -1;
            d.members = alive;
            if (config_.max_nodes > 0 && static_cast<int>(d.members.size()) > config_.max_nodes) {
              d.members.resize(config_.max_nodes);
            }
            // Registrations beyond max_nodes stay unhandled: later decisions admit them when there is room.
            d.joinCursor = cursor;
            for (int64_t n = 0; n < cursor; ++n) {
              const std::string id = store_->getString("elastic/join/" + std::to_string(n));
              if (!contains(d.members, id) && contains(alive, id)) {
                d.joinCursor = n;
                break;
              }
            }
            store_->compareSet(key, {}, comm::toBytes(d.toJson()));
            continue;
          }
        } else {
          enough = false;
        }
      }
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "elastic start: store error, retrying: " << e.what();
    }
    if (secondsSince(start) > config_.join_timeout_s) {
      throw TimeoutError("elastic start: fewer than min_nodes = " + std::to_string(config_.min_nodes) +
                         " nodes registered within join_timeout_s = " + std::to_string(config_.join_timeout_s) +
                         " s; start more nodes (tessera-run --nnodes MIN:MAX) or lower the minimum");
    }
    std::this_thread::sleep_for(kPoll);
  }
}

std::optional<RecoveryTicket> ElasticMesh::join() {
  const Membership start = decideStart();
  if (!start.stop.empty()) throw Error("the elastic job stopped: " + start.stop);
  if (contains(start.members, me_)) {
    committed_ = start;
    if (identity_.localRank == 0) {
      store_->compareSet("elastic/membership", {}, comm::toBytes(start.toJson()));
      emit(Json{{"event", "membership"}, {"epoch", start.epoch}, {"outer_step", start.outerStep},
                {"members", start.members}, {"joined", std::vector<std::string>{}},
                {"dropped", std::vector<std::string>{}}, {"time_s", unixSeconds()}}
               .dump());
      TESSERA_LOG(kInfo) << "elastic job started with nodes " << joinList(start.members);
    }
    return std::nullopt;
  }
  // A joiner: wait to be admitted and for the source to publish its sender.
  const std::string key = "elastic/recovery/" + me_ + "/l" + std::to_string(identity_.localRank);
  TESSERA_LOG(kInfo) << "node " << me_ << " joins a running job: waiting for the next outer step";
  const auto begin = Clock::now();
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
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "waiting for admission: store error, retrying: " << e.what();
    } catch (const Json::exception& e) {
      throw Error(std::string("bad recovery record in the store: ") + e.what());
    }
    if (secondsSince(begin) > config_.join_timeout_s) {
      throw TimeoutError("node " + me_ + " was not admitted with a state source within join_timeout_s = " +
                         std::to_string(config_.join_timeout_s) + " s (is the job past its last outer step, or at max_nodes?)");
    }
    std::this_thread::sleep_for(kPoll * 5);
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
  store_->setString("elastic/recovery/" + member + "/l" + std::to_string(identity_.localRank), j.dump());
}

// --- One outer step's decision -----------------------------------------------

std::optional<Membership> ElasticMesh::tryDecide(const std::string& base, int64_t outerStep, int attempt) {
  const Membership& prev = committed_;
  std::vector<std::string> candidates = prev.members;
  for (const auto& p : prev.pending) {
    if (!contains(candidates, p)) candidates.push_back(p);
  }
  for (const auto& [joiner, source] : prev.joiners) {
    if (!contains(candidates, joiner)) candidates.push_back(joiner);
  }
  sortMembers(candidates);
  monitor_->watch(candidates);
  std::vector<std::string> alive;
  for (const auto& c : candidates) {
    if (monitor_->alive(c)) alive.push_back(c);
  }
  // The leader: the first live member of the last decision (a joiner never
  // leads: it may still be receiving its state). One that is alive but does
  // not arrive within wait_timeout (hung, or far behind) loses the role to
  // the first member that did arrive. Nodes that cannot lead stop here,
  // before any store traffic.
  std::vector<std::string> leaders;
  for (const auto& c : alive) {
    if (contains(prev.members, c)) leaders.push_back(c);
  }
  if (leaders.empty()) leaders = alive;
  const bool late = secondsSince(roundStart_) >= config_.wait_timeout_s;
  const bool firstChoice = leaders.empty() || leaders.front() == me_;
  if (!firstChoice && !late) return std::nullopt;

  std::vector<std::string> arrived;
  bool waiting = false;
  for (const auto& c : alive) {
    if (store_->check({base + "/arrived/" + c})) {
      arrived.push_back(c);
    } else {
      waiting = true;
    }
  }
  if (!firstChoice) {
    // Late: the role passes to the first member that arrived, unless the first choice did.
    std::string leader = leaders.front();
    if (!contains(arrived, leader)) {
      for (const auto& c : leaders) {
        if (contains(arrived, c)) {
          leader = c;
          break;
        }
      }
    }
    if (leader != me_) return std::nullopt;
  }
  if (waiting && !late) return std::nullopt;

  Membership d;
  d.outerStep = outerStep;
  d.attempt = attempt;
  d.members = arrived;
  for (const auto& c : candidates) {
    if (!contains(arrived, c)) d.dropped.push_back(c);
  }
  // New registrations, oldest first, while there is room.
  const int64_t count = store_->add("elastic/join/count", 0);
  d.joinCursor = prev.joinCursor;
  std::vector<std::string> joinerIds;
  for (int64_t n = prev.joinCursor; n < count; ++n) {
    const std::string key = "elastic/join/" + std::to_string(n);
    if (!store_->check({key})) {
      // A registration being written -- or one whose writer died between
      // taking the number and writing it: skipped once a later one exists.
      if (n + 1 < count && store_->check({"elastic/join/" + std::to_string(n + 1)})) {
        d.joinCursor = n + 1;
        continue;
      }
      break;
    }
    const std::string id = store_->getString(key);
    // A slot that registered again (restarted) supersedes its older incarnations.
    bool superseded = false;
    for (int64_t later = n + 1; later < count && !superseded; ++later) {
      const std::string laterKey = "elastic/join/" + std::to_string(later);
      superseded = store_->check({laterKey}) && slotOf(store_->getString(laterKey)) == slotOf(id);
    }
    if (superseded) {
      d.joinCursor = n + 1;
      continue;
    }
    monitor_->watch({id});
    const bool known = contains(candidates, id);
    const bool room = config_.max_nodes == 0 ||
                      static_cast<int>(d.members.size() + joinerIds.size()) < config_.max_nodes;
    if (!known && monitor_->alive(id)) {
      if (!room) break;  // admitted later, when a node leaves
      joinerIds.push_back(id);
    }
    d.joinCursor = n + 1;
  }
  const int total = static_cast<int>(d.members.size() + joinerIds.size());
  if (total < config_.min_nodes) {
    if (!belowMinSince_) {
      belowMinSince_ = Clock::now();
      TESSERA_LOG(kWarn) << "only " << total << " of min_nodes = " << config_.min_nodes
                         << " nodes alive at outer step " << outerStep << "; waiting up to " << config_.wait_timeout_s
                         << " s for nodes to join";
    }
    if (secondsSince(*belowMinSince_) < config_.wait_timeout_s) return std::nullopt;
    std::ostringstream why;
    why << "only " << total << " node(s) " << joinList(d.members) << " alive at outer step " << outerStep
        << ", below min_nodes = " << config_.min_nodes << ", after waiting " << config_.wait_timeout_s
        << " s (lost: " << joinList(d.dropped) << "); the job stops: start more nodes in time, or lower MIN in "
        << "tessera-run --nnodes MIN:MAX";
    d.stop = why.str();
  }
  const bool sameGroup = d.members == prev.members && attempt == 0 && prev.outerStep >= 0;
  // Every attempt that re-forms gets an epoch never used before (its store
  // prefix must be fresh): attempts of one step build on the same committed
  // decision, so they count up from it.
  d.epoch = prev.epoch + (sameGroup ? 0 : 1 + attempt);
  for (size_t i = 0; i < joinerIds.size(); ++i) {
    d.joiners.emplace_back(joinerIds[i], d.members.empty() ? me_ : d.members[i % d.members.size()]);
  }
  store_->compareSet(base + "/decision", {}, comm::toBytes(d.toJson()));
  return Membership::fromJson(store_->getString(base + "/decision"));
}

Membership ElasticMesh::decide(int64_t outerStep, int attempt) {
  const std::string base = "elastic/round/" + std::to_string(outerStep) + "/" + std::to_string(attempt);
  roundStart_ = Clock::now();
  belowMinSince_.reset();
  const double bound = 2 * config_.wait_timeout_s + config_.heartbeat_timeout_s + 10;
  bool announced = false;
  while (true) {
    if (!announced) leaveIfRequested();  // once arrived, this step is seen through
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
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "outer step " << outerStep << ": store unreachable, retrying: " << e.what();
    }
    if (secondsSince(roundStart_) > bound) {
      std::vector<std::string> candidates = committed_.members;
      throw TimeoutError("no membership decision for outer step " + std::to_string(outerStep) + " within " +
                         std::to_string(static_cast<int>(bound)) + " s (the leader is the first alive of " +
                         joinList(candidates) + "; is the store at " + identity_.storeAddress + " reachable?)");
    }
    std::this_thread::sleep_for(kPoll);
  }
}

// --- Group formation, the all-reduce, and the commit vote ------------------------

uint64_t ElasticMesh::bytesSent() const {
  return retiredBytes_ + (group_ ? group_->stats().totalBytesSent() : 0);
}

void ElasticMesh::dropGroup() {
  if (group_) retiredBytes_ += group_->stats().totalBytesSent();
  group_.reset();
  groupEpoch_ = -1;
}

void ElasticMesh::formGroup(const Membership& decision) {
  dropGroup();
  const std::string name = "elastic/e" + std::to_string(decision.epoch) + "/l" + std::to_string(identity_.localRank);
  comm::GlooOptions options;
  options.name = name;
  options.hostname = identity_.advertiseHost;
  // Members read the decision within milliseconds of each other, so forming
  // the group takes well under a second; a member that does not show up is
  // dead (or cut off) and will be declared so by its heartbeat: waiting
  // longer than that only delays the retry.
  options.timeout = ms(std::min(config_.collective_timeout_s, config_.heartbeat_timeout_s + 2.0));
  comm::CommPtr group = comm::makeGlooCommunicator(store_, name, decision.indexOf(me_),
                                                   static_cast<int>(decision.members.size()), options);
  group->setTimeout(ms(config_.collective_timeout_s));
  group_ = wrapGroup ? wrapGroup(group) : group;
  groupEpoch_ = decision.epoch;
}

bool ElasticMesh::vote(const Membership& decision, bool ok) {
  const std::string base =
      "elastic/round/" + std::to_string(decision.outerStep) + "/" + std::to_string(decision.attempt);
  const auto begin = Clock::now();
  const double bound = config_.collective_timeout_s + config_.heartbeat_timeout_s + 5;
  bool voted = false;
  while (true) {
    try {
      if (!voted) {
        store_->setString(base + "/vote/" + me_ + "/l" + std::to_string(identity_.localRank), ok ? "ok" : "fail");
        voted = true;
      }
      if (store_->check({base + "/outcome"})) return store_->getString(base + "/outcome") == "commit";
      if (identity_.localRank == 0) {
        bool anyFail = false, complete = true;
        for (const auto& m : decision.members) {
          const bool alive = monitor_->alive(m);
          for (int l = 0; l < identity_.localSize; ++l) {
            const std::string key = base + "/vote/" + m + "/l" + std::to_string(l);
            if (store_->check({key})) {
              if (store_->getString(key) != "ok") anyFail = true;
            } else if (alive) {
              complete = false;
            }
          }
        }
        const bool late = secondsSince(begin) > bound;
        if (anyFail || complete || late) {
          // A member that died after the all-reduce completed everywhere else
          // does not spoil the step: the survivors hold the same values.
          const std::string outcome = !anyFail && complete ? "commit" : "retry";
          store_->compareSet(base + "/outcome", {}, comm::toBytes(outcome));
          continue;
        }
      }
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "outer step " << decision.outerStep << " vote: store unreachable, retrying: " << e.what();
    }
    if (secondsSince(begin) > 2 * bound) {
      throw TimeoutError("no commit/retry outcome for outer step " + std::to_string(decision.outerStep) +
                         " within " + std::to_string(static_cast<int>(2 * bound)) + " s");
    }
    std::this_thread::sleep_for(kPoll);
  }
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
        emit(Json{{"event", "membership"}, {"epoch", d.epoch}, {"outer_step", outerStep}, {"members", d.members},
                  {"joined", joined}, {"dropped", d.dropped}, {"time_s", unixSeconds()}}
                 .dump());
        TESSERA_LOG(kInfo) << "outer step " << outerStep << ": epoch " << d.epoch << ", nodes " << joinList(d.members)
                           << (joined.empty() ? "" : ", admitted " + joinList(joined))
                           << (d.dropped.empty() ? "" : ", dropped " + joinList(d.dropped));
      }
      lastAttempts_ = attempt + 1;
      return d;
    }
    dropGroup();
    emit(Json{{"event", "retry"}, {"outer_step", outerStep}, {"attempt", attempt + 1},
              {"error", ok ? "another node failed" : lastError}, {"time_s", unixSeconds()}}
             .dump());
  }
  throw CommError("outer step " + std::to_string(outerStep) + " failed in all " + std::to_string(config_.max_retries) +
                  " attempts (elastic.max_retries); last error: " + lastError);
}

}  // namespace tessera::parallel
