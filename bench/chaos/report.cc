#include "bench/chaos/report.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace {

// A step line's time_s is a Unix time (rather than seconds since the
// trainer's start) when it is this large.
constexpr double kUnixTimeFloor = 1e9;

double number(const json& j, const char* key, double fallback = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}
int64_t integer(const json& j, const char* key, int64_t fallback = -1) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<int64_t>() : fallback;
}
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
bool isStep(const json& j) { return !j.contains("event") && j.contains("step") && j.contains("loss"); }

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

double mean(const std::vector<double>& values) {
  if (values.empty()) return -1;
  double sum = 0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

double rounded(double v) { return std::round(v * 1000.0) / 1000.0; }

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
    if (action.action != "kill" && action.action != "leave" && action.action != "partition") continue;
    FailureResult f;
    f.atS = action.unix - record.startUnix;
    f.node = action.node;
    f.action = action.action;
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

namespace {

ordered_json orNull(double v) { return v < 0 ? ordered_json(nullptr) : ordered_json(rounded(v)); }

ordered_json summaryJson(const ChaosReport& r) {
  ordered_json s;
  s["final_step"] = r.finalStep;
  s["final_loss"] = r.finalLoss;
  s["wall_s"] = rounded(r.wallSeconds);
  return s;
}

}  // namespace

ordered_json reportJson(const ChaosRecord& record, const ChaosReport& r, const ChaosReport* baseline) {
  ordered_json out;
  out["nodes"] = record.nodes;
  out["nproc_per_node"] = record.nprocPerNode;
  out["network"] = record.network;
  if (record.rateBitsPerSecond > 0) out["link_rate_bps"] = record.rateBitsPerSecond;
  out["end_reason"] = record.endReason;
  out["wall_s"] = rounded(r.wallSeconds);
  out["final_step"] = r.finalStep;
  out["final_loss"] = r.finalLoss;
  if (baseline != nullptr) {
    out["baseline"] = summaryJson(*baseline);
    out["final_loss_gap"] = baseline->finalLoss > 0 ? r.finalLoss / baseline->finalLoss - 1.0 : 0.0;
  }
  ordered_json events = ordered_json::array();
  for (const auto& a : r.actions) {
    ordered_json e;
    e["t_s"] = rounded(a.unix - record.startUnix);
    e["action"] = a.action;
    e["node"] = a.node;
    if (!a.detail.empty()) e["detail"] = a.detail;
    events.push_back(e);
  }
  out["events"] = events;
  ordered_json failures = ordered_json::array();
  for (const auto& f : r.failures) {
    ordered_json e;
    e["t_s"] = rounded(f.atS);
    e["action"] = f.action;
    e["node"] = f.node;
    e["dead_members"] = f.deadMembers;
    e["survived"] = f.survived;
    e["recovery_s"] = orNull(f.recoveryS);
    e["stall_s"] = orNull(f.stallS);
    e["resumed_outer_step"] = f.resumedOuterStep;
    e["steps_discarded"] = f.stepsDiscarded;
    e["tokens_discarded"] = f.tokensDiscarded;
    failures.push_back(e);
  }
  out["failures"] = failures;
  ordered_json joins = ordered_json::array();
  for (const auto& j : r.joins) {
    ordered_json e;
    e["t_s"] = rounded(j.atS);
    e["action"] = j.action;
    e["node"] = j.node;
    e["recovered"] = j.recovered;
    e["rejoin_s"] = orNull(j.rejoinS);
    e["member_s"] = orNull(j.memberS);
    e["member"] = j.member;
    e["from"] = j.from;
    e["bytes"] = j.bytes;
    e["seconds"] = j.seconds;
    e["bytes_per_s"] = j.bytesPerSecond;
    e["link_fraction"] = orNull(j.linkFraction);
    joins.push_back(e);
  }
  out["joins"] = joins;
  ordered_json commits;
  commits["first_outer_step"] = r.firstOuterStep;
  commits["last_outer_step"] = r.lastOuterStep;
  commits["committed"] = r.committedOuterSteps;
  commits["lost"] = r.lostOuterSteps;
  commits["repeated"] = r.repeatedOuterSteps;
  commits["param_hash_mismatches"] = r.hashMismatches;
  commits["retries"] = r.retries;
  commits["typical_round_s"] = orNull(r.typicalRoundS);
  out["outer_steps"] = commits;
  ordered_json soak;
  soak["failures"] = r.failures.size();
  soak["survived_failures"] = r.survivedFailures;
  soak["lost_committed_steps"] = r.lostOuterSteps.size() + r.repeatedOuterSteps.size();
  soak["mean_recovery_s"] = orNull(r.meanRecoveryS);
  soak["mean_stall_s"] = orNull(r.meanStallS);
  soak["max_stall_s"] = orNull(r.maxStallS);
  soak["steps_discarded"] = r.stepsDiscarded;
  soak["tokens_discarded"] = r.tokensDiscarded;
  soak["live_recovery_bytes_per_s"] = orNull(r.meanRecoveryBytesPerSecond);
  soak["live_recovery_link_fraction"] = orNull(r.meanLinkFraction);
  out["summary"] = soak;
  ordered_json nodes = ordered_json::array();
  for (const auto& n : r.nodes) {
    ordered_json e;
    e["node"] = n.node;
    e["incarnations"] = n.incarnations;
    e["last_step"] = n.lastStep;
    e["last_loss"] = n.lastLoss;
    e["comm_bytes"] = n.commBytes;
    e["exit_code"] = n.running ? ordered_json(nullptr) : ordered_json(n.lastExitCode);
    nodes.push_back(e);
  }
  out["per_node"] = nodes;
  return out;
}

namespace {

// One gnuplot data block per node: "t_s loss step" rows, a blank line
// between incarnations so a restarted node's curve is not joined across
// the gap. Returns how many blocks have points.
std::vector<int> writeCurves(std::ostream& out, const ChaosRecord& record) {
  std::map<int, std::vector<const IncarnationRecord*>> byNode;
  for (const auto& run : record.runs) byNode[run.node].push_back(&run);
  std::vector<int> written;
  for (const auto& [node, runs] : byNode) {
    std::vector<std::string> chunks;  // one per incarnation with points
    for (const IncarnationRecord* run : runs) {
      std::ostringstream chunk;
      for (const auto& line : run->lines) {
        if (!isStep(line.value)) continue;
        chunk << (line.unix - record.startUnix) << "\t" << number(line.value, "loss") << "\t"
              << integer(line.value, "step", 0) << "\n";
      }
      if (!chunk.str().empty()) chunks.push_back(chunk.str());
    }
    if (chunks.empty()) continue;
    // gnuplot: one blank line breaks the curve, two start the next index.
    if (!written.empty()) out << "\n\n";
    out << "# node " << node << "\n";
    for (size_t i = 0; i < chunks.size(); ++i) out << (i ? "\n" : "") << chunks[i];
    written.push_back(node);
  }
  return written;
}

}  // namespace

std::string plotReport(const std::string& dir, const ChaosRecord& record, const ChaosReport& report,
                       const ChaosRecord* baseline) {
  const std::string data = (fs::path(dir) / "report.tsv").string();
  const std::string baseData = (fs::path(dir) / "report-baseline.tsv").string();
  std::vector<int> nodes;
  {
    std::ofstream out(data);
    out << "# t_s\tloss\tstep (one block per node)\n";
    nodes = writeCurves(out, record);
  }
  std::vector<int> baseNodes;
  if (baseline != nullptr) {
    std::ofstream out(baseData);
    out << "# t_s\tloss\tstep (baseline, one block per node)\n";
    baseNodes = writeCurves(out, *baseline);
  }
  if (nodes.empty() || std::system("command -v gnuplot >/dev/null 2>&1") != 0) return "";
  const std::string png = (fs::path(dir) / "report.png").string();
  const std::string script = (fs::path(dir) / "report.gp").string();
  {
    std::ofstream gp(script);
    gp << "set terminal png size 1100,650\nset output '" << png << "'\n"
       << "set title 'training loss vs wall time: " << report.failures.size() << " failures (red), "
       << report.joins.size() << " restarts/joins (green: recovered)'\n"
       << "set xlabel 'wall time (s)'\nset ylabel 'training loss'\nset key below horizontal\nset grid\n"
       << "set xrange [0:" << std::max(1.0, report.wallSeconds) << "]\n";
    // Name each marker while there are few; a soak's dozens would only overlap.
    const bool labels = report.failures.size() + report.joins.size() <= 8;
    for (const auto& f : report.failures) {
      gp << "set arrow from " << f.atS << ", graph 0 to " << f.atS << ", graph 1 nohead lc rgb 'red' lw 2\n";
      if (labels) {
        gp << "set label '" << f.action << " " << f.node << "' at " << f.atS
           << ", graph 0.97 left offset 0.3,0 tc rgb 'red'\n";
      }
    }
    for (const auto& j : report.joins) {
      const double at = j.recovered ? j.atS + j.rejoinS : j.atS;
      gp << "set arrow from " << at << ", graph 0 to " << at << ", graph 1 nohead lc rgb 'dark-green' lw 2 dt "
         << (j.recovered ? 1 : 2) << "\n";
      if (labels) {
        gp << "set label '" << (j.recovered ? "rejoined " : "restart ") << j.node << "' at " << at
           << ", graph 0.92 left offset 0.3,0 tc rgb 'dark-green'\n";
      }
    }
    gp << "plot NaN with lines lc rgb 'red' lw 2 title 'failure', NaN with lines lc rgb 'dark-green' lw 2 title "
          "'rejoined (live recovery)', ";
    for (size_t i = 0; i < nodes.size(); ++i) {
      gp << (i ? ", " : "") << "'" << data << "' index " << i << " using 1:2 with lines lw 2 title 'node "
         << nodes[i] << "'";
    }
    for (size_t i = 0; i < baseNodes.size(); ++i) {
      gp << ", '" << baseData << "' index " << i << " using 1:2 with lines dt 2 lc rgb 'gray' title "
         << (i == 0 ? "'no-fault baseline'" : "''");
    }
    gp << "\n";
  }
  if (std::system(("gnuplot '" + script + "' 2>'" + script + ".log'").c_str()) != 0) return "";
  return png;
}

}  // namespace tessera::chaos
