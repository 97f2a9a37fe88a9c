// The runner's child processes (runner_internal.h): starting, killing and
// waiting for them, the netns network (scripts/netns-cluster.sh) and the
// job's store -- a standalone tessera-store or a 3-member etcd cluster -- up
// to its health check.
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "bench/chaos/runner_internal.h"
#include "tessera/core/error.h"

namespace tessera::chaos::runner_detail {
namespace fs = std::filesystem;

// Starts argv in a new process group, stdin from /dev/null, stdout and
// stderr appended to logPath. Returns the pid (= the group id).
pid_t spawn(const std::vector<std::string>& argv, const std::string& logPath,
            const std::vector<std::pair<std::string, std::string>>& env, const std::string& header) {
  const int log = ::open(logPath.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log < 0) throw Error("cannot open " + logPath + ": " + std::strerror(errno));
  const pid_t pid = fork();
  if (pid < 0) {
    ::close(log);
    throw Error(std::string("fork failed: ") + std::strerror(errno));
  }
  if (pid == 0) {
    setpgid(0, 0);
    const int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) dup2(null, STDIN_FILENO);
    dup2(log, STDOUT_FILENO);
    dup2(log, STDERR_FILENO);
    if (!header.empty()) {
      const std::string line = header + "\n";
      (void)!::write(STDOUT_FILENO, line.data(), line.size());
    }
    for (const auto& [key, value] : env) setenv(key.c_str(), value.c_str(), 1);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    std::fprintf(stderr, "tessera-chaos: cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  setpgid(pid, pid);  // also here, so the group exists before the child runs
  ::close(log);
  return pid;
}

// Every descendant of `root` (children first found by scanning /proc).
std::vector<pid_t> descendants(pid_t root) {
  std::multimap<pid_t, pid_t> children;  // ppid -> pid
  if (DIR* proc = opendir("/proc")) {
    while (dirent* entry = readdir(proc)) {
      const pid_t pid = static_cast<pid_t>(std::atoi(entry->d_name));
      if (pid <= 0) continue;
      std::ifstream stat("/proc/" + std::string(entry->d_name) + "/stat");
      std::string content;
      std::getline(stat, content);
      // pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
      const auto close = content.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream rest(content.substr(close + 1));
      std::string state;
      pid_t ppid = 0;
      rest >> state >> ppid;
      children.emplace(ppid, pid);
    }
    closedir(proc);
  }
  std::vector<pid_t> out;
  std::vector<pid_t> frontier = {root};
  while (!frontier.empty()) {
    const pid_t p = frontier.back();
    frontier.pop_back();
    auto [begin, end] = children.equal_range(p);
    for (auto it = begin; it != end; ++it) {
      out.push_back(it->second);
      frontier.push_back(it->second);
    }
  }
  return out;
}

// SIGKILL a launcher, its process group and every descendant (workers run in
// their own groups).
void killTree(pid_t pid) {
  const std::vector<pid_t> below = descendants(pid);
  ::kill(-pid, SIGKILL);
  ::kill(pid, SIGKILL);
  for (pid_t p : below) ::kill(p, SIGKILL);
}

// Runs a helper command to completion (output appended to logPath); returns
// its exit code, and its stdout when `capture` is given.
int runCommand(const std::vector<std::string>& argv, const std::string& logPath, std::string* capture) {
  int pipeFds[2] = {-1, -1};
  if (capture != nullptr && pipe(pipeFds) != 0) throw Error(std::string("pipe failed: ") + std::strerror(errno));
  const pid_t pid = fork();
  if (pid < 0) throw Error(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    const int log = ::open(logPath.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log >= 0) {
      dup2(log, STDERR_FILENO);
      dup2(log, STDOUT_FILENO);
    }
    if (capture != nullptr) dup2(pipeFds[1], STDOUT_FILENO);
    if (capture != nullptr) {
      ::close(pipeFds[0]);
      ::close(pipeFds[1]);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  if (capture != nullptr) {
    ::close(pipeFds[1]);
    char buf[4096];
    ssize_t n;
    while ((n = ::read(pipeFds[0], buf, sizeof(buf))) > 0) capture->append(buf, static_cast<size_t>(n));
    ::close(pipeFds[0]);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

namespace {

int freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  if (fd >= 0) ::close(fd);
  if (port == 0) throw Error("cannot find a free TCP port on 127.0.0.1");
  return port;
}

}  // namespace

std::string lastLines(const std::string& path, int count) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
    if (static_cast<int>(lines.size()) > count) lines.erase(lines.begin());
  }
  std::string out;
  for (const auto& l : lines) out += "    | " + l + "\n";
  return out;
}

std::string randomHex(size_t bytes) {
  std::ifstream urandom("/dev/urandom", std::ios::binary);
  std::string out;
  static const char* digits = "0123456789abcdef";
  for (size_t i = 0; i < bytes; ++i) {
    const int c = urandom.get();
    if (c == EOF) throw Error("cannot read /dev/urandom for the join secret");
    out += digits[(c >> 4) & 15];
    out += digits[c & 15];
  }
  return out;
}

// --- the network and the store ---------------------------------------------
void Runner::setUpNetwork() {
  if (plan_.network != "netns") {
    storeHost_ = "127.0.0.1";
    return;
  }
  TESSERA_CHECK_ARG(!o_.paths.netnsScript.empty() && fs::exists(o_.paths.netnsScript),
                    "netns mode needs scripts/netns-cluster.sh (give --netns-script PATH)");
  static const char* alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  // Not from the plan's seed: two runs of one plan at once need two clusters.
  std::random_device entropy;
  tag_ = "c";
  for (int i = 0; i < 5; ++i) tag_ += alphabet[entropy() % 36];
  std::vector<std::string> up = {o_.paths.netnsScript, "up", tag_, std::to_string(plan_.slotsUsed())};
  if (!plan_.rate.empty()) up.push_back(plan_.rate);
  netnsUp_ = true;
  const int rc = runCommand(up, dir_ + "/netns.log");
  if (rc != 0) throw Error("netns-cluster.sh up failed (exit " + std::to_string(rc) + "); see " + dir_ + "/netns.log");
  storeHost_ = address("hub");
  say("network: " + std::to_string(plan_.slotsUsed()) + " namespace hosts (tag " + tag_ + ")" +
      (plan_.rate.empty() ? "" : ", links limited to " + plan_.rate) + ", store in the hub at " + storeHost_);
}

std::string Runner::address(const std::string& which) {
  std::string out;
  const int rc = runCommand({o_.paths.netnsScript, "addr", tag_, which}, dir_ + "/netns.log", &out);
  if (rc != 0 || trim(out).empty()) throw Error("netns-cluster.sh addr " + tag_ + " " + which + " failed");
  return trim(out);
}

std::vector<std::string> Runner::inHost(const std::string& which, std::vector<std::string> argv) {
  if (plan_.network != "netns") return argv;
  std::vector<std::string> wrapped = {o_.paths.netnsScript, "exec", tag_, which, "--"};
  wrapped.insert(wrapped.end(), argv.begin(), argv.end());
  return wrapped;
}

void Runner::startStore() {
  if (plan_.store == "etcd") return startEtcd();
  const int port = freePort();
  // In the hub namespace the store must be reachable from every host.
  const std::vector<std::string> argv = {o_.paths.tesseraStore, "--host",
                                         plan_.network == "netns" ? "0.0.0.0" : "127.0.0.1", "--port",
                                         std::to_string(port)};
  std::vector<std::pair<std::string, std::string>> env;
  if (!tokenPath_.empty()) env.emplace_back("TESSERA_JOIN_TOKEN_FILE", tokenPath_);
  const std::string log = dir_ + "/store.log";
  storePid_ = spawn(inHost("hub", argv), log, env, "");
  storeEndpoint_ = storeHost_ + ":" + std::to_string(port);
  const double deadline = unixNow() + 30;
  while (unixNow() < deadline) {
    std::ifstream in(log);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (content.find("listening on") != std::string::npos) return;
    int status = 0;
    if (waitpid(storePid_, &status, WNOHANG) == storePid_) {
      storePid_ = -1;
      throw Error("tessera-store exited before listening:\n" + lastLines(log, 10));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw Error("tessera-store did not print 'listening on' within 30 s; see " + log);
}

void Runner::startEtcd() {
  const int members = 3;
  std::vector<int> clientPorts, peerPorts;
  std::string cluster;
  for (int i = 0; i < members; ++i) {
    clientPorts.push_back(freePort());
    peerPorts.push_back(freePort());
    cluster += (i ? "," : "") + std::string("e") + std::to_string(i) + "=http://127.0.0.1:" +
               std::to_string(peerPorts[i]);
  }
  const std::string bind = plan_.network == "netns" ? "0.0.0.0" : "127.0.0.1";
  runId_ = "chaos-" + randomHex(4);
  for (int i = 0; i < members; ++i) {
    const std::string name = "e" + std::to_string(i);
    const std::string client = std::to_string(clientPorts[i]);
    const std::vector<std::string> argv = {o_.paths.etcd,
                                           "--name", name,
                                           "--data-dir", dir_ + "/etcd/" + name,
                                           "--listen-client-urls", "http://" + bind + ":" + client,
                                           "--advertise-client-urls", "http://" + storeHost_ + ":" + client,
                                           "--listen-peer-urls", "http://127.0.0.1:" + std::to_string(peerPorts[i]),
                                           "--initial-advertise-peer-urls",
                                           "http://127.0.0.1:" + std::to_string(peerPorts[i]),
                                           "--initial-cluster", cluster,
                                           "--initial-cluster-token", runId_,
                                           "--initial-cluster-state", "new",
                                           "--logger", "zap",
                                           "--log-outputs", "stderr"};
    etcdPids_.push_back(spawn(inHost("hub", argv), dir_ + "/etcd-" + std::to_string(i) + ".log", {}, ""));
    etcdEndpoints_ += (i ? "," : "") + storeHost_ + ":" + client;
  }
  storeEndpoint_ = etcdEndpoints_;
  std::string urls;
  for (int port : clientPorts) urls += (urls.empty() ? "" : ",") + std::string("http://") + storeHost_ + ":" + std::to_string(port);
  const double deadline = unixNow() + 30;
  while (unixNow() < deadline) {
    std::string out;
    if (runCommand(inHost("hub", {o_.paths.etcdctl, "--endpoints", urls, "--dial-timeout", "1s", "endpoint", "health"}),
                   dir_ + "/etcd-health.log", &out) == 0) {
      say("etcd cluster of " + std::to_string(members) + " members up at " + etcdEndpoints_ + " (run id " + runId_ +
          ")");
      return;
    }
    for (pid_t pid : etcdPids_) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        throw Error("an etcd member exited before the cluster was healthy (is etcd-server installed? "
                    "scripts/setup.sh installs it):\n" + lastLines(dir_ + "/etcd-0.log", 10));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  throw Error("the etcd cluster was not healthy within 30 s; see " + dir_ + "/etcd-*.log and etcd-health.log");
}

}  // namespace tessera::chaos::runner_detail
