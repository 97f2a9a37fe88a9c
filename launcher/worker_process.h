// WorkerProcess: one child process of tessera-run, with its output forwarded
// line by line under a "[rank N] " prefix and its last lines kept for the
// failure report. Private to the launcher (not installed).
//
// What it does not do: decide what to do when a worker fails (supervisor.h).
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::launcher {

// "SIGSEGV" for 11; "signal 42" for numbers without a name.
std::string signalName(int signal);

// How a process ended, from waitpid's status.
struct ExitStatus {
  bool exited = false;  // returned from main or called exit()
  int code = 0;         // exit code, when exited
  int signal = 0;       // the signal that killed it, when !exited
  bool coreDumped = false;

  static ExitStatus fromWaitStatus(int status);
  bool success() const { return exited && code == 0; }
  // "exited with code 3", "was killed by SIGSEGV (signal 11, core dumped)".
  std::string describe() const;
};

// Writes all of `text` to fd in as few write() calls as the kernel allows;
// lines written with one call do not interleave with other writers' lines.
// Errors (a closed terminal) are ignored: losing output must not kill the job.
void writeAll(int fd, std::string_view text);

// Where argv[0] would be executed from: itself if it contains '/', else the
// first executable match in the ':'-separated `pathVar`. Empty if none.
std::string findProgram(const std::string& name, const std::string& pathVar);

// A worker environment as "NAME=value" entries (WorkerSpec::env).
std::vector<std::string> toEnvEntries(const std::map<std::string, std::string>& env);
// The words joined by single spaces (a command line, for messages).
std::string joinWords(const std::vector<std::string>& words);
// N workers each running libtorch's default one-thread-per-core pools would
// oversubscribe the CPU N times over: sets OMP_NUM_THREADS in `env` to the
// cores split over `workersOnNode`, unless the user chose. Returns the value
// set, or "" when the user's own setting stands.
std::string shareCores(std::map<std::string, std::string>& env, int workersOnNode);

struct WorkerSpec {
  std::string label;              // names the worker in messages: "rank 3", "mpirun"
  std::string linePrefix;         // put before each output line: "[rank 3] "; may be empty
  std::vector<std::string> argv;  // argv[0] is resolved with the PATH of `env`
  std::vector<std::string> env;   // the child's whole environment, "NAME=value" entries
};

// Splits a byte stream into lines and writes each, prefixed, to outFd with
// one write; remembers the last `tailLines` lines (without prefix) in *tail.
class LineForwarder {
 public:
  LineForwarder(std::string prefix, int outFd, std::deque<std::string>* tail, size_t tailLines);
  void feed(std::string_view bytes);
  // Emits an unterminated last line, if any.
  void finish();

 private:
  void emit(std::string_view line);

  std::string prefix_;
  int outFd_;
  std::deque<std::string>* tail_;
  size_t tailLines_;
  std::string pending_;  // bytes after the last newline
};

// Owns one child process and the read ends of its stdout/stderr pipes.
// Not thread-safe: one supervising thread drives it.
class WorkerProcess {
 public:
  // Starts spec.argv in its own process group (so a terminal's Ctrl-C reaches
  // only tessera-run, which forwards it, and a whole worker tree can be
  // signalled), stdin from /dev/null, stdout/stderr into pipes forwarded to
  // our stdout/stderr. The child is SIGKILLed if tessera-run dies, so a
  // killed launcher leaves no orphans. Throws Error naming the program and
  // the reason when it cannot be started.
  WorkerProcess(const WorkerSpec& spec, size_t tailLines);
  // Kills the process group and reaps the child if it still runs: a
  // WorkerProcess never leaks a process or a zombie.
  ~WorkerProcess();
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  const std::string& label() const { return label_; }
  pid_t pid() const { return pid_; }
  bool running() const { return running_; }
  // The exit status; meaningful once !running().
  const ExitStatus& status() const { return status_; }

  // Non-blocking waitpid. Returns true if the child exited during this call.
  bool reap();
  // Sends sig to the worker's whole process group (its children too). Also
  // after the worker itself exited, to reach children it left behind.
  void signalGroup(int sig) const;

  // Appends one pollfd (POLLIN) per output pipe still open.
  void addPollFds(std::vector<pollfd>& fds) const;
  // Forwards whatever `fd` (one of ours, reported readable) holds; closes it at EOF.
  void readFrom(int fd);
  bool outputOpen() const { return outFd_ >= 0 || errFd_ >= 0; }
  // When both pipes reached EOF (max() while either is open). A dying process
  // closes its pipes at once, before waitpid may see it, so this orders
  // deaths more finely than reaping does.
  std::chrono::steady_clock::time_point outputEndedAt() const { return outputEndedAt_; }
  // Flushes partial lines and closes the pipes (a grandchild may hold them open forever).
  void closeOutput();
  // The last lines the worker printed, stdout and stderr interleaved as read.
  const std::deque<std::string>& tail() const { return tail_; }

 private:
  std::string label_;
  pid_t pid_ = -1;
  bool running_ = false;
  ExitStatus status_;
  int outFd_ = -1;
  int errFd_ = -1;
  std::chrono::steady_clock::time_point outputEndedAt_ = std::chrono::steady_clock::time_point::max();
  std::deque<std::string> tail_;
  LineForwarder outForwarder_;
  LineForwarder errForwarder_;
};

}  // namespace tessera::launcher
