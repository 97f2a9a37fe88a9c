// tessera-chaos: runs a fault-injection experiment on an elastic training job
// and writes its report.
//
//   tessera-chaos --plan examples/chaos/demo.toml --out build/demo-chaos [--baseline]
//   tessera-chaos --report-only --out build/demo-chaos      (recompute the report of a finished run)
//
// The plan (bench/chaos/plan.h) names the tessera-train config, the nodes,
// the network (loopback, or network namespaces with rate-limited links when
// root) and the failures. tessera-chaos starts a standalone tessera-store and
// one tessera-run per node, performs the failures at their times, narrates
// what happens, and writes DIR/report.json (figures defined in
// bench/chaos/report.h) and DIR/report.png (loss vs wall time, failures and
// rejoins marked). --baseline first runs the same job without failures into
// DIR/baseline and reports the final-loss gap.
//
// Exit code: 0 when training finished and no committed outer step was lost,
// repeated or diverged between nodes; 1 otherwise (or on an error); 2 on a
// bad command line or plan.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>

#include "bench/chaos/plan.h"
#include "bench/chaos/report.h"
#include "bench/chaos/runner.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::chaos {
namespace {
namespace fs = std::filesystem;

std::string selfDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  return fs::path(buf).parent_path().string();
}

// An installed tool sits next to tessera-chaos; in the build tree the path
// CMake passed in; else the build tree's layout; else PATH.
std::string locate(const std::string& given, const std::string& name, const char* buildPath,
                   const std::string& buildRelative) {
  if (!given.empty()) return given;
  const std::string here = selfDir();
  if (!here.empty() && access((here + "/" + name).c_str(), X_OK) == 0) return here + "/" + name;
  if (buildPath != nullptr && buildPath[0] != '\0' && access(buildPath, X_OK) == 0) return buildPath;
  if (!here.empty() && !buildRelative.empty()) {
    const std::string candidate = (fs::path(here) / buildRelative).lexically_normal().string();
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return name;  // from PATH
}

#ifndef TESSERA_CHAOS_RUN_PATH
#define TESSERA_CHAOS_RUN_PATH ""
#endif
#ifndef TESSERA_CHAOS_TRAIN_PATH
#define TESSERA_CHAOS_TRAIN_PATH ""
#endif
#ifndef TESSERA_CHAOS_STORE_PATH
#define TESSERA_CHAOS_STORE_PATH ""
#endif
#ifndef TESSERA_CHAOS_NETNS_SCRIPT
#define TESSERA_CHAOS_NETNS_SCRIPT ""
#endif

// The model's parameter count, from tessera-train's "(N parameters" log line.
int64_t parametersFromLogs(const std::string& dir, int nodes) {
  static const std::regex pattern(R"(\(([0-9]+) parameters)");
  for (int node = 0; node < nodes; ++node) {
    std::ifstream log(fs::path(dir) / ("node" + std::to_string(node) + ".log"));
    std::string line;
    std::smatch m;
    while (std::getline(log, line)) {
      if (std::regex_search(line, m, pattern)) return std::stoll(m[1]);
    }
  }
  return 0;
}

std::string human(double bytes) {
  char buf[64];
  if (bytes >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.2f GB", bytes / 1e9);
  } else if (bytes >= 1e6) {
    std::snprintf(buf, sizeof(buf), "%.2f MB", bytes / 1e6);
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f kB", bytes / 1e3);
  }
  return buf;
}

// Adds the traffic comparison to the report and prints the summary.
void summarize(const std::string& dir, const ChaosRecord& record, const ChaosReport& report,
               const ChaosReport* baseline, nlohmann::ordered_json& json, const std::string& png) {
  const int ranks = record.nodes * record.nprocPerNode;
  const int64_t params = parametersFromLogs(dir, std::max(record.nodes, 1));
  int64_t sent = 0;
  for (const auto& n : report.nodes) sent = std::max(sent, n.commBytes);
  // Step lines without comm_bytes (the elastic run's cross-node all-reduce
  // may not be counted there): estimate what a ring all-reduce of the
  // committed outer steps sent per rank.
  const bool measured = sent > 0;
  if (!measured && params > 0 && record.outerBytesPerParameter > 0) {
    sent = static_cast<int64_t>(report.ringPayloads * static_cast<double>(params) * record.outerBytesPerParameter);
  }
  // DDP all-reduces every gradient every step: a ring sends 2(n-1)/n of it per rank.
  const double ddp = ranks > 1 && params > 0 && report.finalStep > 0
                         ? 2.0 * (ranks - 1) / ranks * static_cast<double>(params) * 4.0 * report.finalStep
                         : 0.0;
  nlohmann::ordered_json traffic;
  traffic["parameters"] = params;
  traffic["ranks"] = ranks;
  traffic["bytes_sent_per_rank"] = sent;
  traffic["bytes_sent_source"] = measured ? "measured: comm_bytes of the step lines (the highest node)"
                                          : "estimated: ring all-reduce of every committed outer step";
  traffic["ddp_bytes_per_rank"] = ddp;
  if (sent > 0 && ddp > 0) traffic["ddp_over_sent"] = ddp / static_cast<double>(sent);
  json["traffic"] = traffic;

  std::printf("\n==> tessera-chaos summary (%s)\n", dir.c_str());
  std::printf("  run: %s after %.1f s; final loss %.4f at step %lld", record.endReason.c_str(), report.wallSeconds,
              report.finalLoss, static_cast<long long>(report.finalStep));
  if (baseline != nullptr && baseline->finalLoss > 0) {
    std::printf(" (no-fault baseline %.4f at step %lld: %+.2f%%)", baseline->finalLoss,
                static_cast<long long>(baseline->finalStep), 100.0 * (report.finalLoss / baseline->finalLoss - 1.0));
  }
  std::printf("\n");
  std::printf("  failures: %zu, survived %d", report.failures.size(), report.survivedFailures);
  if (report.meanRecoveryS >= 0) {
    std::printf("; failure -> next commit without the node %.1f s on average, training stalled %.1f s (max %.1f s)",
                report.meanRecoveryS, report.meanStallS, report.maxStallS);
  }
  std::printf("\n");
  for (const auto& k : report.byKind) {
    std::printf("  %s failures: %d, survived %d", k.kind.c_str(), k.failures, k.survived);
    if (k.meanStallS >= 0) {
      std::printf("; stall mean %.2f s, max %.2f s", k.meanStallS, k.maxStallS);
      if (k.targetMeanStallS >= 0) {
        const bool met = k.survived == k.failures && k.meanStallS <= k.targetMeanStallS &&
                         (k.targetMaxStallS < 0 || k.maxStallS <= k.targetMaxStallS);
        std::printf(" (target mean <= %.1f s", k.targetMeanStallS);
        if (k.targetMaxStallS >= 0) std::printf(", max <= %.1f s", k.targetMaxStallS);
        std::printf(": %s)", met ? "met" : "MISSED");
      }
      const StallBreakdown& b = k.meanBreakdown;
      std::printf("\n    mean stall by phase: detection %.2f s, decision %.2f s, retry %.2f s, formation %.2f s, "
                  "collective %.2f s",
                  b.detectionS, b.decisionS, b.retryS, b.formationS, b.collectiveS);
      if (k.meanDeadSeenS >= 0) std::printf("; failure -> seen dead %.2f s on average", k.meanDeadSeenS);
    }
    std::printf("\n");
  }
  if (report.joins.size() > 6) {
    int recovered = 0;
    std::vector<double> rejoin;
    for (const auto& j : report.joins) {
      recovered += j.recovered ? 1 : 0;
      if (j.recovered) rejoin.push_back(j.rejoinS);
    }
    double mean = 0;
    for (double r : rejoin) mean += r / static_cast<double>(rejoin.size());
    std::printf("  restarts/joins: %zu, recovered from a peer %d (mean %.1f s after the start)", report.joins.size(),
                recovered, mean);
    if (report.meanRecoveryBytesPerSecond > 0) {
      std::printf("; live recovery %s/s", human(report.meanRecoveryBytesPerSecond).c_str());
      if (report.meanLinkFraction >= 0) std::printf(" = %.0f%% of the link", 100.0 * report.meanLinkFraction);
    }
    std::printf("\n");
  }
  for (const auto& j : report.joins) {
    if (report.joins.size() > 6) break;
    if (j.recovered) {
      std::printf("  %s of node %d: recovered %s from %s in %.2f s (%s/s", j.action.c_str(), j.node,
                  human(j.bytes).c_str(), j.from.c_str(), j.seconds, human(j.bytesPerSecond).c_str());
      if (j.linkFraction >= 0) std::printf(", %.0f%% of the link", 100.0 * j.linkFraction);
      std::printf("), %.1f s after the %s", j.rejoinS, j.action.c_str());
      if (j.memberS >= 0) std::printf("; a member %.1f s after it", j.memberS);
      std::printf("\n");
    } else {
      std::printf("  %s of node %d: no live recovery seen\n", j.action.c_str(), j.node);
    }
  }
  std::printf("  committed outer steps: %lld (lost %zu, repeated %zu, parameter-hash mismatches %zu, retries %lld)\n",
              static_cast<long long>(report.committedOuterSteps), report.lostOuterSteps.size(),
              report.repeatedOuterSteps.size(), report.hashMismatches.size(), static_cast<long long>(report.retries));
  if (report.stepsDiscarded > 0) {
    std::printf("  work discarded with the dead nodes: %lld inner steps (%.0f tokens)\n",
                static_cast<long long>(report.stepsDiscarded), report.tokensDiscarded);
  }
  if (sent > 0 && ddp > 0) {
    std::printf("  bytes sent per rank%s: %s; DDP on %d ranks would have sent %s (%lld params x 4 B x 2(n-1)/n x %lld "
                "steps): %.0fx less\n",
                measured ? "" : " (estimated from the outer steps)", human(static_cast<double>(sent)).c_str(), ranks, human(ddp).c_str(), static_cast<long long>(params),
                static_cast<long long>(report.finalStep), ddp / static_cast<double>(sent));
  }
  std::printf("  report: %s/report.json\n", dir.c_str());
  if (!png.empty()) {
    std::printf("  plot:   %s\n", png.c_str());
  } else {
    std::printf("  plot:   none (gnuplot not found or no step lines; curves in %s/report.tsv)\n", dir.c_str());
  }
  std::fflush(stdout);
}

int run(int argc, char** argv) {
  CLI::App app{"tessera-chaos: run a fault-injection experiment on an elastic training job and report it"};
  std::string planPath, outDir;
  bool baseline = false, reportOnly = false;
  RunnerOptions options;
  RunnerPaths& p = options.paths;
  app.add_option("--plan", planPath, "chaos plan TOML (see examples/chaos/)");
  app.add_option("--out", outDir, "output directory (logs, metrics, report.json, report.png)")->required();
  app.add_flag("--baseline", baseline, "first run the same job without failures (into OUT/baseline) and compare");
  app.add_flag("--report-only", reportOnly, "do not run anything: recompute the report of the run in --out");
  app.add_option("--finish-grace", options.finishGraceSeconds,
                 "seconds the other nodes get to finish after the first one did")
      ->capture_default_str();
  app.add_option("--tessera-run", p.tesseraRun, "path of tessera-run (default: found next to tessera-chaos)");
  app.add_option("--tessera-train", p.tesseraTrain, "path of tessera-train");
  app.add_option("--tessera-store", p.tesseraStore, "path of tessera-store");
  app.add_option("--netns-script", p.netnsScript, "path of scripts/netns-cluster.sh (netns mode)");
  app.add_option("--etcd", p.etcd, "path of etcd ([job] store = \"etcd\"; default: from PATH)");
  app.add_option("--etcdctl", p.etcdctl, "path of etcdctl (the etcd cluster's health check)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!reportOnly && planPath.empty()) {
    std::fprintf(stderr, "tessera-chaos: give --plan PLAN.toml (or --report-only to re-read a finished run)\n");
    return 2;
  }
  options.outDir = outDir;
  const bool haveBaseline = reportOnly ? fs::exists(fs::path(outDir) / "baseline" / "chaos.jsonl") : baseline;
  if (!reportOnly) {
    ChaosPlan plan;
    try {
      plan = loadChaosPlan(planPath);
    } catch (const InvalidArgument& e) {
      std::fprintf(stderr, "tessera-chaos: %s\n", e.what());
      return 2;
    }
    p.tesseraRun = locate(p.tesseraRun, "tessera-run", TESSERA_CHAOS_RUN_PATH, "../launcher/tessera-run");
    p.tesseraTrain = locate(p.tesseraTrain, "tessera-train", TESSERA_CHAOS_TRAIN_PATH, "../launcher/tessera-train");
    p.tesseraStore = locate(p.tesseraStore, "tessera-store", TESSERA_CHAOS_STORE_PATH, "../launcher/tessera-store");
    if (p.netnsScript.empty()) {
      p.netnsScript = access((selfDir() + "/netns-cluster.sh").c_str(), X_OK) == 0 ? selfDir() + "/netns-cluster.sh"
                                                                                  : TESSERA_CHAOS_NETNS_SCRIPT;
    }
    std::printf("[chaos] plan %s: %d nodes x %d processes (min %d), %s store, %s network%s, %zu events%s\n",
                planPath.c_str(), plan.nodes, plan.nprocPerNode, plan.minNodes, plan.store.c_str(), plan.network.c_str(),
                plan.rate.empty() ? "" : (" at " + plan.rate).c_str(), plan.events.size(),
                plan.soak.kills > 0 ? (", soak of " + std::to_string(plan.soak.kills) + " kills").c_str() : "");
    if (baseline) {
      RunnerOptions base = options;
      base.outDir = (fs::path(outDir) / "baseline").string();
      base.label = "baseline";
      std::printf("[chaos] no-fault baseline first, into %s\n", base.outDir.c_str());
      std::fflush(stdout);
      runChaos(plan.withoutFaults(), base);
    }
    std::fflush(stdout);
    runChaos(plan, options);
  }
  const ChaosRecord record = loadChaosRecord(outDir);
  const ChaosReport report = computeReport(record);
  std::optional<ChaosRecord> baseRecord;
  std::optional<ChaosReport> baseReport;
  if (haveBaseline) {
    baseRecord = loadChaosRecord((fs::path(outDir) / "baseline").string());
    baseReport = computeReport(*baseRecord);
  }
  nlohmann::ordered_json json = reportJson(record, report, baseReport ? &*baseReport : nullptr);
  const std::string png = plotReport(outDir, record, report, baseRecord ? &*baseRecord : nullptr);
  summarize(outDir, record, report, baseReport ? &*baseReport : nullptr, json, png);
  if (!png.empty()) json["plot"] = png;
  {
    std::ofstream out(fs::path(outDir) / "report.json");
    out << json.dump(2) << "\n";
  }
  const bool clean = (record.endReason == "finished" || record.endReason == "soak-complete") && report.lostOuterSteps.empty() &&
                     report.repeatedOuterSteps.empty() && report.hashMismatches.empty();
  return clean ? 0 : 1;
}

}  // namespace
}  // namespace tessera::chaos

int main(int argc, char** argv) {
  try {
    return tessera::chaos::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-chaos: %s\n", e.what());
    return 1;
  }
}
