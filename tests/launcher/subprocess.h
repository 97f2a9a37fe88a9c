// Subprocess: runs a command for a test, with its stdout+stderr captured and
// a deadline on every wait, so a launcher bug fails a test instead of hanging CI.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace tessera::testing {

struct ProcessResult {
  int exitCode = -1;      // exit code, or 128+signal; -1 when the deadline passed
  bool timedOut = false;  // the deadline passed and the process group was killed
  std::string output;     // stdout and stderr, interleaved as written
  double seconds = 0;     // from start to exit
};

class Subprocess {
 public:
  // Starts argv in its own process group. `setEnv` entries are added to this
  // process's environment; `unsetEnv` names are removed from it.
  Subprocess(const std::vector<std::string>& argv, const std::map<std::string, std::string>& setEnv = {},
             const std::vector<std::string>& unsetEnv = {});
  // Kills the process group and reaps the process if it still runs.
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // Reads output until it contains `text` (true) or the timeout passes (false).
  bool waitForOutput(const std::string& text, std::chrono::milliseconds timeout);
  // Signals the process itself (not its group), as a terminal's Ctrl-C would reach tessera-run.
  void signal(int sig);
  // Reads output until the process exits; kills its group after the timeout.
  ProcessResult wait(std::chrono::milliseconds timeout);
  const std::string& output() const { return output_; }
  pid_t pid() const { return pid_; }

 private:
  // Reads what is available within `timeout`; false at EOF.
  bool readSome(std::chrono::milliseconds timeout);

  pid_t pid_ = -1;
  int fd_ = -1;
  bool exited_ = false;
  std::string output_;
  std::chrono::steady_clock::time_point start_;
};

// Runs argv to completion (or the timeout) and returns what happened.
ProcessResult runProcess(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                         const std::map<std::string, std::string>& setEnv = {},
                         const std::vector<std::string>& unsetEnv = {});

// Launch variables the test process may have inherited (a CI job under Slurm
// or mpirun): unset them for launched jobs, or they would change what the
// workers detect.
const std::vector<std::string>& foreignLaunchVariables();

// A loopback TCP port that was free a moment ago (bind to port 0, then close).
int pickFreePort();

}  // namespace tessera::testing
