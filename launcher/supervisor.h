// Supervisor: runs one node's workers to completion. It forwards their
// output, forwards SIGINT/SIGTERM to them, and when one fails stops the rest
// (SIGTERM, then SIGKILL after a grace period) and reports which rank failed,
// how, and its last lines. Restarts the whole node's workers up to
// maxRestarts times. A worker exiting with evictedExitCode (elastic mode:
// dropped from the job) also restarts the node; such restarts count against
// the same maxRestarts (said apart in the log). Private to the launcher.
//
// What it does not do: decide what the workers are (tessera_run.cc builds
// their command lines and environments) or talk to other nodes itself (JobBoard).
#pragma once

#include <signal.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "launcher/job_board.h"
#include "launcher/worker_process.h"

namespace tessera::launcher {

// Writes "tessera-run: <text>" as one line to stderr.
void say(const std::string& text);
// "1 worker", "3 workers".
std::string plural(size_t count, const std::string& noun);

// Turns SIGINT, SIGTERM and SIGHUP into bytes on a pipe, so the supervisor's
// poll loop handles them between reads instead of inside a signal handler.
// A signal the launcher inherited as ignored (SIGHUP under nohup) stays
// ignored, for it and its workers. Also ignores SIGPIPE (a closed terminal
// must not kill the launcher before it stops its workers). One per process:
// the handler's pipe is necessarily process-wide state.
class SignalPipe {
 public:
  SignalPipe();
  // Restores the default dispositions.
  ~SignalPipe();
  SignalPipe(const SignalPipe&) = delete;
  SignalPipe& operator=(const SignalPipe&) = delete;

  int fd() const { return readFd_; }
  // The signals received since the last call, oldest first (non-blocking).
  std::vector<int> take();

 private:
  int readFd_ = -1;
  int writeFd_ = -1;
  std::vector<std::pair<int, struct sigaction>> previous_;  // restored by the destructor
};

struct SupervisorOptions {
  // After SIGTERM, how long workers get to exit before SIGKILL.
  std::chrono::milliseconds gracePeriod{std::chrono::seconds(5)};
  // Times a failed node is restarted (all its workers) before the job fails.
  int maxRestarts = 0;
  // Lines of a failed worker's output repeated in the failure report.
  size_t tailLines = 20;
  // Elastic mode: a worker exiting with this code was dropped from the job and
  // must rejoin: the node's workers are stopped and started again. Not a
  // failure, but it uses up a restart like one (maxRestarts bounds both, so a
  // node that keeps being dropped ends). -1: no such code.
  int evictedExitCode = -1;
  // Said when that happens ("node 2 was dropped from the job; rejoining"),
  // followed by " (restart i of K)".
  std::string evictedMessage = "the workers were dropped from the job; rejoining";
  // Called at once (before the other workers are stopped) with one line
  // saying how, when a worker fails: exits non-zero (other than
  // evictedExitCode) or dies of a signal the supervisor did not send. Elastic
  // mode marks the node's member dead in the store with it. Must not throw.
  std::function<void(const std::string& how)> onWorkerFailed;
  // Polled about every half second while workers run: a reason ends the job
  // (workers stopped with SIGTERM, no restart, exit code 1). Elastic mode:
  // the node lost its slot to another launcher.
  std::function<std::optional<std::string>()> mustStop;
  // Multi-node only: how long node 0 keeps the store up for other nodes after
  // its own workers finished.
  std::chrono::milliseconds finishTimeout{std::chrono::minutes(5)};
};

// How the job ended, as tessera-run's exit code.
struct JobOutcome {
  int exitCode = 0;  // 0 ok; 1 a worker failed or could not start; 128+signal when interrupted
};

class Supervisor {
 public:
  // makeWorkers(attempt) returns the workers of attempt `attempt` (0 first;
  // every restart, after a failure or an eviction, is a new attempt). It may
  // throw Error, which fails the job like a worker that cannot start.
  // `board` is null on a single node; otherwise it outlives the supervisor.
  Supervisor(SupervisorOptions options, std::function<std::vector<WorkerSpec>(int attempt)> makeWorkers,
             SignalPipe& signals, JobBoard* board);

  // Blocks until the job ends; prints the failure report on stderr.
  JobOutcome run();

 private:
  using Workers = std::vector<std::unique_ptr<WorkerProcess>>;
  enum class End { kSucceeded, kWorkerFailed, kEvicted, kLaunchFailed, kInterrupted, kRemoteFailure };
  struct AttemptResult {
    End end = End::kSucceeded;
    int signal = 0;      // kInterrupted: the signal received
    std::string reason;  // one line: what went wrong
  };

  AttemptResult runAttempt(int attempt);
  AttemptResult failWorker(Workers& workers, size_t failed);
  AttemptResult waitForOtherNodes();
  // One poll round of at most `timeout`: forwards ready output. Returns a
  // received signal, or 0.
  int pumpOnce(Workers& workers, std::chrono::milliseconds timeout);
  // Reaps exited workers; returns the index of the failed worker that died
  // first (by when its output ended), or -1 when none failed.
  int reapAll(Workers& workers);
  // Sends `sig` to every worker's group, waits the grace period, SIGKILLs the rest.
  void stopAll(Workers& workers, int sig);
  // Forwards the output still buffered in pipes, for at most `timeout`.
  void drainOutput(Workers& workers, std::chrono::milliseconds timeout);

  SupervisorOptions options_;
  std::function<std::vector<WorkerSpec>(int)> makeWorkers_;
  SignalPipe& signals_;
  JobBoard* board_;
  bool sentKill_ = false;  // tells a SIGKILL we sent from one the kernel (OOM killer) sent
};

}  // namespace tessera::launcher
