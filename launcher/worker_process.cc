// WorkerProcess: fork/exec with pipes, process groups and parent-death
// signals; line forwarding with prefixes. See worker_process.h.
#include "launcher/worker_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"

namespace tessera::launcher {
namespace {

// A line longer than this is forwarded in pieces rather than buffered without bound.
constexpr size_t kMaxLineBytes = 64 * 1024;
// Lines kept for the failure report are cut here; the full line was forwarded already.
constexpr size_t kMaxTailLineBytes = 1024;

struct Pipe {
  int read = -1;
  int write = -1;
};

Pipe makePipe() {
  int fds[2];
  TESSERA_CHECK(pipe2(fds, O_CLOEXEC) == 0,
                "cannot create a pipe: " << std::strerror(errno) << " (too many open files? raise ulimit -n)");
  return {fds[0], fds[1]};
}

void closeFd(int& fd) {
  if (fd >= 0) close(fd);
  fd = -1;
}

std::string envValue(const std::vector<std::string>& env, const std::string& name) {
  const std::string prefix = name + "=";
  for (const auto& entry : env) {
    if (entry.compare(0, prefix.size(), prefix) == 0) return entry.substr(prefix.size());
  }
  return "";
}

// Runs in the child between fork and exec, where only async-signal-safe
// calls are allowed (the launcher has other threads, e.g. the TCP store
// server, whose locks may be held at the fork). Never returns.
[[noreturn]] void execChild(const char* path, char* const argv[], char* const envp[], pid_t parent, int outFd,
                            int errFd, int execErrFd) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);  // the launcher died before prctl took effect
  const int devNull = open("/dev/null", O_RDONLY);
  if (devNull >= 0) dup2(devNull, 0);
  dup2(outFd, 1);  // dup2 clears close-on-exec on the copies
  dup2(errFd, 2);
  // Handled signals reset at exec; ignored ones stay ignored, which is right
  // for SIGHUP under nohup but not for the SIGPIPE the launcher ignores itself.
  struct sigaction defaultAction {};
  defaultAction.sa_handler = SIG_DFL;
  sigaction(SIGPIPE, &defaultAction, nullptr);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  // Descriptors other libraries opened without O_CLOEXEC (store sockets) must
  // not leak into workers; execErrFd is close-on-exec already.
  if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
    for (int fd = 3; fd < 4096; ++fd) {
      if (fd != execErrFd) fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
  }
  execve(path, argv, envp);
  const int error = errno;
  ssize_t ignored = write(execErrFd, &error, sizeof(error));
  (void)ignored;
  _exit(127);
}

std::vector<char*> cStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

std::string signalName(int signal) {
  static const std::pair<int, const char*> kNames[] = {
      {SIGHUP, "SIGHUP"},   {SIGINT, "SIGINT"},   {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},   {SIGTRAP, "SIGTRAP"},
      {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"},   {SIGFPE, "SIGFPE"},   {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"},
      {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"}, {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"},
      {SIGCHLD, "SIGCHLD"}, {SIGCONT, "SIGCONT"}, {SIGSTOP, "SIGSTOP"}, {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"},
      {SIGSYS, "SIGSYS"}};
  for (const auto& [number, name] : kNames) {
    if (number == signal) return name;
  }
  return "signal " + std::to_string(signal);
}

ExitStatus ExitStatus::fromWaitStatus(int status) {
  ExitStatus out;
  if (WIFEXITED(status)) {
    out.exited = true;
    out.code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    out.signal = WTERMSIG(status);
    out.coreDumped = WCOREDUMP(status);
  }
  return out;
}

std::string ExitStatus::describe() const {
  if (exited) return "exited with code " + std::to_string(code);
  return "was killed by " + signalName(signal) + " (signal " + std::to_string(signal) +
         (coreDumped ? ", core dumped)" : ")");
}

void writeAll(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    text.remove_prefix(static_cast<size_t>(n));
  }
}

std::vector<std::string> toEnvEntries(const std::map<std::string, std::string>& env) {
  std::vector<std::string> entries;
  for (const auto& [name, value] : env) entries.push_back(name + "=" + value);
  return entries;
}

std::string joinWords(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& word : words) out += (out.empty() ? "" : " ") + word;
  return out;
}

std::string shareCores(std::map<std::string, std::string>& env, int workersOnNode) {
  if (env.count("OMP_NUM_THREADS") > 0 || workersOnNode <= 1) return "";
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  env["OMP_NUM_THREADS"] = std::to_string(std::max(1, cores / workersOnNode));
  return env["OMP_NUM_THREADS"];
}

std::string findProgram(const std::string& name, const std::string& pathVar) {
  auto executable = [](const std::string& path) {
    struct stat info {};
    return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode) && access(path.c_str(), X_OK) == 0;
  };
  if (name.empty()) return "";
  if (name.find('/') != std::string::npos) return executable(name) ? name : "";
  std::istringstream dirs(pathVar.empty() ? "/usr/local/bin:/usr/bin:/bin" : pathVar);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (executable(candidate)) return candidate;
  }
  return "";
}

LineForwarder::LineForwarder(std::string prefix, int outFd, std::deque<std::string>* tail, size_t tailLines)
    : prefix_(std::move(prefix)), outFd_(outFd), tail_(tail), tailLines_(tailLines) {}

void LineForwarder::feed(std::string_view bytes) {
  pending_.append(bytes);
  size_t start = 0;
  for (size_t nl = pending_.find('\n'); nl != std::string::npos; nl = pending_.find('\n', start)) {
    emit(std::string_view(pending_).substr(start, nl - start));
    start = nl + 1;
  }
  pending_.erase(0, start);
  if (pending_.size() >= kMaxLineBytes) {
    emit(pending_);
    pending_.clear();
  }
}

void LineForwarder::finish() {
  if (!pending_.empty()) emit(pending_);
  pending_.clear();
}

void LineForwarder::emit(std::string_view line) {
  std::string out;
  out.reserve(prefix_.size() + line.size() + 1);
  out.append(prefix_).append(line).push_back('\n');
  writeAll(outFd_, out);
  if (tailLines_ == 0) return;
  tail_->emplace_back(line.substr(0, kMaxTailLineBytes));
  while (tail_->size() > tailLines_) tail_->pop_front();
}

WorkerProcess::WorkerProcess(const WorkerSpec& spec, size_t tailLines)
    : label_(spec.label),
      outForwarder_(spec.linePrefix, 1, &tail_, tailLines),
      errForwarder_(spec.linePrefix, 2, &tail_, tailLines) {
  TESSERA_CHECK(!spec.argv.empty(), "cannot start " << label_ << ": empty command line");
  const std::string path = findProgram(spec.argv[0], envValue(spec.env, "PATH"));
  TESSERA_CHECK(!path.empty(), "cannot start " << label_ << ": program '" << spec.argv[0]
                                               << "' not found or not executable (give a path, or put it on PATH)");
  // Everything the child needs is built before fork: it may not allocate.
  std::vector<std::string> argvCopy = spec.argv;
  std::vector<std::string> envCopy = spec.env;
  std::vector<char*> argv = cStrings(argvCopy);
  std::vector<char*> envp = cStrings(envCopy);
  Pipe out = makePipe();
  Pipe err = makePipe();
  Pipe execErr = makePipe();
  const pid_t parent = getpid();
  pid_ = fork();
  if (pid_ == 0) execChild(path.c_str(), argv.data(), envp.data(), parent, out.write, err.write, execErr.write);
  const int forkErrno = errno;
  closeFd(out.write);
  closeFd(err.write);
  closeFd(execErr.write);
  if (pid_ < 0) {
    closeFd(out.read);
    closeFd(err.read);
    closeFd(execErr.read);
    throw Error("cannot start " + label_ + ": fork failed: " + std::strerror(forkErrno));
  }
  // Also here, so signalGroup() works even before the child ran setpgid itself.
  setpgid(pid_, pid_);
  running_ = true;
  // The pipe closes at a successful exec (close-on-exec) or carries exec's errno.
  int execErrno = 0;
  ssize_t n;
  do {
    n = read(execErr.read, &execErrno, sizeof(execErrno));
  } while (n < 0 && errno == EINTR);
  closeFd(execErr.read);
  if (n == static_cast<ssize_t>(sizeof(execErrno))) {
    // The destructor does not run for a throwing constructor: reap and close here.
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    running_ = false;
    closeFd(out.read);
    closeFd(err.read);
    throw Error("cannot start " + label_ + ": exec " + path + ": " + std::strerror(execErrno));
  }
  outFd_ = out.read;
  errFd_ = err.read;
  fcntl(outFd_, F_SETFL, O_NONBLOCK);
  fcntl(errFd_, F_SETFL, O_NONBLOCK);
}

WorkerProcess::~WorkerProcess() {
  if (running_) {
    signalGroup(SIGKILL);
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  closeFd(outFd_);
  closeFd(errFd_);
}

bool WorkerProcess::reap() {
  if (!running_) return false;
  int status = 0;
  const pid_t done = waitpid(pid_, &status, WNOHANG);
  if (done != pid_) return false;
  running_ = false;
  status_ = ExitStatus::fromWaitStatus(status);
  return true;
}

void WorkerProcess::signalGroup(int sig) const {
  if (pid_ > 0) kill(-pid_, sig);
}

void WorkerProcess::addPollFds(std::vector<pollfd>& fds) const {
  for (int fd : {outFd_, errFd_}) {
    if (fd >= 0) fds.push_back(pollfd{fd, POLLIN, 0});
  }
}

void WorkerProcess::readFrom(int fd) {
  int& owned = fd == outFd_ ? outFd_ : errFd_;
  if (owned < 0 || owned != fd) return;
  LineForwarder& forwarder = fd == outFd_ ? outForwarder_ : errForwarder_;
  char buffer[16 * 1024];
  // Bounded, so one chatty worker cannot starve the others' output or the signal pipe.
  for (int round = 0; round < 16; ++round) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n > 0) {
      forwarder.feed(std::string_view(buffer, static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && (errno == EINTR)) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    forwarder.finish();  // EOF or a read error: this stream is over
    closeFd(owned);
    if (!outputOpen()) outputEndedAt_ = std::chrono::steady_clock::now();
    return;
  }
}

void WorkerProcess::closeOutput() {
  outForwarder_.finish();
  errForwarder_.finish();
  closeFd(outFd_);
  closeFd(errFd_);
}

}  // namespace tessera::launcher
