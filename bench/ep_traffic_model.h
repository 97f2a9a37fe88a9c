// The bytes an expert-parallel MoE GPT step sends on the ep communicator,
// from the model's shape alone, so `tessera-bench train` can put the
// measured all-to-all traffic beside it.
//
// The ep communicator carries the MoE layers' all-to-alls and nothing else
// of the step but the clipping norm's reduction of the experts' squares
// (parallelize.cc keeps every data-parallel group off it). Per step on the
// rank that reports (rank 0: pipeline stage 0, tp rank 0):
//   all_to_all  parallel::allToAllBytesPerPass(moe layers of the stage,
//               tokens per forward, ep, tp, dtd) per forward, times the
//               forwards per step: train.grad_accum, times
//               pipeline.microbatches when pp > 1 (each a B / M slice of the
//               batch, so tokens per forward = B T / M), times 1.5 under
//               FSDP/hybrid (the block's recomputation in backward repeats
//               the forward's two exchanges of four)
//   grad_norm   LogicalNorm's all-reduce of 2 float64 over ep (the squares of
//               the experts the other ep ranks hold), once per step
// Accounting as the communicators record it: an all-to-all sends the
// buffer less the rank's own part, an all-reduce of n bytes 2 (p-1)/p n.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "launcher/train_config.h"

namespace tessera::bench {

struct EpTrafficModel {
  int ep = 1;
  int tp = 1;
  bool dtd = false;
  int64_t moeLayers = 0;         // MoE layers on the reporting rank's stage
  int64_t tokensPerForward = 0;  // B * T of one micro-batch (routed per forward)
  int64_t capacity = 0;          // C of one forward (before DTD's padding to a multiple of tp)
  double forwardsPerStep = 0;    // micro-batches per step (x 1.5 under FSDP: passes of four exchanges)
  std::map<std::string, double> termBytes;  // per step, by term name (above)
  double totalBytes = 0;                    // per step, with the job's parallel.moe_dtd
  double totalBytesWithoutDtd = 0;          // per step, the same job with moe_dtd = false
};

// The model for `job` (a GPT with model.use_moe). Local, no communication.
// Throws InvalidArgument for any other model.
EpTrafficModel expertParallelTrafficPerStep(const launcher::TrainJobConfig& job);

}  // namespace tessera::bench
