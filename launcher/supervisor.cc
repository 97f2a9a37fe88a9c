// Supervisor: the poll loop over workers' pipes and the signal pipe, failure
// handling and restarts. See supervisor.h.
#include "launcher/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "tessera/core/error.h"
#include "tessera/core/timer.h"

namespace tessera::launcher {
namespace {

using std::chrono::milliseconds;

// The signal handler can reach nothing but process-wide state; this is it.
int gSignalWriteFd = -1;

void onSignal(int sig) {
  const int savedErrno = errno;
  const unsigned char byte = static_cast<unsigned char>(sig);
  ssize_t ignored = write(gSignalWriteFd, &byte, 1);
  (void)ignored;
  errno = savedErrno;
}

std::string seconds(milliseconds duration) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", duration.count() / 1e3);
  return text;
}

size_t countRunning(const std::vector<std::unique_ptr<WorkerProcess>>& workers) {
  return std::count_if(workers.begin(), workers.end(), [](const auto& w) { return w->running(); });
}

}  // namespace

void say(const std::string& text) { writeAll(2, "tessera-run: " + text + "\n"); }

std::string plural(size_t count, const std::string& noun) {
  return std::to_string(count) + " " + noun + (count == 1 ? "" : "s");
}

SignalPipe::SignalPipe() {
  int fds[2];
  TESSERA_CHECK(pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0, "cannot create the signal pipe: " << std::strerror(errno));
  readFd_ = fds[0];
  writeFd_ = fds[1];
  gSignalWriteFd = writeFd_;
  struct sigaction action {};
  action.sa_handler = onSignal;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) {
    struct sigaction old {};
    sigaction(sig, nullptr, &old);
    if (old.sa_handler == SIG_IGN) continue;
    previous_.emplace_back(sig, old);
    sigaction(sig, sig == SIGPIPE ? &ignore : &action, nullptr);
  }
}

SignalPipe::~SignalPipe() {
  for (const auto& [sig, old] : previous_) sigaction(sig, &old, nullptr);
  gSignalWriteFd = -1;
  close(readFd_);
  close(writeFd_);
}

std::vector<int> SignalPipe::take() {
  std::vector<int> received;
  unsigned char bytes[64];
  ssize_t n;
  while ((n = read(readFd_, bytes, sizeof(bytes))) > 0) received.insert(received.end(), bytes, bytes + n);
  return received;
}

Supervisor::Supervisor(SupervisorOptions options, std::function<std::vector<WorkerSpec>(int)> makeWorkers,
                       SignalPipe& signals, JobBoard* board)
    : options_(options), makeWorkers_(std::move(makeWorkers)), signals_(signals), board_(board) {}

JobOutcome Supervisor::run() {
  Stopwatch watch;
  int restarts = 0;  // after failures and after evictions: maxRestarts bounds both
  int afterEvictions = 0;
  for (int attempt = 0;; ++attempt) {
    AttemptResult result = runAttempt(attempt);
    if (result.end == End::kSucceeded && board_ != nullptr) result = waitForOtherNodes();
    const std::string took = seconds(milliseconds(static_cast<int64_t>(watch.millis())));
    if (result.end == End::kSucceeded) {
      say("all workers exited 0 after " + took);
      return {0};
    }
    const std::string next = "(restart " + std::to_string(restarts + 1) + " of " +
                             std::to_string(options_.maxRestarts) + ")";
    if (result.end == End::kEvicted) {
      if (restarts < options_.maxRestarts) {
        ++restarts;
        ++afterEvictions;
        say(options_.evictedMessage + " " + next);
        continue;
      }
      result.reason += "; no restart left: --max-restarts " + std::to_string(options_.maxRestarts) + " used up (" +
                       std::to_string(restarts - afterEvictions) + " after failures, " +
                       std::to_string(afterEvictions) + " after evictions); raise --max-restarts";
    }
    if (result.end == End::kWorkerFailed && restarts < options_.maxRestarts) {
      ++restarts;
      say("restarting all workers " + next);
      continue;
    }
    // A signal is someone's decision (in elastic mode: this node leaves the job), not a failure.
    say((result.end == End::kInterrupted ? "stopped after " : "job failed after ") + took + ": " + result.reason);
    return {result.end == End::kInterrupted ? 128 + result.signal : 1};
  }
}

Supervisor::AttemptResult Supervisor::runAttempt(int attempt) {
  Workers workers;
  sentKill_ = false;
  try {
    for (const WorkerSpec& spec : makeWorkers_(attempt)) {
      workers.push_back(std::make_unique<WorkerProcess>(spec, options_.tailLines));
    }
  } catch (const Error& e) {
    say(std::string(e.what()) + "; stopping the workers already started");
    if (board_ != nullptr) board_->reportFailure(e.what());
    stopAll(workers, SIGTERM);
    return {End::kLaunchFailed, 0, e.what()};
  }
  Stopwatch sinceBoardCheck;
  while (true) {
    if (const int sig = pumpOnce(workers, milliseconds(100))) {
      say("received " + signalName(sig) + "; forwarding it to the workers");
      if (board_ != nullptr) board_->reportFailure("tessera-run was interrupted by " + signalName(sig));
      stopAll(workers, sig);
      return {End::kInterrupted, sig, "interrupted by " + signalName(sig)};
    }
    const int failed = reapAll(workers);
    if (failed >= 0) return failWorker(workers, static_cast<size_t>(failed));
    // Polled, not pushed: the store has no notifications, and half a second
    // is small next to how long a peer's collective takes to time out.
    if ((board_ != nullptr || options_.mustStop) && sinceBoardCheck.millis() > 500) {
      sinceBoardCheck.restart();
      std::optional<std::string> remote = board_ != nullptr ? board_->failure() : std::nullopt;
      if (!remote && options_.mustStop) remote = options_.mustStop();
      if (remote) {
        say(*remote + "; stopping this node's workers");
        stopAll(workers, SIGTERM);
        return {End::kRemoteFailure, 0, *remote};
      }
    }
    if (countRunning(workers) == 0) {
      drainOutput(workers, milliseconds(1000));
      return {};
    }
  }
}

Supervisor::AttemptResult Supervisor::failWorker(Workers& workers, size_t failed) {
  WorkerProcess& worker = *workers[failed];
  const ExitStatus& status = worker.status();
  if (options_.evictedExitCode >= 0 && status.exited && status.code == options_.evictedExitCode) {
    const size_t others = countRunning(workers);
    say(worker.label() + " " + status.describe() + " (dropped from the job)" +
        (others > 0 ? "; stopping the other " + plural(others, "worker") : ""));
    stopAll(workers, SIGTERM);
    return {End::kEvicted, 0, worker.label() + " was dropped from the job"};
  }
  std::string how = worker.label() + " " + status.describe();
  if (worker.status().signal == SIGKILL && !sentKill_) {
    how += " (not sent by tessera-run: the out-of-memory killer? see dmesg)";
  }
  // First, so that the other nodes learn of it before this node has even
  // stopped its other workers.
  if (options_.onWorkerFailed) options_.onWorkerFailed(how);
  const size_t others = countRunning(workers);
  say(how + (others > 0 ? "; stopping the other " + plural(others, "worker") : ""));
  if (board_ != nullptr) board_->reportFailure(how);
  stopAll(workers, SIGTERM);
  // After stopAll, which drained the pipes, so the tail holds the worker's last words.
  std::string report = "last " + plural(worker.tail().size(), "line") + " of " + worker.label() + ":\n";
  for (const std::string& line : worker.tail()) report += "  | " + line + "\n";
  if (worker.tail().empty()) report = worker.label() + " printed nothing\n";
  writeAll(2, "tessera-run: " + report);
  return {End::kWorkerFailed, 0, how};
}

Supervisor::AttemptResult Supervisor::waitForOtherNodes() {
  board_->markNodeDone();
  if (board_->nodeRank() != 0) return {};
  say("this node's workers finished; keeping the store up until the other " +
      plural(static_cast<size_t>(board_->nnodes() - 1), "node") + " finish");
  Deadline deadline(options_.finishTimeout);
  while (true) {
    if (board_->allNodesDone()) return {};
    if (auto remote = board_->failure()) return {End::kRemoteFailure, 0, *remote};
    if (deadline.expired()) {
      return {End::kRemoteFailure, 0,
              "the other nodes did not finish within " + seconds(options_.finishTimeout) + " of node 0"};
    }
    pollfd fd{signals_.fd(), POLLIN, 0};
    poll(&fd, 1, 200);
    const std::vector<int> received = signals_.take();
    if (!received.empty()) {
      return {End::kInterrupted, received.front(), "interrupted by " + signalName(received.front())};
    }
  }
}

int Supervisor::pumpOnce(Workers& workers, milliseconds timeout) {
  std::vector<pollfd> fds{{signals_.fd(), POLLIN, 0}};
  std::vector<WorkerProcess*> owners{nullptr};
  for (auto& worker : workers) {
    worker->addPollFds(fds);
    owners.resize(fds.size(), worker.get());
  }
  const int ready = poll(fds.data(), fds.size(), static_cast<int>(std::max<int64_t>(timeout.count(), 0)));
  if (ready <= 0) return 0;  // timeout, or EINTR: a signal, which the next round reads from the pipe
  for (size_t i = 1; i < fds.size(); ++i) {
    if (fds[i].revents != 0) owners[i]->readFrom(fds[i].fd);
  }
  if (fds[0].revents & POLLIN) {
    const std::vector<int> received = signals_.take();
    if (!received.empty()) return received.front();
  }
  return 0;
}

int Supervisor::reapAll(Workers& workers) {
  // Of the failures found in one round, the first to die is the cause; the
  // others are usually peers whose collectives broke because of it.
  int firstFailure = -1;
  for (size_t i = 0; i < workers.size(); ++i) {
    if (!workers[i]->reap() || workers[i]->status().success()) continue;
    if (firstFailure < 0 || workers[i]->outputEndedAt() < workers[firstFailure]->outputEndedAt()) {
      firstFailure = static_cast<int>(i);
    }
  }
  return firstFailure;
}

void Supervisor::stopAll(Workers& workers, int sig) {
  // Exited workers too: their process groups may hold children they left behind.
  for (auto& worker : workers) worker->signalGroup(sig);
  Deadline grace(options_.gracePeriod);
  bool secondSignal = false;
  while (countRunning(workers) > 0 && !grace.expired() && !secondSignal) {
    secondSignal = pumpOnce(workers, std::min(milliseconds(50), grace.remaining())) != 0;
    reapAll(workers);
  }
  if (countRunning(workers) > 0) {
    std::string names;
    for (auto& worker : workers) {
      if (worker->running()) names += (names.empty() ? "" : ", ") + worker->label();
    }
    say(names +
        (secondSignal ? ": second signal received"
                      : " did not exit within " + seconds(options_.gracePeriod) + " of " + signalName(sig)) +
        "; sending SIGKILL");
    sentKill_ = true;
    for (auto& worker : workers) worker->signalGroup(SIGKILL);
    // A process in uninterruptible sleep can outlast this; ~WorkerProcess reaps it.
    Deadline killed(milliseconds(5000));
    while (countRunning(workers) > 0 && !killed.expired()) {
      pumpOnce(workers, milliseconds(20));
      reapAll(workers);
    }
  }
  drainOutput(workers, milliseconds(500));
}

void Supervisor::drainOutput(Workers& workers, milliseconds timeout) {
  Deadline deadline(timeout);
  auto anyOpen = [&] {
    return std::any_of(workers.begin(), workers.end(), [](const auto& w) { return w->outputOpen(); });
  };
  while (anyOpen() && !deadline.expired()) pumpOnce(workers, std::min(milliseconds(20), deadline.remaining()));
  for (auto& worker : workers) worker->closeOutput();
}

}  // namespace tessera::launcher
