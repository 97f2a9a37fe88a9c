// The report's insides (report.h computes it), shared by its files:
//   report.cc           reading the journal and the metrics files, and the
//                       figures (commits, failures, joins, per node)
//   stall_breakdown.cc  a survived failure's stall by phase, and the
//                       per-kind summaries with issue 19's targets
//   report_output.cc    report.json and the gnuplot figure
// Private to bench/chaos/: not an API, nothing outside these files includes it.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "bench/chaos/report.h"

namespace tessera::chaos::report_detail {

// A metrics or journal line's fields, with a fallback when absent or of another type.
inline double number(const nlohmann::json& j, const char* key, double fallback = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}
inline int64_t integer(const nlohmann::json& j, const char* key, int64_t fallback = -1) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<int64_t>() : fallback;
}
inline bool isStep(const nlohmann::json& j) { return !j.contains("event") && j.contains("step") && j.contains("loss"); }

// -1 for no values.
inline double mean(const std::vector<double>& values) {
  if (values.empty()) return -1;
  double sum = 0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

// A "decision" event (elastic.h): published by the leader when it changed something.
struct DecisionSeen {
  double unix = 0;
  int64_t outerStep = 0;
  int attempt = 0;
  std::vector<std::string> dropped;
  std::map<std::string, double> deadSeen;  // member -> when the leader's monitor first held it dead
};

// The phases of a survived failure's stall (report.h "breakdown").
StallBreakdown breakdownOf(double failure, double commit, double stall, const FailureResult& f,
                           const std::vector<DecisionSeen>& decisions, const std::map<int64_t, double>& formedByEpoch,
                           int64_t commitOuterStep, int commitAttempts, int64_t commitEpoch, double* deadSeen);

// Per kind of failure (report.h "by kind"), in the order kinds first failed,
// with issue 19's targets; heartbeatTimeoutS <= 0: no target for "node".
std::vector<KindSummary> summarizeByKind(const std::vector<FailureResult>& failures, double heartbeatTimeoutS);

}  // namespace tessera::chaos::report_detail
