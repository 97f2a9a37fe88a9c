// Liveness of the elastic mesh's nodes (private). Evidence, fastest first:
//   - marks someone who saw the failure wrote: "elastic/left/<member>" (the
//     node left on SIGTERM) and "elastic/dead/<member>" (value: the reason;
//     written by the node's launcher the moment its worker exited
//     abnormally). Either makes the member dead at once, for good (a
//     restarted node comes back under a new incarnation id).
//   - the liveness record, by store kind:
//       stores with leases (etcd, the hash store): "elastic/alive/<member>",
//       bound to a lease of ttl = heartbeat_timeout that the node keeps alive
//       every heartbeat_interval; the key absent = dead (the store's clock
//       decides, and a node that stops renewing vanishes by itself);
//       stores without (the tessera store, TCP, file): the counter
//       "elastic/hb/<member>", incremented every heartbeat_interval; one that
//       has not moved for heartbeat_timeout (by this process's clock: no
//       clock sync needed) = dead.
//     The counter is written with leases too: it is what suspicion checks.
//   - suspicion: a process whose collective on an elastic group failed
//     (suspectPeers) bumps "elastic/suspicions"; every monitor that sees the
//     count move suspects every member it watches. A suspect must show a
//     heartbeat (its counter moves past the value first observed after the
//     suspicion) within suspicionWindow() -- two heartbeat intervals and
//     half a second, at least a second -- or it is dead. Where that window
//     is not shorter than heartbeat_timeout, suspicion changes nothing. Which peer broke a
//     ring is not knowable from Gloo's error, so everyone is suspected: a
//     live node's heartbeat thread keeps beating whatever its training
//     thread does (it may have dropped its group, or be stuck in a
//     collective), so a false suspicion clears itself and costs at most the
//     retry the failed collective needed anyway.
//
// Runs on its own thread and its own store client, so a training thread
// blocked elsewhere never stops the heartbeat. Thread-safe: the training
// thread asks alive() while the thread observes; refresh() reads marks on the
// caller's thread through the same (thread-safe) client. Only local rank 0 of
// a node runs one. While the store is unreachable nobody is declared dead by
// silence (no evidence either way), and every age restarts when it returns.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "parallel/elastic/timing.h"
#include "tessera/comm/store.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel::elastic {

// The store keys above, for the launcher's writer and for tests.
std::string deadKey(const std::string& member);   // "elastic/dead/<member>"
std::string leftKey(const std::string& member);   // "elastic/left/<member>"
std::string aliveKey(const std::string& member);  // "elastic/alive/<member>" (leases)
std::string heartbeatKey(const std::string& member);  // "elastic/hb/<member>"
constexpr const char* kSuspicionsKey = "elastic/suspicions";

class HeartbeatMonitor {
 public:
  // Why a member counts as dead, and since when (Unix seconds, this
  // process's clock), for the decision's event line.
  struct Death {
    std::string cause;  // "left" | "dead mark: <reason>" | "lease expired" | "heartbeat timeout" | "suspicion confirmed"
    double unix = 0;
  };

  // Beats once (with leases: grants the lease and writes the alive key),
  // then starts the thread. Owns `store` (a client of its own).
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
  // nullopt while alive() holds; else the evidence.
  std::optional<Death> death(const std::string& member);
  // Reads the marks (and, with leases, the alive keys) of these watched
  // members now, on the calling thread, instead of at the next observation:
  // for waits that must react at once to a launcher's dead mark. Each member
  // is read at most every 50 ms however often this is called. Never throws
  // (an unreachable store is no evidence).
  void refresh(const std::vector<std::string>& members);
  // A collective on an elastic group failed (`why`: its error): suspect
  // every watched member now (see the file comment) and tell the other
  // nodes' monitors. Non-blocking: the thread writes the store.
  void suspectPeers(const std::string& why);
  // Writes "elastic/left/<me>"; logs (does not throw) when the store refuses.
  void announceLeave();

  bool usesLeases() const { return leases_; }
  // How long a suspect has to show a heartbeat.
  std::chrono::milliseconds suspicionWindow() const { return window_; }

 private:
  struct Seen {
    int64_t counter = -1;
    Clock::time_point changed;       // the counter last moved (or first sight, or the end of an outage)
    std::string mark;                // non-empty: left or marked dead, for good (the cause)
    Clock::time_point markSeen;
    bool leaseGone = false;          // leases: the alive key was absent at the last look
    Clock::time_point leaseGoneSince;
    std::optional<Clock::time_point> suspectedAt;
    int64_t suspectBaseline = -1;    // the counter at the first look after the suspicion
    Clock::time_point refreshed;     // last refresh() of this member
  };

  void beat();
  void renewLease();
  void observe();
  void loop();
  // Under mutex_: the death of `seen` now, if any.
  std::optional<Death> deathLocked(const Seen& seen, Clock::time_point now) const;
  // Under mutex_: applies one look at a member's keys.
  void recordLocked(Seen& seen, std::optional<int64_t> counter, bool left, const std::string& deadReason,
                    std::optional<bool> leasePresent, Clock::time_point now);
  void suspectAllLocked(Clock::time_point now);

  comm::StorePtr store_;
  std::string me_;
  std::chrono::milliseconds interval_;
  std::chrono::milliseconds timeout_;
  std::chrono::milliseconds window_;
  const bool leases_;
  int64_t lease_ = 0;  // the thread's (and the constructor's) only
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  int pendingReports_ = 0;             // suspicions to write to the store (guarded by mutex_)
  int64_t suspicions_ = -1;            // the last "elastic/suspicions" seen (-1: none yet)
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
