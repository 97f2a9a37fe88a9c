// Heartbeats of the elastic mesh (private): this node's counter
// "elastic/hb/<member>" goes up every heartbeat_interval; the others' are
// watched, and a counter that has not moved for heartbeat_timeout (by this
// process's clock: no clock sync needed) means its node is dead. A member
// that wrote "elastic/left/<member>" is dead at once.
//
// Runs on its own thread and its own store client, so a training thread
// blocked elsewhere never stops the heartbeat. Thread-safe: the training
// thread asks alive() while the thread observes. Only local rank 0 of
// a node runs one.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/elastic/timing.h"
#include "tessera/comm/store.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel::elastic {

class HeartbeatMonitor {
 public:
  // Beats once, then starts the thread. Owns `store` (a client of its own).
  HeartbeatMonitor(comm::StorePtr store, std::string me, const ElasticConfig& config);
  // Stops and joins the thread (within one observation: at most a few store round trips).
  ~HeartbeatMonitor();
  HeartbeatMonitor(const HeartbeatMonitor&) = delete;
  HeartbeatMonitor& operator=(const HeartbeatMonitor&) = delete;

  // Start watching these members (first sight counts as a sign of life).
  void watch(const std::vector<std::string>& members);
  // This node is always alive; an unwatched member, or any member while the
  // store is unreachable, too: no evidence either way.
  bool alive(const std::string& member);
  // Writes "elastic/left/<me>"; logs (does not throw) when the store refuses.
  void announceLeave();

 private:
  struct Seen {
    int64_t counter;
    Clock::time_point changed;
    bool left;
  };

  void beat();
  void observe();
  void loop();

  comm::StorePtr store_;
  std::string me_;
  std::chrono::milliseconds interval_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::atomic<bool> reachable_{true};  // the last beat reached the store (an outage is logged once)
  bool blind_ = false;  // the last observation failed (guarded by mutex_)
  std::map<std::string, Seen> watched_;
  std::thread thread_;
};

}  // namespace tessera::parallel::elastic

namespace tessera::parallel {

// The handle elastic.h declares: ElasticMesh holds its monitor as this private
// type, while the decision protocol's helpers take the HeartbeatMonitor base.
struct ElasticMesh::Monitor : elastic::HeartbeatMonitor {
  using HeartbeatMonitor::HeartbeatMonitor;
};

}  // namespace tessera::parallel
