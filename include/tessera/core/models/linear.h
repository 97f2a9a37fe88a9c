// tessera's linear layer: y = x W^T + b, the one GEMM-bearing layer every
// model uses (the GPT's qkv, proj, fc and untied head; every MoE expert and
// the router; the MLP classifier). Tensor parallelism (column / row), the
// deferred weight gradient and bf16 / FP8 are modes of this layer
// (layer_options.h), so they reach every model without touching model code.
//
// Parameters (relative to the layer): weight (out, in), bias (out) when bias.
// A layer knows each parameter's logical shape and the slice it holds
// (DeclaresParameterLayout); plain layers hold the whole tensor.
//
// Sharded over a ShardGroup of p ranks (REFERENCE.md §9, Megatron-LM), rank r:
//   kColumn  Y = X A^T with A's rows (the outputs) split: rank r holds the rows
//            shardRange(out, p, r) of W and b (with fused_blocks k: that part of
//            each of the k blocks). forward: x (..., in) whole -> (..., out_r),
//            the input entering through copyToShards (f) -- or, with sequence
//            parallelism, gatherFromSequence from (..., T/p, in).
//   kRow     W's columns (the inputs) split: rank r holds W[:, shardRange(in, p, r)]
//            and the whole bias. forward: x (..., in_r) -> (..., out): the partial
//            products summed by reduceFromShards (g) -- or reduce-scattered along
//            the sequence to (..., T/p, out) -- then the bias added once.
// Every sharded forward is collective over the group (see ShardGroup).
//
// Deferred weight gradient (WeightGrad::kDeferred, issue 16's B/W split; the
// layer's weight_grad_store, usually a QueuedWeightGradStore of
// weight_grad_store.h): the GEMM's backward (B) returns the input gradient
// dY W and the bias gradient, returns nothing for the weight, and hands the
// store a closure that later (W) computes dW = dY^T X (leading dims
// flattened, in the operands' dtype like autograd's) and delivers it through
// autograd from the weight's gradient edge: tensor hooks on the weight
// (DDP's) fire then, once per delivered GEMM, and AccumulateGrad adds into
// .grad, as in an ordinary backward. A weight that reached the GEMM through
// copyToShards (a replicated layer on sequence shards) or an fp32 cast is
// delivered through that node, so its all-reduce / cast runs in W. The store
// owns the closure; it keeps X and dY alive (the activation memory W costs)
// and the weight's gradient edge (its AccumulateGrad, which refers to the
// parameter), never a copy of W. Works in every sharding and precision mode:
// only the GEMM is replaced. Every backward through the GEMM defers one
// closure (a retained graph run twice defers two). Set per layer with
// setWeightGradStore, or for a whole module with setDeferredWeightGradients.
//
// Initial values: construction draws PyTorch's default (U(-1/sqrt(in),
// 1/sqrt(in)) for weight and bias, from torch's global generator) so a layer
// used on its own behaves like torch::nn::Linear. A model overwrites every
// parameter with the layout-independent init of init.h (a function of seed,
// parameter name and logical shape), so the model's values never depend on
// torch's generator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/layer_options.h"
#include "tessera/core/models/logical_parameters.h"

namespace tessera::models {

struct Fp8LinearScalers;  // precision.h

// The GEMM every tessera layer runs: x (..., in) -> x W^T + b (..., out) under
// `options`' precision (kFp32 casts operands and computes in fp32; kDefault
// uses the operands' dtype; kBf16 / kFp8: precision.h). bias may be
// undefined. Embedding::attend (the tied head) runs it too, in the
// embedding's precision (never kFp8: layer_options.h). kFp8 needs the layer's
// scaling state `fp8` (InvalidArgument without it) and is collective over a
// sharded layer's group (precision.h's fp8Linear).
// With options.weight_grad == kDeferred (and grad mode on) the GEMM is
// deferredLinear below, after the precision cast.
at::Tensor applyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const LayerOptions& options, Fp8LinearScalers* fp8 = nullptr);

// y = x W^T + b whose backward computes the gradients of x and b and defers
// the weight's into `store` (see the file comment). x (..., in), weight
// (out, in), bias (out) or undefined. Throws InvalidArgument for a null store.
// Defined in deferred_linear.cc.
at::Tensor deferredLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          std::shared_ptr<WeightGradStore> store);

class LinearImpl : public torch::nn::Module, public DeclaresParameterLayout {
 public:
  // Throws InvalidArgument for non-positive sizes, and what
  // LayerOptions::validate throws for a mode this build lacks.
  LinearImpl(int64_t in_features, int64_t out_features, bool bias = true, LayerOptions options = {});

  // x: (..., in) -> (..., out); sharded layers: see the file comment.
  at::Tensor forward(const at::Tensor& x);

  // Switches a whole (kNone) layer to `options`, keeping this rank's slice of
  // the current values (the parameters change shape in place, through
  // set_data, so references to them stay valid). For parallelize() applying
  // tensor parallelism to a built model, before any optimizer or wrapper sees
  // it. Throws InvalidArgument when the layer is already sharded, or for
  // options LayerOptions::validate rejects, or sizes the group cannot split
  // (fused blocks: out must divide by fused_blocks).
  void shard(LayerOptions options);

  // Switches a sharded (kColumn / kRow) layer between the plain regions and
  // the sequence-parallel ones along the second-to-last dim (layer_options.h),
  // keeping its slice: the split is the same, only where the group
  // communicates changes. Expert parallelism's duplicate-token dropping runs
  // the experts this way along their slot dim. Local; call between steps.
  // InvalidArgument for a layer that is not kColumn / kRow.
  void setSequenceParallel(bool on);

  // The part of the logical dimension this rank holds: the output rows
  // (kColumn, per fused block), the input columns (kRow); {0, full} when whole.
  ShardRange outputRange() const;
  ShardRange inputRange() const;

  const ParameterLayout* parameterLayout(const std::string& local_name) const override;
  // Local: a non-null store switches the layer to WeightGrad::kDeferred into
  // it, null back to kWithInput. Call between steps (a graph already built
  // keeps its mode).
  void setWeightGradStore(std::shared_ptr<WeightGradStore> store);

  // Local: switches the GEMM's precision (kFp8 with `fp8` as its recipe,
  // a fresh scaling state). For setPrecision (precision.h); call between
  // steps. Throws what LayerOptions::validate throws, leaving the layer as it was.
  void setPrecision(Precision precision, const numerics::Fp8RecipeConfig& fp8 = {});
  // The FP8 scaling state (kFp8 layers; null otherwise). Owned by the layer;
  // reset by shard() and setPrecision().
  Fp8LinearScalers* fp8Scalers() const { return fp8_.get(); }

  const LayerOptions& options() const { return options_; }
  int64_t inFeatures() const { return in_features_; }    // logical (whole-layer) sizes
  int64_t outFeatures() const { return out_features_; }

  at::Tensor weight;  // (out, in)
  at::Tensor bias;    // (out); undefined without bias

 private:
  void setLayouts();
  void resetFp8State();

  int64_t in_features_;
  int64_t out_features_;
  LayerOptions options_;
  ParameterLayout weight_layout_;
  ParameterLayout bias_layout_;
  std::shared_ptr<Fp8LinearScalers> fp8_;  // kFp8 only
};
TORCH_MODULE(Linear);

}  // namespace tessera::models
