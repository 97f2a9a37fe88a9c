// report.json (reportJson) and the loss-vs-wall-time figure (plotReport)
// from a computed report; report.h says what each field means.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "bench/chaos/report.h"
#include "bench/chaos/report_internal.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
using nlohmann::ordered_json;
using report_detail::integer;
using report_detail::isStep;
using report_detail::number;

namespace {

double rounded(double v) { return std::round(v * 1000.0) / 1000.0; }

ordered_json orNull(double v) { return v < 0 ? ordered_json(nullptr) : ordered_json(rounded(v)); }

ordered_json breakdownJson(const StallBreakdown& b) {
  ordered_json out;
  out["detection_s"] = orNull(b.detectionS);
  out["decision_s"] = orNull(b.decisionS);
  out["retry_s"] = orNull(b.retryS);
  out["formation_s"] = orNull(b.formationS);
  out["collective_s"] = orNull(b.collectiveS);
  return out;
}

ordered_json kindJson(const KindSummary& k) {
  ordered_json out;
  out["failures"] = k.failures;
  out["survived"] = k.survived;
  out["mean_stall_s"] = orNull(k.meanStallS);
  out["max_stall_s"] = orNull(k.maxStallS);
  out["mean_recovery_s"] = orNull(k.meanRecoveryS);
  out["mean_dead_seen_s"] = orNull(k.meanDeadSeenS);
  out["mean_breakdown"] = breakdownJson(k.meanBreakdown);
  if (k.targetMeanStallS >= 0) {
    ordered_json target;
    target["mean_stall_s"] = k.targetMeanStallS;
    if (k.targetMaxStallS >= 0) target["max_stall_s"] = k.targetMaxStallS;
    target["met"] = k.survived == k.failures && k.meanStallS >= 0 && k.meanStallS <= k.targetMeanStallS &&
                    (k.targetMaxStallS < 0 || k.maxStallS <= k.targetMaxStallS);
    out["target"] = target;
  }
  return out;
}

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
  out["store"] = record.store;
  if (record.heartbeatTimeoutS > 0) out["heartbeat_timeout_s"] = record.heartbeatTimeoutS;
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
    e["kind"] = f.kind;
    e["node"] = f.node;
    e["dead_members"] = f.deadMembers;
    e["survived"] = f.survived;
    e["recovery_s"] = orNull(f.recoveryS);
    e["stall_s"] = orNull(f.stallS);
    e["dead_seen_s"] = orNull(f.deadSeenS);
    e["breakdown"] = breakdownJson(f.breakdown);
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
  ordered_json kinds = ordered_json::object();
  for (const auto& k : r.byKind) kinds[k.kind] = kindJson(k);
  soak["by_kind"] = kinds;
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
