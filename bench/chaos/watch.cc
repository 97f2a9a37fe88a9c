// Watching the nodes: reaping the processes that exit, tailing each
// incarnation's metrics file (copying every complete line to the file the
// report reads) and narrating what the lines say ("outer step 3 committed").
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>

#include "bench/chaos/runner_internal.h"

namespace tessera::chaos::runner_detail {
using nlohmann::json;

namespace {

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

}  // namespace

void Runner::reap() {
  int status = 0;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    if (pid == storePid_) {
      storePid_ = -1;
      say("the store exited unexpectedly; see store.log");
      continue;
    }
    auto etcd = std::find(etcdPids_.begin(), etcdPids_.end(), pid);
    if (etcd != etcdPids_.end()) {
      say("etcd member " + std::to_string(etcd - etcdPids_.begin()) + " exited unexpectedly; see etcd-" +
          std::to_string(etcd - etcdPids_.begin()) + ".log");
      *etcd = -1;
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

void Runner::tail(Incarnation& inc) {
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

void Runner::onLine(const Incarnation& inc, int64_t index, const json& j) {
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

}  // namespace tessera::chaos::runner_detail
