// How tessera's Linear and Embedding compute: the extension points of the one
// layer that tensor parallelism (issue 14), the pipeline's deferred weight
// gradient (issue 16) and bf16 / FP8 (issue 18) extend.
//
// A layer validates its options, so a mode it cannot have fails loudly rather
// than silently computing the plain thing. Model code builds layers and calls
// forward(); a sharded or FP8 layer changes what happens inside forward() and
// which slice the layer holds, never the model's calls.
//
// Deliberately not here: any collective. core/ is the ground floor and does
// not see comm/; a sharded layer talks to the ShardGroup interface below, which
// parallel/ implements over a mesh axis's communicator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "tessera/core/numerics/fp8_scaling.h"

namespace tessera::models {

// How a layer's weight is split over a ShardGroup of p ranks (REFERENCE.md §9,
// Megatron-LM arXiv 1909.08053). Rank r holds one box of each logical weight
// (a fused column layer: one box per fused block). Splits follow shardRange.
enum class Sharding {
  kNone,        // every rank holds the whole weight
  kColumn,      // Linear: W (out, in) split along out, A = [A_1 ... A_p]; output sharded along its last dim
  kRow,         // Linear: W split along in; input sharded, partial outputs summed over the group
  kVocabulary,  // Embedding: rows shardRange(V, p, r); ids outside the shard masked, then summed
};

// The arithmetic of the layer's GEMM.
enum class Precision {
  kDefault,  // the dtype of the operands (fp32 parameters: fp32), as torch::nn::Linear
  kFp32,     // always fp32, operands cast up: the MoE router, whose top-k choice flips on small logit errors
  kBf16,     // bf16 operands, fp32 accumulation, fp32 result (autocast-like; precision.h)
  kFp8,      // Linear only: E4M3 forward / E5M2 gradients under LayerOptions::fp8 (precision.h)
};

// When the weight-gradient GEMM of backward runs.
enum class WeightGrad {
  kWithInput,  // in the same backward as the input gradient (ordinary autograd)
  kDeferred,   // backward computes grad_input (and the bias gradient) and queues dW = dY^T X in a
               // WeightGradStore (issue 16's B/W split); linear.h says how dW is delivered
};

const char* toString(Sharding sharding);
const char* toString(Precision precision);

// The group a sharded layer is split over, seen from core/. Its methods are
// Megatron-LM's region functions (megatron/core/tensor_parallel/mappings.py),
// each a paired autograd function; parallel/tp_regions.h implements them
// over the communicator of the mesh's tp axis. Every method is collective:
// each rank of the group calls it in the same order with tensors of matching
// shape. Implementations throw CommError / TimeoutError as their communicator
// does (a peer that never arrives fails within the communicator's timeout,
// naming the operation).
//
// "Split along dim" always means p equal contiguous parts in rank order;
// x.size(dim) must be divisible by p (InvalidArgument otherwise).
class ShardGroup {
 public:
  virtual ~ShardGroup() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  // The axis name for messages and per-axis traffic ("tp").
  virtual std::string name() const = 0;

  // Tensor-parallel regions (a TP block's entry and exit).
  // f: identity forward, all-reduce-sum of the gradient backward.
  virtual at::Tensor copyToShards(const at::Tensor& x) = 0;
  // g: all-reduce-sum forward, identity backward.
  virtual at::Tensor reduceFromShards(const at::Tensor& x) = 0;
  // This rank's part of x split along `dim` forward; all-gather of the gradient backward.
  virtual at::Tensor scatterToShards(const at::Tensor& x, int64_t dim) = 0;
  // All-gather along `dim` (rank order) forward, this rank's part of the gradient backward.
  virtual at::Tensor gatherFromShards(const at::Tensor& x, int64_t dim) = 0;

  // Sequence-parallel regions (Korthikanti et al., arXiv 2205.05198): the
  // all-reduce of a TP block becomes an all-gather at its entry and a
  // reduce-scatter at its exit, the same bytes.
  // All-gather along `dim` forward, reduce-scatter of the gradient along `dim` backward.
  virtual at::Tensor gatherFromSequence(const at::Tensor& x, int64_t dim) = 0;
  // Reduce-scatter (sum) along `dim` forward, all-gather of the gradient backward.
  virtual at::Tensor reduceScatterToSequence(const at::Tensor& x, int64_t dim) = 0;

  // Not differentiable (the vocab-parallel cross-entropy's own backward
  // needs none): a reduced copy of x, x unchanged.
  virtual at::Tensor allReduceSum(const at::Tensor& x) = 0;
  virtual at::Tensor allReduceMax(const at::Tensor& x) = 0;
};

// The rows [begin, begin + size) of n that rank `index` of `parts` holds when
// n is split as Megatron-LM splits a vocabulary: padded to a multiple of
// parts (chunk = ceil(n / parts)), rank r covering padded rows
// [r * chunk, (r + 1) * chunk), of which only those below n exist. Even when
// parts divides n; the last ranks hold fewer rows otherwise. Throws
// InvalidArgument when a rank would hold no row (n <= (parts - 1) * chunk).
struct ShardRange {
  int64_t begin = 0;
  int64_t size = 0;
};
ShardRange shardRange(int64_t n, int64_t parts, int64_t index);

// Where a deferred weight gradient waits (issue 16): the pipeline's per-stage
// store, drained by the schedule's W action (QueuedWeightGradStore in
// weight_grad_store.h keys it by chunk and micro-batch). A deferred layer's
// backward hands over a closure that computes dW and delivers it through
// autograd to the weight (hooks fire, AccumulateGrad adds into .grad; see
// linear.h). The store owns the closure and must run it exactly once, before
// the step's gradient sync, on a thread that may run autograd (not inside a
// hook of the same weight); a closure dropped unrun loses that gradient.
// Closures keep the GEMM's input X and output gradient dY alive until run.
// Other owners (FSDP's post-backward) may defer their own work behind a
// layer's closures and rely on the store running one key's closures in the
// order they were deferred. defer() is called from autograd's thread:
// implementations must be safe to call concurrently with their other methods.
class WeightGradStore {
 public:
  virtual ~WeightGradStore() = default;
  virtual void defer(std::function<void()> weight_grad_gemm) = 0;
};

// Options of a Linear, Embedding or LayerNorm. The defaults are the plain layer.
struct LayerOptions {
  Sharding sharding = Sharding::kNone;
  std::shared_ptr<ShardGroup> group;                   // required when sharding != kNone or sequence_parallel
  // Sequence parallelism over `group`: activations outside TP blocks are
  // split along the sequence (the second-to-last dim of (..., T, C)).
  //   kColumn Linear / the vocabulary-parallel head (Embedding::attend): the
  //     input arrives sequence-sharded and is gathered (gatherFromSequence)
  //     instead of copied (copyToShards).
  //   kRow Linear / kVocabulary Embedding::forward: the partial sums are
  //     reduce-scattered along the sequence instead of all-reduced.
  //   kNone with a group (LayerNorm, the position table, a row layer's bias):
  //     a replicated parameter used on this rank's sequence shard, so its
  //     gradient is summed over the group (copyToShards on the parameter).
  bool sequence_parallel = false;
  // kColumn only: the output is `fused_blocks` equal blocks, each split over
  // the group on its own (qkv: 3 blocks [q; k; v], so every rank holds the
  // same heads of q, k and v). This rank's weight rows are its part of each
  // block, in block order: `fused_blocks` pieces of the logical weight.
  int64_t fused_blocks = 1;
  Precision precision = Precision::kDefault;
  numerics::Fp8RecipeConfig fp8;  // the scaling recipe when precision == kFp8 (fp8_scaling.h)
  WeightGrad weight_grad = WeightGrad::kWithInput;
  std::shared_ptr<WeightGradStore> weight_grad_store;  // required when weight_grad == kDeferred

  // Throws InvalidArgument for a mode without its group or store, a sharding
  // the layer kind cannot have, fused blocks without column sharding, or kFp8
  // on a layer other than Linear (the tied head and LayerNorm keep their
  // precision; precision.h says why) or kBf16 on a LayerNorm; ConfigError
  // naming "fp8.<field>" for a bad recipe config under kFp8.
  enum class Kind { kLinear, kEmbedding, kNorm };
  void validate(const std::string& layer, Kind kind) const;
};

}  // namespace tessera::models
