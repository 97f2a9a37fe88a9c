// The liveness thread of the elastic mesh: see heartbeat_monitor.h.
#include "parallel/elastic/heartbeat_monitor.h"

#include <algorithm>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::parallel::elastic {
namespace {

// Observations run at least this often whatever the heartbeat interval: a
// dead mark or a vanished lease is seen within it.
constexpr auto kObservePeriod = std::chrono::milliseconds(250);
// refresh() reads one member's marks at most this often.
constexpr auto kRefreshPeriod = std::chrono::milliseconds(50);

double unixAt(Clock::time_point t) {
  return unixSeconds() - std::chrono::duration<double>(Clock::now() - t).count();
}

// Two intervals (a beat, and the observation that sees it) and half a
// second of scheduling slack, at least a second.
std::chrono::milliseconds suspicionWindowOf(std::chrono::milliseconds interval) {
  return std::max(std::chrono::milliseconds(1000), 2 * interval + std::chrono::milliseconds(500));
}

// The reason in "elastic/dead/<member>" ("" : no mark; a mark without a reason reads "no reason given").
std::string readDeadMark(comm::Store& store, const std::string& member, std::chrono::milliseconds timeout) {
  if (!store.check({deadKey(member)})) return "";
  const std::string reason = store.getString(deadKey(member), timeout);
  return reason.empty() ? "no reason given" : reason;
}

}  // namespace

std::string deadKey(const std::string& member) { return "elastic/dead/" + member; }
std::string leftKey(const std::string& member) { return "elastic/left/" + member; }
std::string aliveKey(const std::string& member) { return "elastic/alive/" + member; }
std::string heartbeatKey(const std::string& member) { return "elastic/hb/" + member; }

HeartbeatMonitor::HeartbeatMonitor(comm::StorePtr store, std::string me, const ElasticConfig& config)
    : store_(std::move(store)), me_(std::move(me)), interval_(ms(config.heartbeat_interval_s)),
      timeout_(ms(config.heartbeat_timeout_s)), window_(suspicionWindowOf(interval_)),
      leases_(store_->supportsLeases()) {
  beat();
  thread_ = std::thread([this] { loop(); });
}

HeartbeatMonitor::~HeartbeatMonitor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void HeartbeatMonitor::watch(const std::vector<std::string>& members) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto now = Clock::now();
  for (const auto& m : members) {
    if (m != me_ && !watched_.count(m)) {
      Seen seen;
      seen.changed = now;
      seen.refreshed = now - kRefreshPeriod;
      watched_[m] = seen;
    }
  }
}

std::optional<HeartbeatMonitor::Death> HeartbeatMonitor::deathLocked(const Seen& seen, Clock::time_point now) const {
  if (!seen.mark.empty()) return Death{seen.mark, unixAt(seen.markSeen)};
  if (blind_) return std::nullopt;  // the store is unreachable: no evidence either way
  if (leases_ && seen.leaseGone) return Death{"lease expired", unixAt(seen.leaseGoneSince)};
  if (!leases_ && now - seen.changed >= timeout_) return Death{"heartbeat timeout", unixAt(seen.changed + timeout_)};
  // A suspicion that takes as long as the heartbeat timeout is no faster than silence: off then.
  if (seen.suspectedAt && window_ < timeout_ && now - *seen.suspectedAt >= window_) {
    return Death{"suspicion confirmed (no heartbeat within " + std::to_string(window_.count()) + " ms)",
                 unixAt(*seen.suspectedAt + window_)};
  }
  return std::nullopt;
}

bool HeartbeatMonitor::alive(const std::string& member) { return !death(member).has_value(); }

std::optional<HeartbeatMonitor::Death> HeartbeatMonitor::death(const std::string& member) {
  if (member == me_) return std::nullopt;
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = watched_.find(member);
  if (it == watched_.end()) return std::nullopt;  // not watched yet: no evidence either way
  return deathLocked(it->second, Clock::now());
}

void HeartbeatMonitor::recordLocked(Seen& seen, std::optional<int64_t> counter, bool left,
                                    const std::string& deadReason, std::optional<bool> leasePresent,
                                    Clock::time_point now) {
  if (seen.mark.empty() && (left || !deadReason.empty())) {
    seen.mark = left ? "left" : "dead mark: " + deadReason;
    seen.markSeen = now;
  }
  if (leasePresent) {
    if (!*leasePresent && !seen.leaseGone) seen.leaseGoneSince = now;
    seen.leaseGone = !*leasePresent;
  }
  if (!counter) return;
  if (*counter != seen.counter) {
    seen.counter = *counter;
    seen.changed = now;
  }
  if (seen.suspectedAt) {
    if (seen.suspectBaseline < 0) {
      seen.suspectBaseline = *counter;  // the first look after the suspicion
    } else if (*counter != seen.suspectBaseline) {
      seen.suspectedAt.reset();  // it beat since: alive, the suspicion was false
      seen.suspectBaseline = -1;
    }
  }
}

void HeartbeatMonitor::suspectAllLocked(Clock::time_point now) {
  for (auto& [m, seen] : watched_) {
    if (!seen.mark.empty() || seen.suspectedAt) continue;
    seen.suspectedAt = now;
    seen.suspectBaseline = -1;
  }
}

void HeartbeatMonitor::refresh(const std::vector<std::string>& members) {
  std::vector<std::string> due;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto now = Clock::now();
    for (const auto& m : members) {
      auto it = watched_.find(m);
      if (it == watched_.end() || !it->second.mark.empty() || now - it->second.refreshed < kRefreshPeriod) continue;
      it->second.refreshed = now;
      due.push_back(m);
    }
  }
  for (const auto& m : due) {
    try {
      const bool left = store_->check({leftKey(m)});
      const std::string dead = readDeadMark(*store_, m, timeout_);
      std::optional<bool> present;
      if (leases_) present = store_->check({aliveKey(m)});
      std::lock_guard<std::mutex> lock(mutex_);
      if (blind_) continue;  // present/absent means nothing until the thread sees the store again
      recordLocked(watched_[m], std::nullopt, left, dead, present, Clock::now());
    } catch (const Error&) {
      return;  // unreachable: no evidence; the thread notices the outage
    }
  }
}

void HeartbeatMonitor::suspectPeers(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    suspectAllLocked(Clock::now());
    ++pendingReports_;
  }
  TESSERA_LOG(kInfo) << "collective failed (" << why << "): suspecting the other members; a live one shows a "
                     << "heartbeat within " << window_.count() << " ms";
  wake_.notify_all();
}

void HeartbeatMonitor::announceLeave() {
  try {
    store_->setString(leftKey(me_), "1");
  } catch (const Error& e) {
    TESSERA_LOG(kWarn) << "could not announce the leave: " << e.what();
  }
}

void HeartbeatMonitor::renewLease() {
  if (lease_ > 0) {
    try {
      store_->keepAlive(lease_);
      return;
    } catch (const StoreError&) {
      // Expired (the store was out of reach for a whole ttl, or this thread
      // starved), or unreachable now: take a new lease below; when the store
      // is unreachable that throws too, and the next beat tries again.
    }
  }
  const int64_t lease = store_->grantLease(timeout_);
  store_->setWithLease(aliveKey(me_), comm::toBytes("1"), lease);
  if (lease_ > 0) {
    TESSERA_LOG(kWarn) << "heartbeat: the liveness lease had expired; renewed with a new one";
  }
  lease_ = lease;
}

void HeartbeatMonitor::beat() {
  try {
    store_->add(heartbeatKey(me_), 1);
    if (leases_) renewLease();
    reachable_ = true;
  } catch (const Error& e) {
    if (reachable_.exchange(false)) {
      TESSERA_LOG(kWarn) << "heartbeat: store unreachable: " << e.what();
    }
  }
}

void HeartbeatMonitor::observe() {
  std::vector<std::string> members;
  int reports = 0;
  {
    // A member that left or was marked dead stays dead (a restarted node
    // comes back under a new incarnation id), and one dead by silence for
    // three timeouts is given up: no need to keep polling them. An outage
    // resets every age (below), so nobody is written off because of it.
    std::lock_guard<std::mutex> lock(mutex_);
    const auto now = Clock::now();
    for (const auto& [m, seen] : watched_) {
      const bool gone = leases_ ? seen.leaseGone && now - seen.leaseGoneSince >= 3 * timeout_
                                : now - seen.changed >= 3 * timeout_;
      if (seen.mark.empty() && !gone) members.push_back(m);
    }
    reports = pendingReports_;
  }
  struct Look {
    std::string member;
    int64_t counter;
    bool left;
    std::string dead;
    std::optional<bool> present;
  };
  std::vector<Look> looks;
  int64_t suspicions = 0;
  try {
    suspicions = store_->add(kSuspicionsKey, reports);
    for (const auto& m : members) {
      Look look{m, store_->add(heartbeatKey(m), 0), store_->check({leftKey(m)}), "", std::nullopt};
      look.dead = readDeadMark(*store_, m, timeout_);
      if (leases_) look.present = store_->check({aliveKey(m)});
      looks.push_back(std::move(look));
    }
  } catch (const Error&) {
    std::lock_guard<std::mutex> lock(mutex_);
    blind_ = true;  // no news is not evidence of death (see alive())
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const auto now = Clock::now();
  if (blind_) {
    // The first view after an outage: every age restarts now, or the outage
    // itself would make every other node look dead.
    for (auto& [id, s] : watched_) {
      s.changed = now;
      if (s.suspectedAt) {
        s.suspectedAt = now;
        s.suspectBaseline = -1;
      }
    }
    blind_ = false;
  }
  pendingReports_ -= reports;
  // Another process's report (ours are not news: they were applied at once).
  const bool news = suspicions_ >= 0 && suspicions - reports != suspicions_;
  suspicions_ = suspicions;
  if (news) suspectAllLocked(now);
  for (const auto& look : looks) {
    Seen& seen = watched_[look.member];
    const bool wasMarked = !seen.mark.empty();
    recordLocked(seen, look.counter, look.left, look.dead, look.present, now);
    if (!wasMarked && !seen.mark.empty() && !look.left) {
      TESSERA_LOG(kInfo) << "member " << look.member << " is dead (" << seen.mark << ")";
    }
  }
}

void HeartbeatMonitor::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  auto nextBeat = Clock::now() + interval_;
  while (!stopping_) {
    const auto period = std::min<std::chrono::milliseconds>(interval_, kObservePeriod);
    // A suspicion to report wakes the thread at once (unless the store is out of reach).
    wake_.wait_for(lock, period, [this] { return stopping_ || (pendingReports_ > 0 && !blind_); });
    if (stopping_) break;
    lock.unlock();
    if (Clock::now() >= nextBeat) {
      beat();
      nextBeat = Clock::now() + interval_;
    }
    observe();
    lock.lock();
  }
}

}  // namespace tessera::parallel::elastic
