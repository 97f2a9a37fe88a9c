// What a chaos run recorded, and the figures computed from it.
//
// The runner (runner.cc) writes a journal, DIR/chaos.jsonl, one JSON object a
// line:
//   {"type":"start","unix":T0,"nodes":N,"nproc_per_node":P,"network":"loopback","rate_bps":R,
//    "tokens_per_node_step":B,"steps":S,"store":"tessera"|"etcd","heartbeat_timeout_s":H}
//   {"type":"launch","node":I,"incarnation":K,"unix":T,"metrics":"node2-1.jsonl"}
//   {"type":"action","action":"kill","node":I,"unix":T[,"detail":"..."]}
//   {"type":"seen","node":I,"incarnation":K,"line":L,"unix":T}   (when the runner read step line L)
//   {"type":"exit","node":I,"incarnation":K,"unix":T,"code":C}
//   {"type":"end","unix":T,"reason":"finished"|"timeout"|...}
// and each node incarnation's metrics file holds the step lines and the event
// lines of tessera/parallel/elastic.h its tessera-train wrote (copied there
// by the runner as it read them). A step line's
// time_s counts from that trainer's start, so the wall time of a step line is
// when the runner saw it (polled every 100 ms), unless time_s is itself a Unix
// time. Event lines carry Unix times and are used as they are.
//
// Definitions (all times in seconds since the start of the run):
//   failure      a kill or leave action (soak kills included).
//   dead members the members of the failed node ("<slot>.<incarnation>") in
//                the last membership published before the failure.
//   recovery_s   from the failure to the first committed outer step (an
//                "outer_step" event, any node) after it whose epoch's
//                membership contains none of the dead members: the survivors
//                committed without it. A failure is "survived" when that
//                commit exists.
//   stall_s      the part of recovery_s the failure cost: commit time minus
//                max(failure time, previous commit + the typical outer round
//                (median gap between consecutive commits of the same epoch
//                that needed one attempt)). Training resumed after stall_s.
//   steps_discarded / tokens_discarded
//                inner steps the dead node trained since its last commit
//                (its pseudo-gradient never reached the others), estimated
//                as the highest step any node had logged at the failure minus
//                the step of the last commit before it; tokens = steps x
//                tokens_per_node_step.
//   committed steps lost / repeated
//                outer steps (the "outer_step" index) missing from the union
//                of all nodes' commits (a gap between the first and last), or
//                logged twice by one incarnation. Target 0 for both.
//   hash_mismatches
//                outer steps whose param_hash differs between nodes.
//   kind         what the failure was: "workers" (kill_workers: only the
//                worker processes died, their launcher saw it and marked them
//                dead), "node" (kill: launcher and workers, a silent loss),
//                "leave", "partition".
//   breakdown    of a survived failure's stall, by phase, from the elastic
//                event lines: the interval [failure, commit] is cut at
//                  seen      the first "decision" event's dead[].seen_s for a
//                            dead member (when a monitor first held it dead;
//                            absent: the first decision dropping it; no
//                            event at all: the commit)
//                  decided   the first "decision" event after the failure
//                            that dropped a dead member
//                  redecided the "decision" event of the attempt that
//                            committed (outer_step, attempts - 1); else decided
//                  formed    the last "group" event (ok) of the commit's epoch
//                into detection [failure, seen], decision [seen, decided],
//                retry [decided, redecided], formation [redecided, formed]
//                and collective [formed, commit] (the all-reduce and vote),
//                each clipped to the stall window [commit - stall_s, commit]:
//                the phases add up to stall_s. dead_seen_s = seen - failure,
//                unclipped (detection that ended during training costs nothing).
//   by kind      per kind: failures, survived, mean and max stall_s, mean
//                recovery_s, mean dead_seen_s, the mean of each phase, and the
//                targets of issue 19: workers mean <= 3 s and max <= 6 s; node
//                mean <= heartbeat_timeout_s + 1 s (from the start record).
//   rejoin       per restart/join: from the action to the node's "recovered"
//                event (rejoin_s) and to the first membership naming it as a
//                member (member_s); bytes, seconds and throughput of the live
//                recovery, and throughput / link rate when the link has one.
//   final loss   the loss of the step line with the highest step (mean over
//                the nodes that logged that step).
//   ring_payloads
//                sum over committed outer steps of 2(m-1)/m (m: members of
//                the step): x parameters x bytes per parameter is what each
//                rank of a ring all-reduce sent across nodes (an estimate for
//                runs whose step lines report no comm_bytes).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tessera::chaos {

struct MetricsLine {
  double unix = 0;        // wall time (see above)
  nlohmann::json value;
};

struct IncarnationRecord {
  int node = 0;
  int incarnation = 0;
  double startUnix = 0;
  double endUnix = -1;    // -1: still running when the record was taken
  int exitCode = 0;       // meaningful when endUnix >= 0; < 0: -signal
  std::string metricsFile;
  std::vector<MetricsLine> lines;
};

struct ActionRecord {
  double unix = 0;
  std::string action;     // kill restart join leave partition heal throttle start
  int node = 0;
  std::string detail;
};

struct ChaosRecord {
  double startUnix = 0;
  double endUnix = 0;
  std::string endReason;
  int nodes = 0;
  int nprocPerNode = 1;
  int64_t steps = 0;
  std::string network = "loopback";
  std::string store = "tessera";
  double heartbeatTimeoutS = -1;  // -1: not in the start record
  double rateBitsPerSecond = 0;  // 0: no limit
  double tokensPerNodeStep = 0;
  double outerBytesPerParameter = 0;  // 0: unknown
  std::vector<IncarnationRecord> runs;
  std::vector<ActionRecord> actions;
};

// Reads DIR/chaos.jsonl and every metrics file it names. Throws
// InvalidArgument naming the file and line when one cannot be read.
// Incomplete last lines (a process killed mid-write) are skipped.
ChaosRecord loadChaosRecord(const std::string& dir);

// A survived failure's stall by phase (see "breakdown" above); -1: not survived.
struct StallBreakdown {
  double detectionS = -1;
  double decisionS = -1;
  double retryS = -1;
  double formationS = -1;
  double collectiveS = -1;
};

struct FailureResult {
  double atS = 0;
  int node = 0;
  std::string action;
  std::string kind;          // workers | node | leave | partition
  double deadSeenS = -1;     // failure -> a monitor held a dead member dead (-1: no event said)
  StallBreakdown breakdown;
  std::vector<std::string> deadMembers;
  bool survived = false;
  double recoveryS = -1;
  double stallS = -1;
  int64_t resumedOuterStep = -1;
  int64_t stepsDiscarded = 0;
  double tokensDiscarded = 0;
};

struct JoinResult {
  double atS = 0;
  int node = 0;
  std::string action;
  bool recovered = false;
  double rejoinS = -1;
  double memberS = -1;
  std::string member;
  std::string from;
  double bytes = 0;
  double seconds = 0;
  double bytesPerSecond = 0;
  double linkFraction = -1;  // -1: no link rate
};

struct NodeSummary {
  int node = 0;
  int incarnations = 0;
  int64_t lastStep = -1;
  double lastLoss = 0;
  int64_t commBytes = 0;   // summed over incarnations (each counts from 0)
  int lastExitCode = 0;
  bool running = false;
};

struct KindSummary {
  std::string kind;
  int failures = 0;
  int survived = 0;
  double meanStallS = -1;
  double maxStallS = -1;
  double meanRecoveryS = -1;
  double meanDeadSeenS = -1;
  StallBreakdown meanBreakdown;
  double targetMeanStallS = -1;  // -1: no target for this kind
  double targetMaxStallS = -1;
};

struct ChaosReport {
  std::vector<ActionRecord> actions;
  std::vector<FailureResult> failures;
  std::vector<JoinResult> joins;
  std::vector<NodeSummary> nodes;
  int64_t firstOuterStep = -1;
  int64_t lastOuterStep = -1;
  int64_t committedOuterSteps = 0;   // distinct outer steps committed
  std::vector<int64_t> lostOuterSteps;
  std::vector<int64_t> repeatedOuterSteps;
  std::vector<int64_t> hashMismatches;
  int64_t retries = 0;
  int64_t finalStep = -1;
  double finalLoss = 0;
  double wallSeconds = 0;
  int survivedFailures = 0;
  double meanRecoveryS = -1;
  double meanStallS = -1;
  double maxStallS = -1;
  std::vector<KindSummary> byKind;  // in the order kinds first failed
  double meanRecoveryBytesPerSecond = -1;
  double meanLinkFraction = -1;
  int64_t stepsDiscarded = 0;
  double tokensDiscarded = 0;
  double typicalRoundS = -1;
  // Sum over committed outer steps of 2(m-1)/m, m = the members of that
  // step: what a ring all-reduce sends per rank, in units of the payload.
  double ringPayloads = 0;
};

ChaosReport computeReport(const ChaosRecord& record);

// report.json's content; `baseline` (a no-fault run of the same job) adds
// "baseline" and "final_loss_gap" (chaos / baseline - 1).
nlohmann::ordered_json reportJson(const ChaosRecord& record, const ChaosReport& report,
                                  const ChaosReport* baseline = nullptr);

// Writes DIR/report.tsv + DIR/report.gp and runs gnuplot for DIR/report.png:
// loss vs wall time per node (and the baseline's, dashed), kills in red and
// joins (live recoveries) in green. Returns the PNG path, "" without gnuplot.
std::string plotReport(const std::string& dir, const ChaosRecord& record, const ChaosReport& report,
                       const ChaosRecord* baseline = nullptr);

}  // namespace tessera::chaos
