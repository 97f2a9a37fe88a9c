// bf16 and FP8 as precision modes of tessera's Linear (layer_options.h's
// Precision; issue 18, REFERENCE.md §8, §10): the layer-level GEMMs that
// applyLinear dispatches to, and the model-level switch and state.
//
// kBf16 (autocast-like): x, W and b cast to bf16, the GEMM in bf16 (CPU and
// CUDA kernels accumulate in fp32), the result cast back to fp32. The fp32
// master parameters are untouched; their gradients arrive in fp32 through
// the casts.
//
// kFp8 (the hybrid FP8 format of FP8-LM / Transformer Engine):
//   forward   y = dq(q_E4M3(x)) dq(q_E4M3(W))^T + b          (b added in fp32 after the GEMM)
//   backward  dY_q = dq(q_E5M2(dY));  dX = dY_q W_q;  dW = dY_q^T X_q;  db = sum dY
// The bias gradient is the unquantized dY's sum, as Transformer Engine's fused
// dbias, and as a row-parallel layer's bias -- added after the reduction,
// outside the GEMM -- must have it anyway.
// with saturating scaled casts whose scales the layer's recipe chooses
// (LayerOptions::fp8; one Fp8Scaler per operand role), fp32 accumulation.
// On the CPU the GEMM is emulated exactly: q then dq (decode to fp32), then
// an fp32 at::linear -- a fake-quant composition: the operand casts are
// straight-through in backward (the GEMM's own backward already multiplies by
// the quantized operands), and the output gradient passes an autograd node
// that casts dY to E5M2 before the GEMM's backward sees it. Because only the
// operands change, the deferred weight gradient (WeightGrad::kDeferred) works
// unchanged: its closure computes dW = dY_q^T X_q.
// On CUDA with torch >= 2.1, a forward-only pass (grad mode off, or no
// operand needing a gradient) under a per-tensor recipe runs at::_scaled_mm
// on the codes (torch 2.1-2.3 return (out, amax), 2.4+ a tensor; both
// guarded). Training steps on CUDA keep the emulated GEMM (its backward is
// autograd's). Untested in CI: no GPU there.
//
// Sharded layers (fp8_scaling.h "Sharding"): the casts apply to the local
// operands inside the sharded forward; a weight's per-tensor amax (kDelayed,
// kTensorwise) is all-reduce-maxed over the layer's ShardGroup, and per-row
// amaxes too for kRowwise on a row-parallel weight, so tp = p casts the
// weight exactly as tp = 1 does. Inputs and output gradients use their local
// tensors (a row-parallel layer's input slice, a column-parallel layer's
// output-gradient slice): their scales are per rank.
//
// What stays out of FP8, and why: the MoE router (kFp32: its top-k flips on
// small logit errors; setPrecision never touches a kFp32 layer) and the tied
// head / Embedding (the logits' range and the loss's sensitivity to them:
// FP8-LM and TE keep the output head in higher precision), which keeps the
// precision it was built with.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "tessera/core/models/layer_options.h"
#include "tessera/core/numerics/fp8_scaling.h"

namespace torch::nn {
class Module;
}

namespace tessera::models {

// The FP8 scaling state of one Linear: a scaler per operand role. Owned by
// the layer; the output-gradient scaler is shared with the backward nodes of
// graphs built by the layer (they cast dY in backward).
struct Fp8LinearScalers {
  explicit Fp8LinearScalers(const numerics::Fp8RecipeConfig& config);

  std::shared_ptr<numerics::Fp8Scaler> input;        // x: E4M3
  std::shared_ptr<numerics::Fp8Scaler> weight;       // W: E4M3
  std::shared_ptr<numerics::Fp8Scaler> grad_output;  // dY: E5M2

  // The three delayed-scaling states concatenated (input, weight,
  // grad_output); 0 elements under the current recipes.
  int64_t stateSize() const;
  at::Tensor state() const;
  // InvalidArgument naming both sizes on a mismatch.
  void loadState(const at::Tensor& state);
};

// y = x W^T + b under kBf16 (above); returns float32. Deferred weight
// gradient when options.weight_grad == kDeferred and grad mode is on.
at::Tensor bf16Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      const LayerOptions& options);

// y = x W^T + b under kFp8 (above), float32, with `scalers` choosing the
// scales. Collective over options.group when the layer is column- or
// row-sharded and its weight amax is reduced (see above): every rank of the
// group must call it in the same order. Deferred weight gradient as bf16Linear.
at::Tensor fp8Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const LayerOptions& options, Fp8LinearScalers& scalers);

// Switches every tessera Linear below `model` (itself included) to
// `precision` (with `fp8` as the recipe under kFp8), except layers built as
// kFp32 (the MoE router), which stay. Embeddings (the tied head) and
// LayerNorms keep theirs. Switching to kFp8 gives each layer a fresh scaling
// state (delayed: scale 1, empty history), even one already in kFp8. Local;
// call between steps, before optimizers and wrappers (DDP, FSDP) are built:
// graphs already built keep their mode. Throws what Fp8RecipeConfig::validate
// throws (prefix "fp8.") before switching anything.
void setPrecision(torch::nn::Module& model, Precision precision, const numerics::Fp8RecipeConfig& fp8 = {});

// Every kFp8 Linear's delayed-scaling state (Fp8LinearScalers::state) in
// module order (Module::apply's: depth first, registration order), flat
// float32; an empty tensor when no layer has any. Training state: checkpoint
// it and send it with live recovery. Per rank: a sharded layer's input and
// gradient histories differ between tp ranks (local amaxes), its weight's do not.
at::Tensor fp8ScalingState(const torch::nn::Module& model);
// Loads what fp8ScalingState returned for a model of the same structure and
// recipes. Throws InvalidArgument naming both sizes when state's element
// count differs from the model's.
void loadFp8ScalingState(torch::nn::Module& model, const at::Tensor& state);

}  // namespace tessera::models
