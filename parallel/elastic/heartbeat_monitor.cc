// The heartbeat thread of the elastic mesh: see heartbeat_monitor.h.
#include "parallel/elastic/heartbeat_monitor.h"

#include <algorithm>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::parallel::elastic {

HeartbeatMonitor::HeartbeatMonitor(comm::StorePtr store, std::string me, const ElasticConfig& config)
    : store_(std::move(store)), me_(std::move(me)), interval_(ms(config.heartbeat_interval_s)),
      timeout_(ms(config.heartbeat_timeout_s)) {
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
  for (const auto& m : members) {
    if (m != me_ && !watched_.count(m)) watched_[m] = Seen{-1, Clock::now(), false};
  }
}

bool HeartbeatMonitor::alive(const std::string& member) {
  if (member == me_) return true;
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = watched_.find(member);
  if (it == watched_.end()) return true;  // not watched yet: no evidence either way
  if (it->second.left) return false;
  if (blind_) return true;                // the store is unreachable: no evidence either way
  return Clock::now() - it->second.changed < timeout_;
}

void HeartbeatMonitor::announceLeave() {
  try {
    store_->setString("elastic/left/" + me_, "1");
  } catch (const Error& e) {
    TESSERA_LOG(kWarn) << "could not announce the leave: " << e.what();
  }
}

void HeartbeatMonitor::beat() {
  try {
    store_->add("elastic/hb/" + me_, 1);
    reachable_ = true;
  } catch (const Error& e) {
    if (reachable_.exchange(false)) {
      TESSERA_LOG(kWarn) << "heartbeat: store unreachable: " << e.what();
    }
  }
}

void HeartbeatMonitor::observe() {
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

void HeartbeatMonitor::loop() {
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

}  // namespace tessera::parallel::elastic
