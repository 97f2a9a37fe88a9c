// FullyShardedDataParallel (ZeRO-3): parameters, gradients and optimizer
// state sharded over the dp_shard communicator; optionally replicated across
// dp_replicate (hybrid sharding).
//
// The model is cut into units: each GPT block (or each named submodule given
// to the generic constructor) is one unit, and every other trainable
// parameter forms the root unit. A unit's parameters are flattened, in
// registration order, into one flat buffer of P elements, padded to
// P' = ceil(P / N) * N, and rank r of the N shard ranks keeps only
// flat[r * P'/N, (r + 1) * P'/N): an fp32 leaf tensor with requires_grad,
// which is what the optimizer updates (so its state is sharded too). Between
// uses the module's own parameter tensors hold no storage (they are empty
// tensors of shape (0)).
//
// Per step, on every rank (DataParallel's usage comment, with FSDP):
//   beforeForward():  all-gather the root unit; it stays gathered until
//                     finishGradientSync() (the embedding and the tied head
//                     are used at both ends of the forward).
//   forward, unit i:  all-gather -> run under no-grad -> free.
//   backward, unit i: all-gather again -> recompute the unit with grad
//                     (activation recomputation) -> backpropagate -> free;
//                     flatten the parameter gradients and launch an async
//                     reduce-scatter (avg over dp_shard) while backward
//                     continues with earlier units.
//   finishGradientSync(): reduce-scatter the root's gradients, wait for every
//                     reduce-scatter, all-reduce (avg) the shard gradients over
//                     dp_replicate when hybrid, add them into the shards'
//                     .grad, free the root's full parameters.
//
// Gradient accumulation (noSync): inside the scope, each unit's backward adds
// its full (unsharded) flat gradient into a per-unit local buffer and sends
// nothing; the root's full gradients accumulate in the root parameters' .grad
// as usual. The first synced backward adds that buffer to its own gradient
// before the reduce-scatter, so avg(sum) = sum(avg) and the result equals one
// big batch. Cost: full-size gradient memory for the accumulating units while
// inside noSync (what PyTorch FSDP's no_sync also pays).
//
// What this deliberately does not do: prefetching the next unit's all-gather
// (gathers are blocking; reduce-scatters overlap with backward), mixed
// precision, CPU offload, dropout or other randomness inside a unit (the
// backward recomputation would draw different random numbers), MoE blocks
// (their aux loss leaves the block through a side channel), parameters of
// other dtypes than float32, and frozen parameters (requires_grad = false are
// left alone, unsharded, and not synced). Every rank must run the same units
// in the same order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/parallel/data_parallel.h"

namespace torch::nn {
class Module;
}
namespace tessera::models {
class GptImpl;
}

namespace tessera::parallel {

// One FSDP unit of a generic module: the parameters named `prefix` or
// `prefix.*`, and how to run the unit on an activation.
struct FsdpUnitSpec {
  std::string prefix;                                     // e.g. "blocks.0", "1"
  std::function<at::Tensor(const at::Tensor&)> forward;  // runs the unit on x
};

// Not copyable or movable (autograd nodes and the GPT's block runner refer to
// it). Must outlive every backward through it. The public methods are called
// from the training thread; unit backward runs on autograd's thread.
class FullyShardedDataParallel {
 public:
  struct State;  // defined in fsdp.cc
  // Collective over shardComm and (when not null) replicateComm: broadcasts
  // rank 0's parameters over the whole data-parallel group (replicate then
  // shard), then shards them; afterwards the module's trainable parameters
  // are empty. `units` must name disjoint submodules with at least one
  // trainable parameter each; a parameter reachable under two names (tied)
  // always goes to the root unit. The module is referenced, not owned.
  // Throws InvalidArgument for a null shardComm, an unknown or empty unit
  // prefix, a non-float32 parameter; CommError/TimeoutError from the comms.
  FullyShardedDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> units, comm::CommPtr shardComm,
                           comm::CommPtr replicateComm = nullptr);
  // Every GPT block is a unit; installs a block runner on `gpt` (removed by
  // the destructor). Throws InvalidArgument for MoE or dropout > 0.
  FullyShardedDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm, comm::CommPtr replicateComm = nullptr);
  // Local. Leaves the module's parameters as they are: empty, or the full
  // values when unshard() is in effect (call it first to keep them).
  ~FullyShardedDataParallel();
  FullyShardedDataParallel(const FullyShardedDataParallel&) = delete;
  FullyShardedDataParallel& operator=(const FullyShardedDataParallel&) = delete;

  // Runs unit `index` on x through the gather/run/free autograd function (or
  // directly when unshard() is in effect or grad mode is off -- then it only
  // gathers and frees). Collective over shardComm.
  at::Tensor forwardUnit(size_t index, const at::Tensor& x);

  // Collective: gathers the root unit (no-op when already gathered or
  // unsharded). Call it before every forward, evaluation included: outside
  // [beforeForward, finishGradientSync] the root's parameters are empty.
  void beforeForward();
  // Collective, after the last backward of a step; see the file comment.
  // Inside noSync() it does nothing. Throws what the comms throw.
  void finishGradientSync();
  // Collective over shardComm: the L2 norm of the whole model's gradient
  // (padding contributes 0), the same on every rank.
  double gradNorm();

  // RAII; scopes nest. Every rank must use the same pattern.
  std::unique_ptr<NoSyncScope> noSync();

  // This rank's shards, one per unit (root last when it has parameters); the
  // same tensors for the object's lifetime.
  std::vector<at::Tensor> shards() const;

  // Collective over shardComm: gathers every unit into the module, so its
  // parameters hold the full current values (for evaluation and checkpoints).
  // Until reshard(), forwardUnit runs units directly and nothing is synced:
  // do not train in this state. Calling it twice is a no-op.
  void unshard();
  // Local: frees the full parameters unshard() made (the shards keep the values).
  void reshard();

  // Bytes of parameter storage this rank holds now: the shards plus every
  // full parameter buffer currently resident in the module (root between
  // beforeForward and finishGradientSync, a unit while it runs, all after
  // unshard()). Optimizer state is not included.
  int64_t heldParameterBytes() const;
  // Per unit: (name, unsharded element count P, padded count P').
  struct UnitLayout {
    std::string name;
    int64_t numel = 0;
    int64_t paddedNumel = 0;
  };
  std::vector<UnitLayout> layout() const;
  // Local. Per unit (the order of shards()), the parameter ranges this
  // rank's shard holds: the shard [r * P'/N, (r + 1) * P'/N) of the unit's
  // flat buffer cut at parameter boundaries, in tensorOffset order; padding
  // is in no piece. What DataParallel::parameterLayout() returns for FSDP.
  std::vector<std::vector<ParameterPiece>> shardLayout() const;

  DataParallelStats stats() const;
  const comm::CommPtr& shardComm() const;

 private:
  std::shared_ptr<State> state_;
  models::GptImpl* gpt_ = nullptr;  // runner installed; cleared by the destructor
};

using Fsdp = FullyShardedDataParallel;

// DataParallel over FSDP: name() is "fsdp", or "hybrid" when replicateComm
// has more than one rank. Collective as the constructors above.
std::unique_ptr<DataParallel> makeFsdpDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm,
                                                   comm::CommPtr replicateComm = nullptr);
std::unique_ptr<DataParallel> makeFsdpDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> units,
                                                   comm::CommPtr shardComm, comm::CommPtr replicateComm = nullptr);

}  // namespace tessera::parallel
