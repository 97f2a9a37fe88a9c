// Subprocess: posix_spawn + one pipe + poll, with deadlines. See subprocess.h.
#include "tests/launcher/subprocess.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "tessera/core/error.h"

extern char** environ;

namespace tessera::testing {
namespace {

using Clock = std::chrono::steady_clock;

int decode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

std::vector<std::string> buildEnv(const std::map<std::string, std::string>& setEnv,
                                  const std::vector<std::string>& unsetEnv) {
  std::set<std::string> drop(unsetEnv.begin(), unsetEnv.end());
  for (const auto& [name, value] : setEnv) drop.insert(name);
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    if (drop.count(entry.substr(0, entry.find('='))) == 0) env.push_back(entry);
  }
  for (const auto& [name, value] : setEnv) env.push_back(name + "=" + value);
  return env;
}

}  // namespace

Subprocess::Subprocess(const std::vector<std::string>& argv, const std::map<std::string, std::string>& setEnv,
                       const std::vector<std::string>& unsetEnv)
    : start_(Clock::now()) {
  std::vector<std::string> args = argv;
  std::vector<std::string> env = buildEnv(setEnv, unsetEnv);
  std::vector<char*> argp;
  std::vector<char*> envp;
  for (auto& a : args) argp.push_back(a.data());
  for (auto& e : env) envp.push_back(e.data());
  argp.push_back(nullptr);
  envp.push_back(nullptr);
  int fds[2];
  TESSERA_CHECK(pipe2(fds, O_CLOEXEC) == 0, "pipe: " << std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  const int rc = posix_spawnp(&pid_, argp[0], &actions, &attr, argp.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  fd_ = fds[0];
  fcntl(fd_, F_SETFL, O_NONBLOCK);
  TESSERA_CHECK(rc == 0, "cannot start " << argv[0] << ": " << std::strerror(rc));
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !exited_) {
    kill(-pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  if (fd_ >= 0) close(fd_);
}

bool Subprocess::readSome(std::chrono::milliseconds timeout) {
  if (fd_ < 0) return false;
  pollfd p{fd_, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(std::max<int64_t>(timeout.count(), 0))) <= 0) return true;
  char buffer[8192];
  while (true) {
    const ssize_t n = read(fd_, buffer, sizeof(buffer));
    if (n > 0) {
      output_.append(buffer, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
    close(fd_);  // EOF: every writer (the process and its children) is gone
    fd_ = -1;
    return false;
  }
}

bool Subprocess::waitForOutput(const std::string& text, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (output_.find(text) == std::string::npos) {
    if (Clock::now() >= deadline) return false;
    if (!readSome(std::chrono::milliseconds(50)) && output_.find(text) == std::string::npos) return false;
  }
  return true;
}

void Subprocess::signal(int sig) { kill(pid_, sig); }

ProcessResult Subprocess::wait(std::chrono::milliseconds timeout) {
  ProcessResult result;
  const auto deadline = Clock::now() + timeout;
  int status = 0;
  while (!exited_) {
    readSome(std::chrono::milliseconds(20));
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      result.exitCode = decode(status);
    } else if (Clock::now() >= deadline) {
      kill(-pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      exited_ = true;
      result.timedOut = true;
    }
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  // Whatever is still in the pipe; children that outlive the process get 2 s.
  const auto drainUntil = Clock::now() + std::chrono::seconds(2);
  while (readSome(std::chrono::milliseconds(20)) && Clock::now() < drainUntil) {
  }
  result.output = output_;
  return result;
}

ProcessResult runProcess(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                         const std::map<std::string, std::string>& setEnv, const std::vector<std::string>& unsetEnv) {
  Subprocess process(argv, setEnv, unsetEnv);
  return process.wait(timeout);
}

int pickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  TESSERA_CHECK(fd >= 0, "socket: " << std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  close(fd);
  TESSERA_CHECK(ok, "cannot find a free loopback port: " << std::strerror(errno));
  return ntohs(address.sin_port);
}

const std::vector<std::string>& foreignLaunchVariables() {
  static const std::vector<std::string> names = {
      "RANK",         "WORLD_SIZE",           "LOCAL_RANK",           "LOCAL_WORLD_SIZE",     "GROUP_RANK",
      "MASTER_ADDR",  "MASTER_PORT",          "TESSERA_BACKEND",      "TESSERA_LAUNCHER",     "TESSERA_STORE_HOSTED",
      "TESSERA_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",        "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
      "OMP_NUM_THREADS"};
  return names;
}

}  // namespace tessera::testing
