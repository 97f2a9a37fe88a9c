// AdamW with low-precision state: MS-AMP's levels O2 and O3 on the optimizer
// side (FP8-LM, arXiv 2310.18313 §2.3; REFERENCE.md §8).
//
//   states = "fp8" (O2): the first moment m is stored as FP8 E4M3 codes with
//     one per-tensor power-of-two scale s_m (the largest with amax(m) * s_m
//     <= 448, chosen afresh from the NEW m at every step; a scaled cast that
//     saturates); the second moment v as FP16 with its own power-of-two scale
//     s_v (amax(v) * s_v <= 65504). 8 bytes of state per parameter become 3.
//   master = "fp16" (O3): the optimizer keeps an FP16 master copy of each
//     parameter; the update is computed from it and the result, rounded to
//     FP16, is both the new master and (cast to the parameter's dtype) the
//     new parameter.
//
// One step, per parameter, is optimizer.cc's AdamW (torch's formula, the
// same operations in the same order, in fp32); only the storage changes:
//   w    = master ? float(master) : p                       (fp32)
//   w   *= 1 - lr * wd                                      (decoupled decay)
//   m    = decode(codes_m) / s_m;  m = beta1 * m + (1 - beta1) * g
//   v    = float(v16) / s_v;       v = beta2 * v + (1 - beta2) * g^2
//   w   += -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)      (bc_k = 1 - beta_k^t)
//   s_m  = pow2scale(amax(m), 448);    codes_m = E4M3(m * s_m)
//   s_v  = pow2scale(amax(v), 65504);  v16 = fp16(v * s_v)
//   master ? (master = fp16(w), p = master) : p = w
// The update uses this step's fp32 m and v; the quantization only affects
// what the next step starts from. With states = "fp32" the moments are fp32
// tensors and the step equals AdamW's bit for bit.
//
// Why v has a scale (MS-AMP's LBAdamW scales it too): unscaled FP16 flushes
// values below 2^-24 to zero, and v ~ g^2 is that small for gradients below
// ~2^-12. Then sqrt(v) = 0, the denominator is just eps, and the update
// m / eps explodes. With a per-tensor scale, v keeps 40 binades below its
// amax (FP16's normal and subnormal range), i.e. gradients down to 2^-20 of
// the largest; m in E4M3 keeps only ~18 binades below its amax, so an
// element whose stored v underflows has had its stored m underflow first,
// and its update from the stored history is 0, not m / eps. eps is added
// after the square root in fp32, exactly as AdamW does. A scale is 1 when
// the amax is 0 or not finite (NaN/inf then show in the codes: E4M3 keeps
// NaN; inf saturates to +-448).
//
// Whole-tensor ZeRO (O3's sharding, beside FSDP's flat shards that cut
// tensors): with WholeTensorShards, each parameter is owned by one rank of
// the data-parallel communicator; only the owner holds its master and
// moments and updates it, then every parameter is broadcast from its owner.
// Ownership is greedy by size and deterministic: parameters in decreasing
// numel order (ties: lower index first) each go to the rank with the fewest
// elements so far (ties: lower rank). Every rank must pass the same
// parameters in the same order, with equal gradients (after DDP's
// all-reduce): non-owners ignore theirs.
//
// Not here: FP8 weights in the model (the FP8 linear layers quantize the
// parameter they are given), gradient communication, parameter groups.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// Shards the optimizer over whole tensors (see the file comment). A null comm
// or a single-rank comm: no sharding.
struct WholeTensorShards {
  comm::CommPtr comm;  // the data-parallel communicator the parameters are replicated over
};

// The largest power of two s with amax * s <= maxValue, for amax > 0 finite;
// 1 when amax is 0 or not finite. Clamped to [2^-126, 2^126] so that s and
// 1/s are normal fp32 numbers (and dividing by s is exact).
float powerOfTwoScale(float amax, float maxValue);

// Owner rank of each parameter under the greedy rule of the file comment
// (all 0 when ranks == 1). Throws InvalidArgument for ranks < 1.
std::vector<int> wholeTensorOwners(const std::vector<at::Tensor>& parameters, int ranks);

class LowPrecisionAdamW final : public ParameterOptimizer {
 public:
  // config: name must be "adamw"; states and master as in OptimizerConfig.
  // Local, even with shards (ownership is computed, not negotiated). The
  // parameters are shared, not copied, and must outlive the optimizer.
  // Throws ConfigError for a bad config, InvalidArgument for a parameter
  // that is not floating point (float32 unless master = "fp16"),
  // NotSupported for FP8 states of a parameter off the CPU (the codec is
  // CPU-only for now).
  LowPrecisionAdamW(const OptimizerConfig& config, std::vector<at::Tensor> parameters, double lr,
                    WholeTensorShards shards = {});

  std::string name() const override { return "adamw"; }
  // Local without sharding; with it, collective over shards.comm (one
  // broadcast per parameter, in parameter order, from its owner; throws
  // what the comm throws).
  OptimizerStepResult step() override;
  // perParameter: "exp_avg" (uint8 E4M3 codes with states = "fp8", else
  // float32), "exp_avg_sq" (float16 scaled by its aux scale with "fp8", else
  // float32), and with master = "fp16" "master" (float16); all shaped like
  // the parameter, undefined before the first update and for parameters
  // another rank owns. perParameterAux (states = "fp8" only):
  // "exp_avg.scale" and "exp_avg_sq.scale", float32 of shape {1} each
  // (s_m and s_v; the value back is stored / scale). scalars: "step".
  // The tensors alias the live buffers. Local.
  OptimizerState state() const override;
  // Restores exactly what state() returned (same config, same parameters,
  // same sharding). Throws InvalidArgument naming the problem: a missing
  // kind or scalar, a wrong shape or dtype, or FP8 codes without their scale
  // (a checkpoint resharded onto another mesh, which keeps no per-rank
  // scales: resume on the saved mesh, or from a checkpoint of fp32 states).
  // Checks everything before changing anything. Local.
  void loadState(const OptimizerState& state) override;
  std::vector<comm::CommPtr> communicators() const override;

  // The owner rank of each parameter (all 0 without sharding).
  const std::vector<int>& owners() const { return owners_; }

 private:
  void updateOne(size_t i, const at::Tensor& grad, double biasCorrection1, double biasCorrection2);
  void broadcastFromOwners();

  OptimizerConfig config_;
  comm::CommPtr comm_;      // null without sharding
  int rank_ = 0;
  std::vector<int> owners_;
  bool fp8States_ = false;
  bool fp16Master_ = false;
  // Per parameter, defined only where this rank owns it and after its first update.
  std::vector<at::Tensor> expAvg_;        // uint8 codes (fp8) or float32
  std::vector<at::Tensor> expAvgSq_;      // float16 scaled (fp8) or float32
  std::vector<at::Tensor> expAvgScale_;   // float32 {1} (fp8 only)
  std::vector<at::Tensor> expAvgSqScale_; // float32 {1} (fp8 only)
  std::vector<at::Tensor> master_;        // float16 (master = fp16 only)
  int64_t step_ = 0;
};

}  // namespace tessera::optim
