// [precision]: how a job computes, communicates and stores its numbers --
// fp32, bf16 autocast, or FP8 at one of MS-AMP's levels (FP8-LM, arXiv
// 2310.18313; REFERENCE.md §8) -- resolved once, here, into what each layer
// of the stack does. parallelize() applies the layers' part after tensor and
// expert parallelism and before FSDP / DDP (composition step 3b); the
// launcher builds the optimizer from the plan's optimizer part.
//
//   mode  level  GEMMs (Linear)          gradient comm  Adam states        master / weights
//   fp32   -     fp32                    parallel.grad_comm (fp32 | bf16 | fp8)   fp32
//   bf16   -     bf16 operands, fp32 out parallel.grad_comm                 fp32   fp32 (autocast)
//   fp8    O1    E4M3 fwd / E5M2 grads   fp8 (implied)  fp32               fp32
//   fp8    O2    as O1                   fp8            m FP8 + v FP16     fp32
//   fp8    O3    as O1                   fp8            m FP8 + v FP16     FP16 master; with
//                                                                          strategy "fsdp": ZeRO
//                                                                          over whole tensors
//
// One decision in one place: FP8 levels imply FP8 gradient communication, so
// parallel.grad_comm is a key of the fp32 / bf16 modes; set under fp8 it is a
// ConfigError naming both keys. Under O3, strategy "fsdp" means the
// whole-tensor ZeRO of the optimizer (FSDP's flat shards cut tensors in the
// middle, which per-tensor FP8 scales cannot follow); "hybrid" is refused.
// O2 / O3 replace AdamW's states, so they need optim.name = "adamw".
//
// The embedding, the tied / untied LM head, LayerNorm and the MoE router are
// not switched (models::setPrecision says why); every other Linear is.
#pragma once

#include <string>

#include "tessera/core/models/layer_options.h"
#include "tessera/core/numerics/fp8_scaling.h"
#include "tessera/parallel/gradient_comm.h"

namespace tessera::parallel {

struct PrecisionConfig {
  std::string mode = "fp32";          // "fp32", "bf16", "fp8"
  std::string level = "O1";           // "O1", "O2", "O3"; read only with mode = "fp8"
  std::string fp8_recipe = "delayed"; // "delayed", "tensorwise", "rowwise", "blockwise"
  int64_t amax_history = 16;          // delayed: window length, >= 1
  int margin = 0;                     // scale = 2^(floor(log2(max / amax)) - margin); >= 0
  // The FP8 gradient all-reduce's scale (comm/fp8_allreduce.h): "safe" (no
  // partial sum of N ranks can overflow: 448 / (N amax) as a power of two)
  // or "auto" (FP8-LM's automatic scaling factor, halved on overflow, doubled
  // when stable; the metrics line reports the overflow rate). With
  // parallel.grad_comm = "fp8" in the fp32 / bf16 modes too.
  std::string fp8_comm_scaling = "safe";
};

// What the config means for each part of the stack.
struct PrecisionPlan {
  models::Precision layers = models::Precision::kDefault;  // kDefault (fp32), kBf16, kFp8
  numerics::Fp8RecipeConfig recipe;                        // with kFp8
  GradientComm gradientComm = GradientComm::kFp32;
  bool fp8AutoScaling = false;                             // fp8 gradient comm under FP8-LM's rule
  std::string optimizerStates = "fp32";                    // optim.states: "fp32" or "fp8" (O2, O3)
  std::string master = "fp32";                             // optim.master: "fp32" or "fp16" (O3)
  bool wholeTensorZero = false;                            // O3 with strategy "fsdp"
  std::string label = "fp32";                              // "fp32", "bf16", "fp8-O1", ...
};

// The single resolution. gradComm: parallel.grad_comm as written ("" when
// the config leaves it unset); strategy: parallel.strategy; optimizer:
// optim.name. Throws ConfigError naming precision.<key> (and the conflicting
// key) with the fix. Local and deterministic (every rank gets the same plan).
PrecisionPlan resolvePrecision(const PrecisionConfig& config, const std::string& gradComm,
                               const std::string& strategy, const std::string& optimizer);

}  // namespace tessera::parallel
