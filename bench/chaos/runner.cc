#include "bench/chaos/runner.h"

#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

volatile sig_atomic_t gInterrupted = 0;
void onSignal(int) { gInterrupted = 1; }

double unixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string humanBytes(double bytes) {
  char buf[64];
  if (bytes >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.2f GB", bytes / 1e9);
  } else if (bytes >= 1e6) {
    std::snprintf(buf, sizeof(buf), "%.1f MB", bytes / 1e6);
  } else if (bytes >= 1e3) {
    std::snprintf(buf, sizeof(buf), "%.1f kB", bytes / 1e3);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f B", bytes);
  }
  return buf;
}

std::string joinList(const json& list) {
  std::string out;
  if (!list.is_array()) return out;
  for (const auto& v : list) out += (out.empty() ? "" : ",") + (v.is_string() ? v.get<std::string>() : v.dump());
  return out;
}

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
int runCommand(const std::vector<std::string>& argv, const std::string& logPath, std::string* capture = nullptr) {
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

  std::string run() {
    prepare();
    struct sigaction action {};
    action.sa_handler = onSignal;
    struct sigaction oldInt {}, oldTerm {};
    sigaction(SIGINT, &action, &oldInt);
    sigaction(SIGTERM, &action, &oldTerm);
    gInterrupted = 0;
    std::string reason;
    try {
      setUpNetwork();
      startStore();
      say("store listening on " + storeEndpoint_ + (plan_.joinToken ? " (join secret in join-token)" : ""));
      for (int slot = 0; slot < plan_.nodes; ++slot) startNode(slot, "start");
      reason = loop();
    } catch (...) {
      cleanUp("error");
      sigaction(SIGINT, &oldInt, nullptr);
      sigaction(SIGTERM, &oldTerm, nullptr);
      throw;
    }
    cleanUp(reason);
    sigaction(SIGINT, &oldInt, nullptr);
    sigaction(SIGTERM, &oldTerm, nullptr);
    return reason;
  }

 private:
  // --- setup -------------------------------------------------------------
  void prepare() {
    fs::create_directories(o_.outDir);
    dir_ = fs::absolute(o_.outDir).string();
    for (const auto& entry : fs::directory_iterator(dir_)) {
      const std::string name = entry.path().filename().string();
      const bool ours = name == "chaos.jsonl" || name == "store.log" || name == "netns.log" ||
                        name == "join-token" || (name.rfind("node", 0) == 0 &&
                                                 (name.find(".jsonl") != std::string::npos ||
                                                  name.find(".log") != std::string::npos));
      if (ours && entry.is_regular_file()) fs::remove(entry.path());
    }
    fs::remove_all(dir_ + "/raw");
    fs::create_directories(dir_ + "/raw");
    journal_.open(dir_ + "/chaos.jsonl", std::ios::app);
    if (!journal_) throw Error("cannot write " + dir_ + "/chaos.jsonl");
    const JobShape shape = readJobShape(plan_);
    t0_ = unixNow();
    json start = {{"type", "start"},
                  {"unix", t0_},
                  {"plan", plan_.path},
                  {"config", plan_.config},
                  {"nodes", plan_.nodes},
                  {"nproc_per_node", plan_.nprocPerNode},
                  {"min_nodes", plan_.minNodes},
                  {"max_nodes", plan_.maxNodes},
                  {"network", plan_.network},
                  {"rate_bps", plan_.rate.empty() ? 0.0 : parseRateBitsPerSecond(plan_.rate)},
                  {"steps", shape.steps},
                  {"tokens_per_node_step", shape.tokensPerNodeStep},
                  {"outer_bytes_per_param", shape.outerBytesPerParameter}};
    record(start);
    if (plan_.joinToken) {
      tokenPath_ = dir_ + "/join-token";
      {
        std::ofstream token(tokenPath_);
        token << randomHex(32) << "\n";
      }
      ::chmod(tokenPath_.c_str(), 0600);
    }
    nextSoakKill_ = plan_.soak.kills > 0 ? t0_ + plan_.soak.startAfterSeconds + drawGap() : -1;
  }

  double drawGap() { return std::exponential_distribution<double>(1.0 / plan_.soak.mtbfSeconds)(rng_); }

  void setUpNetwork() {
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

  std::string address(const std::string& which) {
    std::string out;
    const int rc = runCommand({o_.paths.netnsScript, "addr", tag_, which}, dir_ + "/netns.log", &out);
    if (rc != 0 || trim(out).empty()) throw Error("netns-cluster.sh addr " + tag_ + " " + which + " failed");
    return trim(out);
  }

  std::vector<std::string> inHost(const std::string& which, std::vector<std::string> argv) {
    if (plan_.network != "netns") return argv;
    std::vector<std::string> wrapped = {o_.paths.netnsScript, "exec", tag_, which, "--"};
    wrapped.insert(wrapped.end(), argv.begin(), argv.end());
    return wrapped;
  }

  void startStore() {
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

  // --- nodes -------------------------------------------------------------
  void startNode(int slot, const std::string& why) {
    Incarnation inc;
    inc.slot = slot;
    inc.index = launches_[slot]++;
    inc.metricsName = "node" + std::to_string(slot) + "-" + std::to_string(inc.index) + ".jsonl";
    inc.rawPath = dir_ + "/raw/" + inc.metricsName;
    inc.archive = std::make_shared<std::ofstream>(dir_ + "/" + inc.metricsName, std::ios::app);
    const int maxNodes = plan_.maxNodes > 0 ? plan_.maxNodes : plan_.slotsUsed();
    std::vector<std::string> argv = {o_.paths.tesseraRun,
                                     "--nnodes",
                                     std::to_string(plan_.minNodes) + ":" + std::to_string(maxNodes),
                                     "--nproc-per-node",
                                     std::to_string(plan_.nprocPerNode),
                                     "--rdzv-endpoint",
                                     storeEndpoint_,
                                     "--node-rank",
                                     std::to_string(slot),
                                     "--advertise-host",
                                     plan_.network == "netns" ? address(std::to_string(slot)) : "127.0.0.1"};
    if (!tokenPath_.empty()) {
      argv.push_back("--join-token-file");
      argv.push_back(tokenPath_);
    }
    argv.push_back(o_.paths.tesseraTrain);
    argv.push_back("--config");
    argv.push_back(plan_.config);
    if (plan_.steps > 0) {
      argv.push_back("--set");
      argv.push_back("train.steps=" + std::to_string(plan_.steps));
    }
    for (const auto& o : plan_.overrides) {
      argv.push_back("--set");
      argv.push_back(o);
    }
    for (const auto& [key, value] : plan_.elastic) {
      argv.push_back("--set");
      argv.push_back("elastic." + key + "=" + value);
    }
    argv.push_back("--metrics");
    argv.push_back(inc.rawPath);
    auto fault = plan_.nodeFaults.find(slot);
    if (fault != plan_.nodeFaults.end() && !fault->second.empty()) {
      argv.push_back("--fault");
      argv.push_back(fault->second);
    }
    std::vector<std::pair<std::string, std::string>> env;
    env.emplace_back("TESSERA_ADVERTISE_HOST", plan_.network == "netns" ? address(std::to_string(slot)) : "127.0.0.1");
    std::ostringstream header;
    header << "==== tessera-chaos: node " << slot << " incarnation " << inc.index << " (" << why << ") at "
           << since() << " s:";
    for (const auto& a : argv) header << " " << a;
    inc.pid = spawn(inHost(std::to_string(slot), argv), dir_ + "/node" + std::to_string(slot) + ".log", env,
                    header.str());
    inc.running = true;
    inc.launchUnix = unixNow();
    record({{"type", "launch"},
            {"node", slot},
            {"incarnation", inc.index},
            {"unix", unixNow()},
            {"pid", inc.pid},
            {"metrics", inc.metricsName}});
    incarnations_.push_back(std::move(inc));
  }

  Incarnation* current(int slot) {
    Incarnation* found = nullptr;
    for (auto& inc : incarnations_) {
      if (inc.slot == slot) found = &inc;
    }
    return found;
  }
  bool isRunning(int slot) {
    Incarnation* inc = current(slot);
    return inc != nullptr && inc->running;
  }
  int runningCount() {
    int n = 0;
    for (const auto& inc : incarnations_) n += inc.running ? 1 : 0;
    return n;
  }

  // --- events ------------------------------------------------------------
  // Returns false when the action must wait (a restart of a node still running).
  bool perform(const std::string& action, int slot, const std::string& rate) {
    if (jobFinished_ && (action == "restart" || action == "join")) {
      say(action + " node " + std::to_string(slot) + ": skipped, training already finished");
      return true;
    }
    if (action == "kill" || action == "leave") {
      Incarnation* inc = current(slot);
      if (inc == nullptr || !inc->running) {
        say(action + " node " + std::to_string(slot) + ": skipped, it is not running");
        return true;
      }
      inc->killedByUs = true;
      if (action == "kill") {
        killTree(inc->pid);
        if (plan_.network == "netns") runCommand({o_.paths.netnsScript, "kill", tag_, std::to_string(slot)}, dir_ + "/netns.log");
        failureTimes_[slot] = unixNow();
      } else {
        ::kill(inc->pid, SIGTERM);  // the launcher forwards it; workers announce their leave
        failureTimes_[slot] = unixNow();
      }
      recordAction(action, slot, "");
      say(action == "kill" ? "kill node " + std::to_string(slot) + " (SIGKILL launcher + workers)"
                           : "node " + std::to_string(slot) + " leaves (SIGTERM)");
      awaitingResume_ = true;
      return true;
    }
    if (action == "restart" || action == "join") {
      if (isRunning(slot)) return false;
      recordAction(action, slot, "");
      startNode(slot, action);
      say((action == "join" ? "join: start node " : "restart node ") + std::to_string(slot) + " (incarnation " +
          std::to_string(current(slot)->index) + ")");
      restartTimes_[slot] = unixNow();
      return true;
    }
    // Link actions (netns only; the plan loader refused them otherwise).
    std::vector<std::string> argv = {o_.paths.netnsScript};
    std::string what;
    if (action == "partition" || action == "heal") {
      argv.insert(argv.end(), {"link", tag_, std::to_string(slot), action == "partition" ? "down" : "up"});
      what = action == "partition" ? "partition: node " + std::to_string(slot) + "'s link down"
                                   : "heal: node " + std::to_string(slot) + "'s link up";
    } else {
      argv.insert(argv.end(), {"throttle", tag_, std::to_string(slot), rate});
      what = "throttle node " + std::to_string(slot) + "'s link to " + rate;
    }
    const int rc = runCommand(argv, dir_ + "/netns.log");
    recordAction(action, slot, rc == 0 ? rate : "failed");
    say(what + (rc == 0 ? "" : " FAILED (see netns.log)"));
    return true;
  }

  void fireDueEvents() {
    const double now = unixNow();
    for (size_t i = 0; i < plan_.events.size(); ++i) {
      if (fired_.count(i) != 0) continue;
      const ChaosEvent& e = plan_.events[i];
      const bool due = (e.atSeconds >= 0 && now - t0_ >= e.atSeconds) || (e.atStep >= 0 && maxStep_ >= e.atStep);
      if (!due) continue;
      if (perform(e.action, e.node, e.rate)) {
        fired_.insert(i);
      } else if (waitingNoted_.insert(i).second) {
        say(e.action + " node " + std::to_string(e.node) + ": waiting for its previous launcher to exit");
      }
    }
    // Soak: random kills, each followed by a restart.
    for (auto it = soakRestarts_.begin(); it != soakRestarts_.end();) {
      if (now >= it->second && perform("restart", it->first, "")) {
        it = soakRestarts_.erase(it);
      } else {
        ++it;
      }
    }
    if (nextSoakKill_ > 0 && now >= nextSoakKill_ && !jobFinished_) {
      // Never kill below min_nodes nodes that hold the training state
      // (members of the latest decision): a joiner has nothing to give, and
      // killing every holder ends the job rather than testing recovery.
      std::vector<int> candidates;
      int holders = 0;
      for (const auto& inc : incarnations_) {
        if (inc.running && holdsState(inc)) ++holders;
      }
      for (const auto& inc : incarnations_) {
        if (!inc.running || soakRestarts_.count(inc.slot) != 0) continue;
        if (!holdsState(inc) || holders - 1 >= plan_.minNodes) candidates.push_back(inc.slot);
      }
      if (!candidates.empty()) {
        const int slot = candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(rng_)];
        ++soakKills_;
        say("soak kill " + std::to_string(soakKills_) + "/" + std::to_string(plan_.soak.kills));
        perform("kill", slot, "");
        soakRestarts_[slot] = now + plan_.soak.restartAfterSeconds;
        nextSoakKill_ = soakKills_ < plan_.soak.kills ? now + drawGap() : -1;
      } else {
        nextSoakKill_ = now + 1.0;  // too few nodes alive: try again shortly
      }
    }
  }

  // With no node running: is a start still to come? Only a timed one can
  // fire (step triggers need a running node's metrics).
  // A member of the latest decision seen, launched before it.
  bool holdsState(const Incarnation& inc) const {
    if (inc.launchUnix > latestMembershipUnix_) return false;
    for (const auto& member : latestMembers_) {
      if (member.substr(0, member.find('.')) == std::to_string(inc.slot)) return true;
    }
    return false;
  }

  bool startsPending() const {
    if (jobFinished_) return false;
    if (!soakRestarts_.empty()) return true;
    for (size_t i = 0; i < plan_.events.size(); ++i) {
      const ChaosEvent& e = plan_.events[i];
      if (fired_.count(i) == 0 && (e.action == "restart" || e.action == "join") && e.atSeconds >= 0) return true;
    }
    return false;
  }

  // --- watching ----------------------------------------------------------
  void reap() {
    int status = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      if (pid == storePid_) {
        storePid_ = -1;
        say("the store exited unexpectedly; see store.log");
        continue;
      }
      for (auto& inc : incarnations_) {
        if (inc.pid != pid || !inc.running) continue;
        inc.running = false;
        tail(inc);  // the last lines it wrote
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
        record({{"type", "exit"}, {"node", inc.slot}, {"incarnation", inc.index}, {"unix", unixNow()}, {"code", code}});
        const std::string log = dir_ + "/node" + std::to_string(inc.slot) + ".log";
        if (code == 0 && inc.killedByUs) {
          say("node " + std::to_string(inc.slot) + " left the job");  // a graceful leave exits 0
        } else if (code == 0) {
          if (!jobFinished_) finishedAt_ = unixNow();
          jobFinished_ = true;
          say("node " + std::to_string(inc.slot) + " finished training");
        } else if (inc.killedByUs) {
          say("node " + std::to_string(inc.slot) + " is down (" +
              (code < 0 ? "signal " + std::to_string(-code) : "exit " + std::to_string(code)) + ")");
        } else {
          say("node " + std::to_string(inc.slot) + " FAILED (" +
              (code < 0 ? "signal " + std::to_string(-code) : "exit " + std::to_string(code)) + "); last lines of " +
              log + ":\n" + lastLines(log, 8));
        }
      }
    }
  }

  void tail(Incarnation& inc) {
    const int fd = ::open(inc.rawPath.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st {};
    char buf[65536];
    bool rewritten = fstat(fd, &st) == 0 && st.st_size < inc.offset;
    if (!rewritten && !inc.head.empty()) {
      const ssize_t n = ::pread(fd, buf, inc.head.size(), 0);
      rewritten = n != static_cast<ssize_t>(inc.head.size()) || inc.head.compare(0, inc.head.size(), buf, n) != 0;
    }
    if (rewritten) {  // restarted workers truncated it: read the new content from the start
      say("node " + std::to_string(inc.slot) + ": its launcher restarted the workers (evicted or failed); they rejoin");
      inc.offset = 0;
      inc.partial.clear();
      inc.head.clear();
    }
    ssize_t n;
    while ((n = ::pread(fd, buf, sizeof(buf), inc.offset)) > 0) {
      inc.offset += n;
      inc.partial.append(buf, static_cast<size_t>(n));
    }
    if (inc.head.empty() && inc.offset >= 64) {
      if (::pread(fd, buf, 64, 0) == 64) inc.head.assign(buf, 64);
    }
    ::close(fd);
    size_t newline;
    while ((newline = inc.partial.find('\n')) != std::string::npos) {
      const std::string line = inc.partial.substr(0, newline);
      inc.partial.erase(0, newline + 1);
      *inc.archive << line << "\n";
      inc.archive->flush();
      const int64_t index = inc.lines++;
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) continue;
      onLine(inc, index, j);
    }
  }

  void onLine(const Incarnation& inc, int64_t index, const json& j) {
    const double now = unixNow();
    const std::string node = "node " + std::to_string(inc.slot);
    if (!j.contains("event")) {
      if (!j.contains("step")) return;
      record({{"type", "seen"}, {"node", inc.slot}, {"incarnation", inc.index}, {"line", index}, {"unix", now}});
      const int64_t step = j.value("step", int64_t{0});
      maxStep_ = std::max(maxStep_, step);
      lastLoss_[inc.slot] = j.value("loss", 0.0);
      return;
    }
    const std::string event = j.value("event", "");
    if (event == "membership") {
      const int64_t epoch = j.value("epoch", int64_t{0});
      if (!epochsSeen_.insert(epoch).second) return;
      if (epoch >= latestEpoch_) {
        latestEpoch_ = epoch;
        latestMembershipUnix_ = now;
        latestMembers_.clear();
        for (const auto& m : j.value("members", json::array())) {
          if (m.is_string()) latestMembers_.push_back(m.get<std::string>());
        }
      }
      std::string line = "membership epoch " + std::to_string(epoch) + " at outer step " +
                         std::to_string(j.value("outer_step", int64_t{0})) + ": members [" +
                         joinList(j.value("members", json::array())) + "]";
      if (j.contains("joined") && !j["joined"].empty()) line += ", joined [" + joinList(j["joined"]) + "]";
      if (j.contains("dropped") && !j["dropped"].empty()) line += ", dropped [" + joinList(j["dropped"]) + "]";
      say(line);
    } else if (event == "recovered") {
      const double bytes = j.value("bytes", 0.0);
      const double seconds = j.value("seconds", 0.0);
      char buf[256];
      std::snprintf(buf, sizeof(buf), " rejoined (recovered %s from %s in %.2f s, %s/s)", humanBytes(bytes).c_str(),
                    j.value("from", std::string("?")).c_str(), seconds,
                    humanBytes(seconds > 0 ? bytes / seconds : 0).c_str());
      std::string line = node + buf;
      auto restarted = restartTimes_.find(inc.slot);
      if (restarted != restartTimes_.end()) {
        std::snprintf(buf, sizeof(buf), ", %.1f s after its start", j.value("time_s", now) - restarted->second);
        line += buf;
      }
      say(line);
    } else if (event == "retry") {
      const auto key = std::make_pair(j.value("outer_step", int64_t{0}), j.value("attempt", 0));
      if (!retriesSeen_.insert(key).second) return;
      say("outer step " + std::to_string(key.first) + " attempt " + std::to_string(key.second) +
          " failed: " + j.value("error", std::string("?")) + " (retrying)");
    } else if (event == "outer_step") {
      const int64_t k = j.value("outer_step", int64_t{0});
      if (!commitsSeen_.insert(k).second) return;
      std::ostringstream line;
      line << "outer step " << k << " committed (step " << j.value("step", int64_t{0}) << ", epoch "
           << j.value("epoch", int64_t{0});
      if (j.value("attempts", 1) > 1) line << ", " << j.value("attempts", 1) << " attempts";
      auto loss = lastLoss_.find(inc.slot);
      if (loss != lastLoss_.end()) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), ", loss %.3f", loss->second);
        line << buf;
      }
      line << ")";
      if (awaitingResume_ && !failureTimes_.empty()) {
        double latest = 0;
        for (const auto& [slot, t] : failureTimes_) latest = std::max(latest, t);
        const double at = j.value("time_s", now);
        if (at > latest) {
          char buf[96];
          std::snprintf(buf, sizeof(buf), ": training resumed %.1f s after the last failure", at - latest);
          line << buf;
          awaitingResume_ = false;
        }
      }
      say(line.str());
    } else if (event == "served") {
      say(node + " served its state to " + j.value("to", std::string("?")) + " (" +
          humanBytes(j.value("bytes", 0.0)) + ")");
    }
  }

  std::string loop() {
    while (true) {
      if (gInterrupted) return "interrupted";
      const double now = unixNow();
      if (now - t0_ > plan_.timeoutSeconds) {
        say("timeout after " + std::to_string(static_cast<int>(plan_.timeoutSeconds)) + " s: stopping everything");
        return "timeout";
      }
      reap();
      for (auto& inc : incarnations_) {
        if (inc.running) tail(inc);
      }
      fireDueEvents();
      if (plan_.soak.kills > 0 && plan_.soak.stopWhenDone && soakKills_ >= plan_.soak.kills && soakRestarts_.empty() &&
          !jobFinished_) {
        if (soakDoneAt_ == 0) soakDoneAt_ = now;
        if (now - soakDoneAt_ > plan_.soak.settleSeconds) {
          say("soak done: " + std::to_string(soakKills_) + " kills; stopping the job");
          return "soak-complete";
        }
      }
      if (runningCount() == 0 && !startsPending()) {
        return jobFinished_ ? "finished" : "failed";
      }
      if (jobFinished_ && runningCount() > 0 && now - finishedAt_ > o_.finishGraceSeconds) {
        if (!stopping_) {
          say("training finished elsewhere " + std::to_string(static_cast<int>(o_.finishGraceSeconds)) +
              " s ago: stopping the remaining nodes (SIGTERM)");
          for (auto& inc : incarnations_) {
            if (inc.running) ::kill(inc.pid, SIGTERM);
          }
          stopping_ = true;
          stopAt_ = now;
        } else if (now - stopAt_ > 10) {
          for (auto& inc : incarnations_) {
            if (inc.running) killTree(inc.pid);
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  void cleanUp(const std::string& reason) {
    for (auto& inc : incarnations_) {
      if (inc.running) killTree(inc.pid);
    }
    if (storePid_ > 0) killTree(storePid_);
    const double deadline = unixNow() + 10;
    for (auto& inc : incarnations_) {
      while (inc.running && unixNow() < deadline) {
        int status = 0;
        const pid_t r = waitpid(inc.pid, &status, WNOHANG);
        if (r == inc.pid || r < 0) {
          inc.running = false;
          tail(inc);
          record({{"type", "exit"},
                  {"node", inc.slot},
                  {"incarnation", inc.index},
                  {"unix", unixNow()},
                  {"code", WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status)}});
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    }
    if (storePid_ > 0) {
      int status = 0;
      waitpid(storePid_, &status, 0);
      storePid_ = -1;
    }
    if (netnsUp_) {
      runCommand({o_.paths.netnsScript, "down", tag_}, dir_ + "/netns.log");
      netnsUp_ = false;
    }
    record({{"type", "end"}, {"unix", unixNow()}, {"reason", reason}});
  }

  // --- output ------------------------------------------------------------
  void recordAction(const std::string& action, int slot, const std::string& detail) {
    json j = {{"type", "action"}, {"action", action}, {"node", slot}, {"unix", unixNow()}};
    if (!detail.empty()) j["detail"] = detail;
    record(j);
  }
  void record(const json& j) {
    journal_ << j.dump() << "\n";
    journal_.flush();
  }
  double since() const { return unixNow() - t0_; }
  void say(const std::string& what) {
    std::printf("[chaos%s %6.1fs] %s\n", o_.label.empty() ? "" : (" " + o_.label).c_str(), since(), what.c_str());
    std::fflush(stdout);
  }

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

}  // namespace

JobShape readJobShape(const ChaosPlan& plan) {
  toml::table config;
  try {
    config = toml::parse_file(plan.config);
  } catch (const toml::parse_error& e) {
    throw InvalidArgument("cannot parse " + plan.config + ": " + std::string(e.description()));
  }
  std::map<std::string, double> values = {{"data.batch_size", 0}, {"data.seq_len", 0}, {"train.grad_accum", 1},
                                          {"train.steps", 0}};
  for (auto& [key, value] : values) {
    if (auto v = config.at_path(key).value<double>()) value = *v;
  }
  for (const auto& o : plan.overrides) {
    const auto eq = o.find('=');
    const std::string key = trim(o.substr(0, eq));
    if (values.count(key) == 0) continue;
    try {
      values[key] = std::stod(trim(o.substr(eq + 1)));
    } catch (const std::exception&) {
      throw ConfigError("job.overrides", "'" + o + "': " + key + " must be a number");
    }
  }
  std::string compression = config.at_path("diloco.compression").value_or(std::string("none"));
  for (const auto& o : plan.overrides) {
    const auto eq = o.find('=');
    if (trim(o.substr(0, eq)) != "diloco.compression") continue;
    compression = trim(o.substr(eq + 1));
    compression.erase(std::remove(compression.begin(), compression.end(), '"'), compression.end());
  }
  JobShape shape;
  shape.outerBytesPerParameter = compression == "int8" ? 1.0 : compression == "none" ? 4.0 : 0.0;
  shape.steps = plan.steps > 0 ? plan.steps : static_cast<int64_t>(values["train.steps"]);
  shape.tokensPerNodeStep =
      values["data.batch_size"] * values["data.seq_len"] * values["train.grad_accum"] * plan.nprocPerNode;
  return shape;
}

std::string runChaos(const ChaosPlan& plan, const RunnerOptions& options) {
  Runner runner(plan, options);
  return runner.run();
}

}  // namespace tessera::chaos
