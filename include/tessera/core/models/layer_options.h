// How tessera's Linear and Embedding compute: the extension points of the one
// layer that tensor parallelism (issue 14), the pipeline's deferred weight
// gradient (issue 16) and bf16 / FP8 (issue 18) extend.
//
// Today every layer is plain: unsharded, fp32 (or the dtype of its operands),
// ordinary autograd. The options already carry the fields those issues fill,
// and a layer validates them at construction, so a mode that does not exist
// yet fails loudly (NotSupported naming the issue that adds it) rather than
// silently computing the plain thing. Model code builds layers and calls
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

namespace tessera::models {

// How a layer's weight is split over a ShardGroup of p ranks (REFERENCE.md §9,
// Megatron-LM arXiv 1909.08053). Rank r holds one box of each logical weight.
enum class Sharding {
  kNone,        // every rank holds the whole weight
  kColumn,      // Linear: W (out, in) split along out, A = [A_1 ... A_p]; output sharded along its last dim
  kRow,         // Linear: W split along in; input sharded, partial outputs summed over the group
  kVocabulary,  // Embedding: rows [r*V/p, (r+1)*V/p); ids outside the shard masked, then summed
};

// The arithmetic of the layer's GEMM.
enum class Precision {
  kDefault,  // the dtype of the operands (fp32 parameters: fp32), as torch::nn::Linear
  kFp32,     // always fp32, operands cast up: the MoE router, whose top-k choice flips on small logit errors
  kBf16,     // bf16 operands, fp32 accumulation (issue 18)
  kFp8,      // E4M3 forward / E5M2 gradients with scaling recipes (issue 18)
};

// When the weight-gradient GEMM of backward runs.
enum class WeightGrad {
  kWithInput,  // in the same backward as the input gradient (ordinary autograd)
  kDeferred,   // backward computes grad_input only and queues dW = dY^T X in a WeightGradStore (issue 16's B/W split)
};

const char* toString(Sharding sharding);
const char* toString(Precision precision);

// The group a sharded layer is split over, seen from core/. Its methods are
// Megatron-LM's region functions (mappings.py), each a paired autograd
// function; parallel/ implements them over the communicator of a mesh axis
// (issue 14). Every method is collective: each rank of the group calls it in
// the same order with tensors of matching shape. Implementations throw
// CommError / TimeoutError as their communicator does.
class ShardGroup {
 public:
  virtual ~ShardGroup() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  // The axis name for messages and per-axis traffic ("tp").
  virtual std::string name() const = 0;
  // f: identity forward, all-reduce-sum of the gradient backward.
  virtual at::Tensor copyToShards(const at::Tensor& x) = 0;
  // g: all-reduce-sum forward, identity backward.
  virtual at::Tensor reduceFromShards(const at::Tensor& x) = 0;
  // All-gather along `dim` (rank order) forward, this rank's part of the gradient backward.
  virtual at::Tensor gatherFromShards(const at::Tensor& x, int64_t dim) = 0;
};

// Where a deferred weight gradient waits (issue 16): the pipeline's per-stage
// store, drained by the schedule's W action. The layer hands over a closure
// that computes dW and accumulates it into the weight's .grad(); the store
// runs it later, on the thread that drains it. Not thread-safe unless the
// implementation says so.
class WeightGradStore {
 public:
  virtual ~WeightGradStore() = default;
  virtual void defer(std::function<void()> weight_grad_gemm) = 0;
};

// Options of a Linear or Embedding. The defaults are the plain layer.
struct LayerOptions {
  Sharding sharding = Sharding::kNone;
  std::shared_ptr<ShardGroup> group;                   // required when sharding != kNone
  Precision precision = Precision::kDefault;
  WeightGrad weight_grad = WeightGrad::kWithInput;
  std::shared_ptr<WeightGradStore> weight_grad_store;  // required when weight_grad == kDeferred

  // Throws NotSupported naming `layer` and the issue that adds a mode this
  // build does not implement yet (every sharding but kNone, bf16, FP8, the
  // deferred weight gradient), InvalidArgument for a mode without its group or
  // store, or a sharding the layer kind cannot have (`embedding` selects which).
  void validate(const std::string& layer, bool embedding) const;
};

}  // namespace tessera::models
