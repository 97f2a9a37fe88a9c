// The plan's events (kill, kill_workers, leave, restart, join and the link
// actions) fired at their time or step, and the soak: random kills drawn
// from the plan's seed at exponential gaps, each (but a workers kill)
// followed by a restart, never below min_nodes nodes that hold the state.
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench/chaos/runner_internal.h"

namespace tessera::chaos::runner_detail {
namespace fs = std::filesystem;

double Runner::drawGap() { return std::exponential_distribution<double>(1.0 / plan_.soak.mtbfSeconds)(rng_); }

std::string Runner::drawKind() {
  const auto& kinds = plan_.soak.kinds;
  if (kinds.size() <= 1) return kinds.empty() ? "node" : kinds.front();
  std::vector<double> weights = plan_.soak.weights;
  if (weights.size() != kinds.size()) weights.assign(kinds.size(), 1.0);
  return kinds[std::discrete_distribution<size_t>(weights.begin(), weights.end())(rng_)];
}

int Runner::killWorkers(pid_t launcher) {
  // /proc/<pid>/comm holds the first 15 characters of the executable's name.
  const std::string name = fs::path(o_.paths.tesseraTrain).filename().string().substr(0, 15);
  int killed = 0;
  for (pid_t pid : descendants(launcher)) {
    std::ifstream comm("/proc/" + std::to_string(pid) + "/comm");
    std::string command;
    std::getline(comm, command);
    if (command == name && ::kill(pid, SIGKILL) == 0) ++killed;
  }
  return killed;
}

bool Runner::perform(const std::string& action, int slot, const std::string& rate) {
  if (jobFinished_ && (action == "restart" || action == "join")) {
    say(action + " node " + std::to_string(slot) + ": skipped, training already finished");
    return true;
  }
  if (action == "kill_workers") {
    Incarnation* inc = current(slot);
    const int killed = inc != nullptr && inc->running ? killWorkers(inc->pid) : 0;
    if (killed == 0) return false;  // between a restart and its workers' start: try again later
    failureTimes_[slot] = unixNow();
    lastKill_[slot] = unixNow();
    recordAction(action, slot, std::to_string(killed) + " worker(s)");
    say("kill the workers of node " + std::to_string(slot) + " (SIGKILL " + std::to_string(killed) +
        " process(es); its launcher lives on and restarts them)");
    awaitingResume_ = true;
    return true;
  }
  if (action == "kill" || action == "leave") {
    Incarnation* inc = current(slot);
    if (inc == nullptr || !inc->running) {
      say(action + " node " + std::to_string(slot) + ": skipped, it is not running");
      return true;
    }
    lastKill_[slot] = unixNow();
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

void Runner::fireDueEvents() {
  const double now = unixNow();
  for (size_t i = 0; i < plan_.events.size(); ++i) {
    if (fired_.count(i) != 0) continue;
    const ChaosEvent& e = plan_.events[i];
    const bool due = (e.atSeconds >= 0 && now - t0_ >= e.atSeconds) || (e.atStep >= 0 && maxStep_ >= e.atStep);
    if (!due) continue;
    if (perform(e.action, e.node, e.rate)) {
      fired_.insert(i);
    } else if (waitingNoted_.insert(i).second) {
      say(e.action + " node " + std::to_string(e.node) +
          (e.action == "kill_workers" ? ": waiting for its workers to start" : ": waiting for its previous launcher to exit"));
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
      const std::string kind = drawKind();
      // A worker kill that finds none running (the launcher is between a
      // restart and its workers' start) does not count: it is drawn again.
      const bool landed = kind == "workers" ? perform("kill_workers", slot, "")  // its launcher restarts them
                                            : perform("kill", slot, "");
      if (landed) {
        ++soakKills_;
        say("soak kill " + std::to_string(soakKills_) + "/" + std::to_string(plan_.soak.kills) + " (" + kind + ")");
        if (kind != "workers") soakRestarts_[slot] = now + plan_.soak.restartAfterSeconds;
        nextSoakKill_ = soakKills_ < plan_.soak.kills ? now + drawGap() : -1;
      } else {
        nextSoakKill_ = now + 1.0;
      }
    } else {
      nextSoakKill_ = now + 1.0;  // too few nodes alive: try again shortly
    }
  }
}

bool Runner::holdsState(const Incarnation& inc) const {
  if (inc.launchUnix > latestMembershipUnix_) return false;
  // Its workers were killed after the latest decision: the holder is gone
  // until a later decision names its new incarnation.
  auto killed = lastKill_.find(inc.slot);
  if (killed != lastKill_.end() && killed->second >= latestMembershipUnix_) return false;
  for (const auto& member : latestMembers_) {
    if (member.substr(0, member.find('.')) == std::to_string(inc.slot)) return true;
  }
  return false;
}

bool Runner::startsPending() const {
  if (jobFinished_) return false;
  if (!soakRestarts_.empty()) return true;
  for (size_t i = 0; i < plan_.events.size(); ++i) {
    const ChaosEvent& e = plan_.events[i];
    if (fired_.count(i) == 0 && (e.action == "restart" || e.action == "join") && e.atSeconds >= 0) return true;
  }
  return false;
}

}  // namespace tessera::chaos::runner_detail
