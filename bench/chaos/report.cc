#include "bench/chaos/report.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <tuple>

#include "bench/chaos/report_internal.h"
#include "tessera/core/error.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
using nlohmann::json;
using report_detail::breakdownOf;
using report_detail::DecisionSeen;
using report_detail::integer;
using report_detail::isStep;
using report_detail::mean;
using report_detail::number;
using report_detail::summarizeByKind;

namespace {

// A step line's time_s is a Unix time (rather than seconds since the
// trainer's start) when it is this large.
constexpr double kUnixTimeFloor = 1e9;

std::string text(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}
std::vector<std::string> strings(const json& j, const char* key) {
  std::vector<std::string> out;
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) return out;
  for (const auto& v : *it) {
    if (v.is_string()) out.push_back(v.get<std::string>());
  }
  return out;
}
bool isEvent(const json& j, const char* name) { return text(j, "event") == name; }

// "<slot>.<incarnation>" -> slot; -1 when the id has another form.
int slotOf(const std::string& member) {
  const auto dot = member.find('.');
  const std::string head = member.substr(0, dot);
  if (head.empty() || head.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoi(head);
}

double median(std::vector<double> values) {
  if (values.empty()) return -1;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

struct Commit {
  int64_t outerStep = 0;
  int64_t step = 0;
  double unix = 0;        // earliest over the nodes that logged it
  int64_t epoch = 0;
  int attempts = 1;
  int members = 0;        // 0: not in the event (then the epoch's membership says)
};

struct MembershipSeen {
  double unix = 0;
  int64_t epoch = 0;
  std::vector<std::string> members;
};

std::string kindOf(const std::string& action) {
  if (action == "kill_workers") return "workers";
  if (action == "kill") return "node";
  return action;
}

}  // namespace

ChaosRecord loadChaosRecord(const std::string& dir) {
  const std::string journalPath = (fs::path(dir) / "chaos.jsonl").string();
  std::ifstream journal(journalPath);
  if (!journal) throw InvalidArgument("cannot read " + journalPath + " (is " + dir + " a tessera-chaos output?)");
  ChaosRecord record;
  std::map<std::tuple<int, int, int64_t>, double> seen;  // (node, incarnation, line) -> unix
  std::string line;
  int lineNo = 0;
  while (std::getline(journal, line)) {
    ++lineNo;
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      if (journal.peek() == EOF) break;  // a line cut short by a kill
      throw InvalidArgument(journalPath + ":" + std::to_string(lineNo) + ": not a JSON object");
    }
    const std::string type = text(j, "type");
    const double unix = number(j, "unix");
    if (type == "start") {
      record.startUnix = unix;
      record.nodes = static_cast<int>(integer(j, "nodes", 0));
      record.nprocPerNode = static_cast<int>(integer(j, "nproc_per_node", 1));
      record.steps = integer(j, "steps", 0);
      record.network = text(j, "network");
      record.rateBitsPerSecond = number(j, "rate_bps");
      record.tokensPerNodeStep = number(j, "tokens_per_node_step");
      record.outerBytesPerParameter = number(j, "outer_bytes_per_param");
      if (!text(j, "store").empty()) record.store = text(j, "store");
      record.heartbeatTimeoutS = number(j, "heartbeat_timeout_s", -1);
    } else if (type == "launch") {
      IncarnationRecord run;
      run.node = static_cast<int>(integer(j, "node", 0));
      run.incarnation = static_cast<int>(integer(j, "incarnation", 0));
      run.startUnix = unix;
      run.metricsFile = text(j, "metrics");
      record.runs.push_back(run);
    } else if (type == "action") {
      record.actions.push_back({unix, text(j, "action"), static_cast<int>(integer(j, "node", 0)), text(j, "detail")});
    } else if (type == "seen") {
      seen[{static_cast<int>(integer(j, "node", 0)), static_cast<int>(integer(j, "incarnation", 0)),
            integer(j, "line", 0)}] = unix;
    } else if (type == "exit") {
      for (auto& run : record.runs) {
        if (run.node == integer(j, "node", 0) && run.incarnation == integer(j, "incarnation", 0)) {
          run.endUnix = unix;
          run.exitCode = static_cast<int>(integer(j, "code", 0));
        }
      }
    } else if (type == "end") {
      record.endUnix = unix;
      record.endReason = text(j, "reason");
    }
  }
  for (auto& run : record.runs) {
    if (run.metricsFile.empty()) continue;
    std::ifstream metrics(fs::path(dir) / run.metricsFile);
    if (!metrics) continue;  // killed before it wrote anything
    int64_t index = -1;
    while (std::getline(metrics, line)) {
      ++index;
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) continue;  // cut short by a kill
      MetricsLine m;
      if (j.contains("event")) {
        m.unix = number(j, "time_s");
      } else {
        const double t = number(j, "time_s");
        auto hit = seen.find({run.node, run.incarnation, index});
        m.unix = t > kUnixTimeFloor ? t : hit != seen.end() ? hit->second : run.startUnix + t;
      }
      m.value = std::move(j);
      run.lines.push_back(std::move(m));
    }
  }
  if (record.endUnix == 0) {
    for (const auto& run : record.runs) record.endUnix = std::max({record.endUnix, run.endUnix, run.startUnix});
  }
  return record;
}

ChaosReport computeReport(const ChaosRecord& record) {
  ChaosReport report;
  report.actions = record.actions;
  report.wallSeconds = record.endUnix - record.startUnix;

  // Memberships (every node logs the same decision; keep the earliest sighting).
  std::map<int64_t, MembershipSeen> byEpoch;
  // Commits: outer step -> earliest sighting; per incarnation, how often each was logged.
  std::map<int64_t, Commit> commits;
  std::map<int64_t, std::set<std::string>> hashes;
  std::set<std::pair<int64_t, int>> retries;
  std::vector<std::pair<double, int64_t>> stepsSeen;  // (unix, step) of every step line
  std::vector<DecisionSeen> decisions;
  std::map<int64_t, double> formedByEpoch;  // epoch -> the last successful "group" event (every node logs one)
  for (const auto& run : record.runs) {
    std::map<int64_t, int> loggedHere;
    for (const auto& line : run.lines) {
      const json& j = line.value;
      if (isEvent(j, "membership")) {
        const int64_t epoch = integer(j, "epoch", 0);
        auto it = byEpoch.find(epoch);
        if (it == byEpoch.end() || line.unix < it->second.unix) byEpoch[epoch] = {line.unix, epoch, strings(j, "members")};
      } else if (isEvent(j, "outer_step")) {
        const int64_t k = integer(j, "outer_step", 0);
        if (++loggedHere[k] == 2) report.repeatedOuterSteps.push_back(k);
        const std::string hash = text(j, "param_hash");
        if (!hash.empty()) hashes[k].insert(hash);
        Commit c{k, integer(j, "step", 0), line.unix, integer(j, "epoch", 0), static_cast<int>(integer(j, "attempts", 1)),
                 static_cast<int>(integer(j, "members", 0))};
        auto it = commits.find(k);
        if (it == commits.end() || c.unix < it->second.unix) commits[k] = c;
      } else if (isEvent(j, "retry")) {
        retries.insert({integer(j, "outer_step", 0), static_cast<int>(integer(j, "attempt", 0))});
      } else if (isEvent(j, "decision")) {
        DecisionSeen d{line.unix, integer(j, "outer_step", 0), static_cast<int>(integer(j, "attempt", 0)),
                       strings(j, "dropped"), {}};
        auto dead = j.find("dead");
        if (dead != j.end() && dead->is_array()) {
          for (const auto& e : *dead) {
            if (e.is_object() && !text(e, "member").empty()) d.deadSeen[text(e, "member")] = number(e, "seen_s");
          }
        }
        decisions.push_back(std::move(d));
      } else if (isEvent(j, "group")) {
        auto ok = j.find("ok");
        if (ok != j.end() && ok->is_boolean() && ok->get<bool>()) {
          double& t = formedByEpoch[integer(j, "epoch", 0)];
          t = std::max(t, line.unix);
        }
      } else if (isStep(j)) {
        stepsSeen.emplace_back(line.unix, integer(j, "step", 0));
      }
    }
  }
  std::sort(report.repeatedOuterSteps.begin(), report.repeatedOuterSteps.end());
  report.repeatedOuterSteps.erase(std::unique(report.repeatedOuterSteps.begin(), report.repeatedOuterSteps.end()),
                                  report.repeatedOuterSteps.end());
  report.retries = static_cast<int64_t>(retries.size());
  for (const auto& [k, set] : hashes) {
    if (set.size() > 1) report.hashMismatches.push_back(k);
  }
  if (!commits.empty()) {
    report.firstOuterStep = commits.begin()->first;
    report.lastOuterStep = commits.rbegin()->first;
    report.committedOuterSteps = static_cast<int64_t>(commits.size());
    for (int64_t k = report.firstOuterStep; k <= report.lastOuterStep; ++k) {
      if (commits.count(k) == 0) report.lostOuterSteps.push_back(k);
    }
  }

  // The typical round: gaps between consecutive commits of one epoch that
  // needed a single attempt (no failure, no membership change in between).
  std::vector<double> gaps;
  for (const auto& [k, c] : commits) {
    auto prev = commits.find(k - 1);
    if (prev != commits.end() && prev->second.epoch == c.epoch && c.attempts <= 1) gaps.push_back(c.unix - prev->second.unix);
  }
  report.typicalRoundS = median(gaps);

  for (const auto& [k, c] : commits) {
    int m = c.members;
    auto epoch = byEpoch.find(c.epoch);
    if (m == 0 && epoch != byEpoch.end()) m = static_cast<int>(epoch->second.members.size());
    if (m > 1) report.ringPayloads += 2.0 * (m - 1) / m;
  }

  std::vector<MembershipSeen> memberships;
  for (const auto& [epoch, m] : byEpoch) memberships.push_back(m);
  std::sort(memberships.begin(), memberships.end(), [](const auto& a, const auto& b) { return a.unix < b.unix; });
  std::vector<Commit> commitsByTime;
  for (const auto& [k, c] : commits) commitsByTime.push_back(c);
  std::sort(commitsByTime.begin(), commitsByTime.end(), [](const auto& a, const auto& b) { return a.unix < b.unix; });

  // Failures.
  std::vector<double> recoveries, stalls;
  for (const auto& action : record.actions) {
    if (action.action != "kill" && action.action != "kill_workers" && action.action != "leave" &&
        action.action != "partition") {
      continue;
    }
    FailureResult f;
    f.atS = action.unix - record.startUnix;
    f.node = action.node;
    f.action = action.action;
    f.kind = kindOf(action.action);
    const MembershipSeen* before = nullptr;
    for (const auto& m : memberships) {
      if (m.unix <= action.unix) before = &m;
    }
    if (before != nullptr) {
      for (const auto& member : before->members) {
        if (slotOf(member) == action.node) f.deadMembers.push_back(member);
      }
    }
    const Commit* lastBefore = nullptr;
    for (const auto& c : commitsByTime) {
      if (c.unix <= action.unix) {
        lastBefore = &c;
        continue;
      }
      bool excludes = true;
      auto m = byEpoch.find(c.epoch);
      if (m != byEpoch.end()) {
        for (const auto& dead : f.deadMembers) {
          if (std::find(m->second.members.begin(), m->second.members.end(), dead) != m->second.members.end()) {
            excludes = false;
          }
        }
      } else if (before != nullptr && !f.deadMembers.empty()) {
        excludes = c.epoch > before->epoch;  // membership unknown: a later epoch re-formed without it
      }
      if (!excludes) continue;
      f.survived = true;
      f.resumedOuterStep = c.outerStep;
      f.recoveryS = c.unix - action.unix;
      double expected = -std::numeric_limits<double>::infinity();
      auto prev = commits.find(c.outerStep - 1);
      if (prev != commits.end() && report.typicalRoundS >= 0) expected = prev->second.unix + report.typicalRoundS;
      f.stallS = report.typicalRoundS >= 0 ? std::max(0.0, c.unix - std::max(action.unix, expected)) : f.recoveryS;
      f.breakdown = breakdownOf(action.unix, c.unix, f.stallS, f, decisions, formedByEpoch, c.outerStep, c.attempts,
                                c.epoch, &f.deadSeenS);
      break;
    }
    int64_t stepAtFailure = 0;
    for (const auto& [unix, step] : stepsSeen) {
      if (unix <= action.unix) stepAtFailure = std::max(stepAtFailure, step);
    }
    const int64_t committedStep = lastBefore != nullptr ? lastBefore->step : 0;
    f.stepsDiscarded = std::max<int64_t>(0, stepAtFailure - committedStep);
    f.tokensDiscarded = static_cast<double>(f.stepsDiscarded) * record.tokensPerNodeStep;
    if (f.survived) {
      ++report.survivedFailures;
      recoveries.push_back(f.recoveryS);
      stalls.push_back(f.stallS);
    }
    report.stepsDiscarded += f.stepsDiscarded;
    report.tokensDiscarded += f.tokensDiscarded;
    report.failures.push_back(f);
  }
  report.meanRecoveryS = mean(recoveries);
  report.meanStallS = mean(stalls);
  if (!stalls.empty()) report.maxStallS = *std::max_element(stalls.begin(), stalls.end());

  // Per kind of failure, with issue 19's targets (stall_breakdown.cc).
  report.byKind = summarizeByKind(report.failures, record.heartbeatTimeoutS);

  // Restarts, joins and heals: the node's first live recovery after the
  // action (in the incarnation the runner started, or -- after a heal -- the
  // workers its launcher restarted when they found themselves evicted).
  std::vector<double> throughputs, fractions;
  for (const auto& action : record.actions) {
    if (action.action != "restart" && action.action != "join" && action.action != "heal") continue;
    JoinResult r;
    r.atS = action.unix - record.startUnix;
    r.node = action.node;
    r.action = action.action;
    const MetricsLine* first = nullptr;
    for (const auto& run : record.runs) {
      if (run.node != action.node) continue;
      for (const auto& line : run.lines) {
        if (isEvent(line.value, "recovered") && line.unix > action.unix && (first == nullptr || line.unix < first->unix)) {
          first = &line;
        }
      }
    }
    if (first != nullptr) {
      r.recovered = true;
      r.rejoinS = first->unix - action.unix;
      r.from = text(first->value, "from");
      r.bytes = number(first->value, "bytes");
      r.seconds = number(first->value, "seconds");
      if (r.seconds > 0) r.bytesPerSecond = r.bytes / r.seconds;
      if (r.bytesPerSecond > 0 && record.rateBitsPerSecond > 0) {
        r.linkFraction = r.bytesPerSecond * 8.0 / record.rateBitsPerSecond;
      }
    }
    std::set<std::string> before;
    for (const auto& m : memberships) {
      if (m.unix > action.unix) break;
      for (const auto& member : m.members) before.insert(member);
    }
    for (const auto& m : memberships) {
      if (m.unix <= action.unix || !r.member.empty()) continue;
      for (const auto& member : m.members) {
        if (slotOf(member) == action.node && before.count(member) == 0) {
          r.member = member;
          r.memberS = m.unix - action.unix;
        }
      }
    }
    if (r.bytesPerSecond > 0) throughputs.push_back(r.bytesPerSecond);
    if (r.linkFraction >= 0) fractions.push_back(r.linkFraction);
    report.joins.push_back(r);
  }
  report.meanRecoveryBytesPerSecond = mean(throughputs);
  report.meanLinkFraction = mean(fractions);

  // Per node, and the final loss.
  std::map<int, NodeSummary> nodes;
  std::map<int, std::pair<int64_t, double>> lastByNode;  // node -> (highest step, its loss)
  for (const auto& run : record.runs) {
    NodeSummary& n = nodes[run.node];
    n.node = run.node;
    ++n.incarnations;
    n.running = run.endUnix < 0;
    n.lastExitCode = run.exitCode;
    int64_t bytes = 0;
    for (const auto& line : run.lines) {
      if (!isStep(line.value)) continue;
      const int64_t step = integer(line.value, "step", 0);
      bytes = std::max<int64_t>(bytes, integer(line.value, "comm_bytes", 0));
      if (step >= n.lastStep) {
        n.lastStep = step;
        n.lastLoss = number(line.value, "loss");
      }
    }
    n.commBytes += bytes;
  }
  for (const auto& [id, n] : nodes) {
    report.nodes.push_back(n);
    report.finalStep = std::max(report.finalStep, n.lastStep);
  }
  std::vector<double> finalLosses;
  for (const auto& n : report.nodes) {
    if (n.lastStep == report.finalStep && report.finalStep >= 0) finalLosses.push_back(n.lastLoss);
  }
  report.finalLoss = finalLosses.empty() ? 0 : mean(finalLosses);
  return report;
}

}  // namespace tessera::chaos
