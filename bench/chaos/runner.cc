// The run from start to end (runner.h): the output folder and the journal,
// the node launches, the main loop and the clean-up; readJobShape. The store
// and the network are set up in store_processes.cc, the plan's events and the
// soak fire from events.cc, and watch.cc follows what the nodes write.
#include "bench/chaos/runner.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

#include "bench/chaos/runner_internal.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

volatile sig_atomic_t gInterrupted = 0;
void onSignal(int) { gInterrupted = 1; }

}  // namespace

namespace runner_detail {

std::string Runner::run() {
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

// --- setup -------------------------------------------------------------
void Runner::prepare() {
  fs::create_directories(o_.outDir);
  dir_ = fs::absolute(o_.outDir).string();
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    const bool ours = name == "chaos.jsonl" || name == "store.log" || name == "netns.log" ||
                      (name.rfind("etcd-", 0) == 0 && name.find(".log") != std::string::npos) ||
                      name == "join-token" || (name.rfind("node", 0) == 0 &&
                                               (name.find(".jsonl") != std::string::npos ||
                                                name.find(".log") != std::string::npos));
    if (ours && entry.is_regular_file()) fs::remove(entry.path());
  }
  fs::remove_all(dir_ + "/raw");
  fs::remove_all(dir_ + "/etcd");
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
                {"outer_bytes_per_param", shape.outerBytesPerParameter},
                {"store", plan_.store}};
  // The report's targets depend on the heartbeat (silent losses: timeout + 1 s).
  for (const char* key : {"heartbeat_interval_s", "heartbeat_timeout_s"}) {
    auto it = plan_.elastic.find(key);
    if (it != plan_.elastic.end()) start[key] = std::atof(it->second.c_str());
  }
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

// --- nodes -------------------------------------------------------------
void Runner::startNode(int slot, const std::string& why) {
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
                                   "--max-restarts",
                                   std::to_string(plan_.maxRestarts),
                                   "--rdzv-endpoint",
                                   storeEndpoint_,
                                   "--node-rank",
                                   std::to_string(slot),
                                   "--advertise-host",
                                   plan_.network == "netns" ? address(std::to_string(slot)) : "127.0.0.1"};
  if (plan_.store == "etcd") {
    argv.insert(argv.end(), {"--rdzv-backend", "etcd", "--rdzv-id", runId_});
  }
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

Incarnation* Runner::current(int slot) {
  Incarnation* found = nullptr;
  for (auto& inc : incarnations_) {
    if (inc.slot == slot) found = &inc;
  }
  return found;
}

bool Runner::isRunning(int slot) {
  Incarnation* inc = current(slot);
  return inc != nullptr && inc->running;
}

int Runner::runningCount() {
  int n = 0;
  for (const auto& inc : incarnations_) n += inc.running ? 1 : 0;
  return n;
}

// --- the loop and the end ---------------------------------------------
std::string Runner::loop() {
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

void Runner::cleanUp(const std::string& reason) {
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
  for (pid_t& pid : etcdPids_) {
    if (pid <= 0) continue;
    killTree(pid);
    int status = 0;
    waitpid(pid, &status, 0);
    pid = -1;
  }
  std::error_code ignored;
  fs::remove_all(dir_ + "/etcd", ignored);
  if (netnsUp_) {
    runCommand({o_.paths.netnsScript, "down", tag_}, dir_ + "/netns.log");
    netnsUp_ = false;
  }
  record({{"type", "end"}, {"unix", unixNow()}, {"reason", reason}});
}

// --- output ------------------------------------------------------------
void Runner::recordAction(const std::string& action, int slot, const std::string& detail) {
  json j = {{"type", "action"}, {"action", action}, {"node", slot}, {"unix", unixNow()}};
  if (!detail.empty()) j["detail"] = detail;
  record(j);
}

void Runner::record(const json& j) {
  journal_ << j.dump() << "\n";
  journal_.flush();
}

double Runner::since() const { return unixNow() - t0_; }

void Runner::say(const std::string& what) {
  std::printf("[chaos%s %6.1fs] %s\n", o_.label.empty() ? "" : (" " + o_.label).c_str(), since(), what.c_str());
  std::fflush(stdout);
}

}  // namespace runner_detail

using runner_detail::Runner;
using runner_detail::trim;

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
