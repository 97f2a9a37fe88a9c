// The training benchmark: runs the job a tessera-train config describes (the
// same TrainJob tessera-train builds) for a few steps and reports throughput,
// where the time went (compute vs exposed communication), how much of the
// communication the strategy hid behind backward, and the model FLOP/s as a
// fraction of this machine's sgemm peak measured in the same run.
#pragma once

#include <string>
#include <vector>

#include "tessera/launcher/init.h"

namespace tessera::bench {

struct TrainBenchConfig {
  std::string configPath;              // a tessera-train TOML file
  std::vector<std::string> overrides;  // "section.key=value", applied after the file
  int64_t steps = 20;                  // timed optimizer steps (after one untimed warm-up step)
  void validate() const;
};

// Collective over ctx.world. Rank 0 prints one JSON object:
// {"bench": "train", "ranks", "strategy", "parameters", "steps", "tokens_per_s",
//  "step_s", "compute_s", "comm_exposed_s", "comm_total_s", "overlap_fraction",
//  "comm_bytes", "comm" (per communicator), "model_flops_per_s",
//  "sgemm_peak_flops_per_s", "mfu"}; with parallel.tp > 1 a "tp" object
//  (tp_traffic_model.h), and for an MoE GPT with parallel.ep > 1 or
//  parallel.moe_dtd an "ep" object: "degree", "dtd", "tp", "moe_layers",
//  "tokens_per_forward", "capacity", "bytes_per_step" (the ep communicator's,
//  timed steps), "model_bytes_per_step" (ep_traffic_model.h),
//  "measured_over_model", "model_terms", and with DTD
//  "model_bytes_per_step_without_dtd", "reduction_measured" (that / measured)
//  and "reduction_model" (that / the model's bytes with DTD).
void runTrainBench(DistributedContext& ctx, const TrainBenchConfig& config);

}  // namespace tessera::bench
