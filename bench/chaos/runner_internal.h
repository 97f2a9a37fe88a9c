// The runner's insides (runner.h runs a plan), shared by its files:
//   runner.cc           the run from start to end: setup of the output folder
//                       and journal, node launches, the main loop, clean-up
//   store_processes.cc  child-process helpers, the netns network, the job's
//                       store (tessera-store or a 3-member etcd cluster)
//   events.cc           the plan's events and the soak's random kills
//   watch.cc            reaping exits, tailing the metrics files, narration
// Private to bench/chaos/: not an API, nothing outside these files includes it.
#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bench/chaos/plan.h"
#include "bench/chaos/runner.h"

namespace tessera::chaos::runner_detail {

inline double unixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// --- child processes (store_processes.cc) -------------------------------
// Starts argv in a new process group, stdin from /dev/null, stdout and
// stderr appended to logPath. Returns the pid (= the group id).
pid_t spawn(const std::vector<std::string>& argv, const std::string& logPath,
            const std::vector<std::pair<std::string, std::string>>& env, const std::string& header);
// Every descendant of `root` (children first found by scanning /proc).
std::vector<pid_t> descendants(pid_t root);
// SIGKILL a launcher, its process group and every descendant (workers run in
// their own groups).
void killTree(pid_t pid);
// Runs a helper command to completion (output appended to logPath); returns
// its exit code, and its stdout when `capture` is given.
int runCommand(const std::vector<std::string>& argv, const std::string& logPath, std::string* capture = nullptr);
std::string trim(std::string s);
// The last `count` lines of a file, each indented as "    | line".
std::string lastLines(const std::string& path, int count);
// 2 x `bytes` hex digits from /dev/urandom (throws Error when unreadable).
std::string randomHex(size_t bytes);

// One started launcher (an incarnation of a node slot).
struct Incarnation {
  int slot = 0;
  int index = 0;          // 0, 1, ... per slot
  pid_t pid = -1;
  bool running = false;
  bool killedByUs = false;
  // tessera-train writes rawPath (and truncates it when the launcher
  // restarts the workers); the runner copies every complete line it reads to
  // DIR/<metricsName>, the file the report reads, so no line is lost.
  std::string rawPath;
  std::string metricsName;
  std::shared_ptr<std::ofstream> archive;
  std::string head;       // the file's first bytes: a rewrite from scratch changes them
  off_t offset = 0;
  std::string partial;
  int64_t lines = 0;
  double launchUnix = 0;
};

class Runner {
 public:
  Runner(const ChaosPlan& plan, const RunnerOptions& options)
      : plan_(plan), o_(options), rng_(plan.seed) {}

  std::string run();

 private:
  // --- setup (runner.cc; the network and the store: store_processes.cc) ---
  void prepare();
  void setUpNetwork();
  std::string address(const std::string& which);
  std::vector<std::string> inHost(const std::string& which, std::vector<std::string> argv);
  void startStore();
  // A 3-member etcd cluster: members talk over the loopback of the runner's
  // namespace (the hub's under netns), clients reach them at storeHost_.
  // Data under DIR/etcd/, logs in DIR/etcd-<i>.log. Ready when etcdctl says
  // every endpoint is healthy (within 30 s, else Error).
  void startEtcd();

  // --- nodes (runner.cc) ---------------------------------------------------
  void startNode(int slot, const std::string& why);
  Incarnation* current(int slot);
  bool isRunning(int slot);
  int runningCount();

  // --- events and the soak (events.cc) -------------------------------------
  double drawGap();
  // The kind of the next soak kill, by the plan's weights.
  std::string drawKind();
  // SIGKILLs the worker processes (tessera-train) below a launcher, leaving
  // the launcher (and, under netns, the namespace wrapper) alive. Returns how
  // many it killed.
  int killWorkers(pid_t launcher);
  // Returns false when the action must wait (a restart of a node still running).
  bool perform(const std::string& action, int slot, const std::string& rate);
  void fireDueEvents();
  // A member of the latest decision seen, launched before it.
  bool holdsState(const Incarnation& inc) const;
  // With no node running: is a start still to come? Only a timed one can
  // fire (step triggers need a running node's metrics).
  bool startsPending() const;

  // --- watching (watch.cc) -------------------------------------------------
  void reap();
  void tail(Incarnation& inc);
  void onLine(const Incarnation& inc, int64_t index, const nlohmann::json& j);

  // --- the loop and the end (runner.cc) ------------------------------------
  std::string loop();
  void cleanUp(const std::string& reason);

  // --- output (runner.cc) --------------------------------------------------
  void recordAction(const std::string& action, int slot, const std::string& detail);
  void record(const nlohmann::json& j);
  double since() const;
  void say(const std::string& what);

  const ChaosPlan& plan_;
  const RunnerOptions& o_;
  std::mt19937_64 rng_;
  std::string dir_;
  std::ofstream journal_;
  double t0_ = 0;
  std::string tokenPath_;
  std::string tag_;
  bool netnsUp_ = false;
  std::string storeHost_;
  std::string storeEndpoint_;
  pid_t storePid_ = -1;
  std::vector<pid_t> etcdPids_;   // [job] store = "etcd": the cluster's members (-1: exited)
  std::string etcdEndpoints_;     // "host:port,host:port,host:port"
  std::string runId_;             // --rdzv-id (etcd)
  std::map<int, double> lastKill_;  // slot -> last kill of its launcher or workers (unix)
  std::vector<Incarnation> incarnations_;
  std::map<int, int> launches_;
  std::set<size_t> fired_;
  std::set<size_t> waitingNoted_;
  int64_t maxStep_ = -1;
  std::map<int, double> lastLoss_;
  std::map<int, double> failureTimes_;
  std::map<int, double> restartTimes_;
  bool awaitingResume_ = false;
  std::set<int64_t> epochsSeen_;
  int64_t latestEpoch_ = -1;
  double latestMembershipUnix_ = 0;
  std::vector<std::string> latestMembers_;
  std::set<int64_t> commitsSeen_;
  std::set<std::pair<int64_t, int>> retriesSeen_;
  double nextSoakKill_ = -1;
  int soakKills_ = 0;
  double soakDoneAt_ = 0;
  std::map<int, double> soakRestarts_;  // slot -> when to restart
  bool jobFinished_ = false;
  double finishedAt_ = 0;
  bool stopping_ = false;
  double stopAt_ = 0;
};

}  // namespace tessera::chaos::runner_detail
