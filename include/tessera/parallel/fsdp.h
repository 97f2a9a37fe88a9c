// FullyShardedDataParallel (ZeRO-3): parameters, gradients and optimizer
// state sharded over the dp_shard communicator; optionally replicated across
// dp_replicate (hybrid sharding).
//
// The model is cut into units: each GPT block (or each named submodule given
// to the generic constructor as an FsdpUnitSpec) is one unit, and every other
// trainable parameter forms the root unit. A unit's forward returns its
// activation and, optionally, an auxiliary loss (an MoE block's load-balancing
// loss); both carry gradient. A unit's parameters are flattened, in
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
//                     (activation recomputation) -> backpropagate the
//                     gradients of both outputs (x and aux) -> free;
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
// Pipelines (issue 16). setGradientArrivals(N): a unit's backward runs N
// times per synced step (once per micro-batch); the first N - 1 flat
// gradients accumulate in the per-unit buffer as under noSync, the N-th
// launches the reduce-scatter of the sum -- never of a partial gradient.
// Split backward: when a unit's tessera Linear / Embedding layers defer their
// weight gradients (WeightGrad::kDeferred, weight_grad_store.h), FSDP finds
// their store at each backward and queues the unit's post-backward (flatten
// B's gradients plus the dW that W delivered into the parameters' .grad,
// count the arrival, reduce-scatter or accumulate, free the gathered
// parameters) in that store right after the unit's dW closures, so the
// store's FIFO order runs it after them. Memory cost: the unit's gathered
// parameters (P' floats) live from B to W, because W's deliveries and
// the recomputed graph's edges refer to them; with several micro-batches
// between a unit's B and its W the unit stays gathered across them (the
// re-gather is skipped, on every rank alike). finishGradientSync() throws
// InvalidArgument while a post-backward has not run (W not drained). The
// store must be drained while this object lives.
//
// Communicators: each unit is sharded over its own shard comm and replicated
// over its own replicate comm (FsdpUnitSpec; null takes the constructor's),
// so expert parameters can live on a different group than dense ones. The
// root always uses the constructor's. A unit's gradient is the average over
// its shard comm (and its replicate comm when hybrid) times its
// gradientScale (1 by default, which multiplies nothing).
//
// Nested units: a unit's prefix may lie inside another's ("blocks.0.moe.experts"
// inside "blocks.0"). Each parameter belongs to the LAST unit in spec order
// whose prefix names it, so list the inner unit after the outer one: the inner
// unit takes its parameters out of the outer one, and the outer unit's forward
// must run the inner part through forwardUnit(inner, ...) (its parameters are
// gathered only there). Layers (split backward's deferred-store lookup) go
// to the same unit as their parameters.
//
// Expert parallelism (issue 17): with FsdpExpertUnits, each MoE block's
// experts ("blocks.<i>.moe.experts", the module block.moe->experts) are a
// unit of their own, listed right after their block, run through the block's
// MoE layer (MoeFeedForwardImpl::setExpertRunner), sharded over the experts'
// shard comm (dp_shard: the ranks holding the same experts) while the dense
// units use the constructor's (dp_shard x ep), and scaled by 1 / ep (their
// all-to-all already summed every ep rank's tokens into them: the sum over
// the holders divided by N). Cost of the nesting: the experts are gathered
// and run three times per step (the block's forward, the block's
// recomputation in backward, and their own recomputation in their backward),
// the dense block parts twice, as before.
//
// Randomness inside a unit (dropout): the backward recomputation must draw
// exactly the forward's random numbers. It does when the unit's randomness is
// a function of a key rather than of a generator's state -- the GPT's
// counter-based dropout masks, keyed by (seed, step, micro-batch, site,
// element index) and set by GptImpl::setRandomKey(step, microBatch) before each
// forward -- and the key is not changed between a unit's forward and its
// backward (set it before each micro-batch's forward, as the training loop
// does; the blocks hold the key, so FSDP cannot restore it). The micro-batch
// number includes the data-parallel rank (dp_rank * accumulation_steps + i),
// so ranks draw different masks for their different examples, as Megatron's
// per-rank streams do. A unit that draws from torch's generator would get
// different masks in the recomputation and wrong gradients.
//
// Gradient communication precision (FsdpConfig::gradComm,
// `parallel.grad_comm`; gradient_comm.h): fp32 reduce-scatters as is (the
// default, bit-exact); bf16 sends the unit's flat gradient as bfloat16 (half
// the bytes); fp8 runs comm::reduceScatterCompressed (kFp8, kAvg: E4M3 on the
// wire, a quarter of the bytes). The hybrid replicate all-reduce follows the
// same setting. Cost of fp8: its reduce-scatter runs synchronously where the
// async one would be launched (at the unit's post-backward, on autograd's
// thread), because the FP8 ring issues collectives of its own on the shard
// comm, which must stay in order with the next unit's all-gather on every
// rank -- so in fp8 the reduce-scatters no longer overlap backward. The fp8
// replicate all-reduces run one after another per replicate comm (one FP8
// ring in flight per communicator). FsdpConfig::fp8Scaling picks fp8's
// shared scale: "safe" (the default, overflow-free) or "auto" (FP8-LM: each
// unit owns one Fp8AutoScaler for its reduce-scatter and, when hybrid, one
// for its replicate all-reduce). stats().fp8LastStep / .fp8 report the
// values encoded and saturated and mu's range over the scalers.
//
// What this deliberately does not do: prefetching the next unit's all-gather
// (gathers are blocking; reduce-scatters overlap with backward), mixed
// precision parameters or compute, CPU offload, parameters of other dtypes than float32, and frozen
// parameters (requires_grad = false are left alone, unsharded, and not
// synced). Every rank must run the same units in the same order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/gradient_comm.h"

namespace torch::nn {
class Module;
}
namespace tessera::models {
class GptImpl;
class MoeFeedForwardImpl;
}

namespace tessera::parallel {

// What a unit's forward returns. Implicit from a tensor, so a forward that
// returns only its activation needs no wrapping.
struct FsdpUnitOutput {
  FsdpUnitOutput() = default;
  FsdpUnitOutput(at::Tensor x) : x(std::move(x)) {}  // NOLINT(google-explicit-constructor)
  FsdpUnitOutput(at::Tensor x, at::Tensor aux) : x(std::move(x)), aux(std::move(aux)) {}
  at::Tensor x;    // the activation, e.g. (B, T, C)
  at::Tensor aux;  // the unit's auxiliary loss, e.g. MoE's () fp32 scalar; undefined when it has none
};

// One FSDP unit of a generic module: the parameters named `prefix` or
// `prefix.*`, how to run the unit on an activation, and the communicators its
// parameters are sharded and replicated over.
struct FsdpUnitSpec {
  std::string prefix;                                         // e.g. "blocks.0", "1"
  std::function<FsdpUnitOutput(const at::Tensor&)> forward;  // runs the unit on x; deterministic given
                                                              // x, the parameters and any random key
  comm::CommPtr shardComm;      // null: the constructor's shardComm
  comm::CommPtr replicateComm;  // null: the constructor's replicateComm; a single-rank comm: none
  // Multiplies the unit's gradient after the reduce-scatter's average over
  // shardComm (and the hybrid average over replicateComm): 1 / ep for expert
  // units under expert parallelism. Finite and > 0 (InvalidArgument otherwise).
  double gradientScale = 1.0;
};

// Makes every held MoE block's experts an FSDP unit of their own (file
// comment), for the GPT constructor. Null comms take the constructor's.
struct FsdpExpertUnits {
  comm::CommPtr shardComm;      // the ranks holding the same experts along dp_shard (e.g. the mesh's dp_shard)
  comm::CommPtr replicateComm;  // the same along dp_replicate when hybrid; a single-rank comm: none
  double gradientScale = 1.0;   // 1 / ep under expert parallelism (FsdpUnitSpec::gradientScale)
};

// Options of FSDP beyond its units and communicators.
struct FsdpConfig {
  // Precision of the gradient reduce-scatter and of the hybrid replicate
  // all-reduce (`parallel.grad_comm`; file comment).
  GradientComm gradComm = GradientComm::kFp32;
  // fp8's shared scale (`precision.fp8_comm_scaling`; gradient_comm.h):
  // kSafe (the default) or kAuto with one scaler per unit and collective,
  // configured by fp8AutoScale (the same on every rank; ConfigError from the
  // constructor for a bad one). Ignored unless gradComm is kFp8.
  Fp8Scaling fp8Scaling = Fp8Scaling::kSafe;
  comm::Fp8AutoScaleConfig fp8AutoScale;
};

// Not copyable or movable (autograd nodes and the GPT's block runner refer to
// it). Must outlive every backward through it. The public methods are called
// from the training thread; unit backward runs on autograd's thread.
class FullyShardedDataParallel {
 public:
  struct State;  // defined in fsdp.cc
  // Collective over every unit's shard and replicate comms (and the
  // constructor's): broadcasts rank 0's parameters over each unit's whole
  // data-parallel group (replicate then shard), then shards them; afterwards
  // the module's trainable parameters are empty. `units` must name disjoint
  // submodules with at least one trainable parameter each; a parameter
  // reachable under two names (tied) always goes to the root unit. Every
  // rank passes the same units in the same order. The module is referenced,
  // not owned. Throws InvalidArgument for a null shardComm, an unknown or
  // empty unit prefix, a non-float32 parameter; CommError/TimeoutError from
  // the comms.
  FullyShardedDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> units, comm::CommPtr shardComm,
                           comm::CommPtr replicateComm = nullptr, FsdpConfig config = {});
  // Every GPT block is a unit (dense or MoE, any dropout; an MoE block's aux
  // loss is the unit's aux), over the constructor's comms; installs a block
  // runner on `gpt` (removed by the destructor). With `experts`, every held
  // MoE block's experts are a unit "blocks.<i>.moe.experts" right after the
  // block's unit, over its shardComm / replicateComm and scaled by
  // its gradientScale, run through an expert runner installed on the
  // block's MoE layer (removed by the destructor); a GPT without MoE blocks
  // then gets no expert unit. `experts` is read during the call only (null:
  // no expert units). Collective as above.
  FullyShardedDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm, comm::CommPtr replicateComm = nullptr,
                           const FsdpExpertUnits* experts = nullptr, FsdpConfig config = {});
  // Local. Leaves the module's parameters as they are: empty, or the full
  // values when unshard() is in effect (call it first to keep them).
  ~FullyShardedDataParallel();
  FullyShardedDataParallel(const FullyShardedDataParallel&) = delete;
  FullyShardedDataParallel& operator=(const FullyShardedDataParallel&) = delete;

  // Runs unit `index` on x through the gather/run/free autograd function (or
  // directly when unshard() is in effect or grad mode is off -- then it only
  // gathers and frees); the aux output, when the unit has one, carries
  // gradient into the unit like x. Collective over the unit's shard comm.
  FsdpUnitOutput forwardUnitWithAux(size_t index, const at::Tensor& x);
  // The same for a unit without an aux loss; throws InvalidArgument (on every
  // rank alike) when the unit returns one, whose gradient would be lost.
  at::Tensor forwardUnit(size_t index, const at::Tensor& x);

  // Collective: gathers the root unit (no-op when already gathered or
  // unsharded). Call it before every forward, evaluation included: outside
  // [beforeForward, finishGradientSync] the root's parameters are empty.
  void beforeForward();
  // Collective over every unit's comms, after the last backward of a step;
  // see the file comment. Inside noSync() it does nothing. Throws what the
  // comms throw.
  void finishGradientSync();
  // Collective over every distinct shard comm (in unit order): the L2 norm of
  // the gradient of the parameters this rank's units hold (padding
  // contributes 0). When every unit's parameters are the same logical tensors
  // on every data-parallel rank, that is the whole model's norm, the same on
  // every rank; units whose parameters differ across groups (experts under
  // expert parallelism) contribute only this rank's group's part
  // (withLogicalNorm, logical_norm.h, counts every parameter once).
  double gradNorm();

  // RAII; scopes nest. Every rank must use the same pattern.
  std::unique_ptr<NoSyncScope> noSync();

  // Backward passes per synced step after which a unit reduce-scatters: the
  // largest arrivals(name) over its parameters (null: 1). The root is always
  // reduced once, by finishGradientSync(). Local; call between steps (throws
  // InvalidArgument during one, or for a count < 1). finishGradientSync()
  // reduces a unit short of its arrivals anyway (so peers do not hang) and
  // then throws InvalidArgument naming it. See the file comment.
  void setGradientArrivals(std::function<int(const std::string& name)> arrivals);

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

  // Since construction. Gathers and the root's gradient launch count toward
  // the unit's shard comm, waiting for a reduce-scatter toward the unit's
  // shard comm, the hybrid all-reduce toward its replicate comm. fp8Total /
  // fp8LastStep: every unit's reduce-scatter and replicate all-reduce (one
  // call each per synced step; "safe" reduce-scatters count this rank's
  // saturated values only, everything else every rank's, the same on all).
  DataParallelStats stats() const;
  // The constructor's shard comm (the root's, and the default of every unit).
  const comm::CommPtr& shardComm() const;

 private:
  std::shared_ptr<State> state_;
  models::GptImpl* gpt_ = nullptr;  // runner installed; cleared by the destructor
  std::vector<models::MoeFeedForwardImpl*> expertRunners_;  // the same, for expert units
};

using Fsdp = FullyShardedDataParallel;

// DataParallel over FSDP: name() is "fsdp", or "hybrid" when replicateComm
// has more than one rank. Collective as the constructors above.
std::unique_ptr<DataParallel> makeFsdpDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm,
                                                   comm::CommPtr replicateComm = nullptr,
                                                   const FsdpExpertUnits* experts = nullptr, FsdpConfig config = {});
std::unique_ptr<DataParallel> makeFsdpDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> units,
                                                   comm::CommPtr shardComm, comm::CommPtr replicateComm = nullptr,
                                                   FsdpConfig config = {});

}  // namespace tessera::parallel
