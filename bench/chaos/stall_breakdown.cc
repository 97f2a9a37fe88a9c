// The stall of a survived failure cut into phases (detection, decision,
// retry, formation, collective; report.h "breakdown") and the per-kind
// summaries of the failures with issue 19's targets (report.h "by kind").
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "bench/chaos/report_internal.h"

namespace tessera::chaos::report_detail {

namespace {

bool intersects(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  for (const auto& x : a) {
    if (std::find(b.begin(), b.end(), x) != b.end()) return true;
  }
  return false;
}

}  // namespace

// The phases of a survived failure's stall (report.h "breakdown").
StallBreakdown breakdownOf(double failure, double commit, double stall, const FailureResult& f,
                           const std::vector<DecisionSeen>& decisions, const std::map<int64_t, double>& formedByEpoch,
                           int64_t commitOuterStep, int commitAttempts, int64_t commitEpoch, double* deadSeen) {
  double seen = -1, decided = -1, redecided = -1, formed = -1;
  for (const auto& d : decisions) {
    for (const auto& member : f.deadMembers) {
      auto it = d.deadSeen.find(member);
      if (it != d.deadSeen.end() && (seen < 0 || it->second < seen)) seen = it->second;
    }
    if (d.unix > failure && d.unix <= commit && intersects(d.dropped, f.deadMembers) && (decided < 0 || d.unix < decided)) {
      decided = d.unix;
    }
    if (d.outerStep == commitOuterStep && d.attempt == commitAttempts - 1 && d.unix <= commit) redecided = d.unix;
  }
  auto f2 = formedByEpoch.find(commitEpoch);
  if (f2 != formedByEpoch.end() && f2->second > failure && f2->second <= commit) formed = f2->second;
  *deadSeen = seen >= 0 ? std::max(0.0, seen - failure) : -1;
  // Boundaries, each no earlier than the one before; a missing one collapses its phase.
  const double b0 = failure;
  // Neither seen nor decided (no elastic events: an older trainer): all of it counts as detection.
  const double b1 = seen >= 0 ? std::max(b0, seen) : decided >= 0 ? std::max(b0, decided) : std::max(b0, commit);
  const double b2 = decided >= 0 ? std::max(b1, decided) : b1;
  const double b3 = redecided >= 0 ? std::max(b2, redecided) : b2;
  const double b4 = formed >= 0 ? std::max(b3, formed) : b3;
  const double b5 = std::max(b4, commit);
  const double s0 = commit - stall, s1 = commit;
  auto clip = [&](double a, double b) { return std::max(0.0, std::min(b, s1) - std::max(a, s0)); };
  StallBreakdown out;
  out.detectionS = clip(b0, b1);
  out.decisionS = clip(b1, b2);
  out.retryS = clip(b2, b3);
  out.formationS = clip(b3, b4);
  out.collectiveS = clip(b4, b5);
  return out;
}

std::vector<KindSummary> summarizeByKind(const std::vector<FailureResult>& failures, double heartbeatTimeoutS) {
  std::vector<KindSummary> byKind;
  for (const auto& f : failures) {
    auto it = std::find_if(byKind.begin(), byKind.end(), [&](const auto& k) { return k.kind == f.kind; });
    if (it == byKind.end()) {
      KindSummary k;
      k.kind = f.kind;
      if (f.kind == "workers") {
        k.targetMeanStallS = 3.0;
        k.targetMaxStallS = 6.0;
      } else if (f.kind == "node" && heartbeatTimeoutS > 0) {
        k.targetMeanStallS = heartbeatTimeoutS + 1.0;
      }
      byKind.push_back(k);
      it = byKind.end() - 1;
    }
    ++it->failures;
  }
  for (auto& k : byKind) {
    std::vector<double> kStalls, kRecoveries, kSeen, detection, decision, retry, formation, collective;
    for (const auto& f : failures) {
      if (f.kind != k.kind || !f.survived) continue;
      ++k.survived;
      kStalls.push_back(f.stallS);
      kRecoveries.push_back(f.recoveryS);
      if (f.deadSeenS >= 0) kSeen.push_back(f.deadSeenS);
      detection.push_back(f.breakdown.detectionS);
      decision.push_back(f.breakdown.decisionS);
      retry.push_back(f.breakdown.retryS);
      formation.push_back(f.breakdown.formationS);
      collective.push_back(f.breakdown.collectiveS);
    }
    k.meanStallS = mean(kStalls);
    if (!kStalls.empty()) k.maxStallS = *std::max_element(kStalls.begin(), kStalls.end());
    k.meanRecoveryS = mean(kRecoveries);
    k.meanDeadSeenS = mean(kSeen);
    k.meanBreakdown = {mean(detection), mean(decision), mean(retry), mean(formation), mean(collective)};
  }
  return byKind;
}

}  // namespace tessera::chaos::report_detail
