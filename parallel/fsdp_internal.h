// FSDP's internal state, shared by its translation units: fsdp.cc (layout,
// construction, the public methods) and fsdp_unit.cc (gathering and freeing
// a unit, the gather/run/free autograd function with recomputation in
// backward, and the per-unit gradient reduce-scatter pipeline). Not a public
// header: nothing outside parallel/fsdp*.cc includes it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/core/timer.h"
#include "tessera/parallel/fsdp.h"

namespace torch::nn {
class Module;
}
namespace tessera::models {
class WeightGradStore;
}

namespace tessera::parallel::fsdp_internal {

// One unit: its parameters' place in the flat buffer and this rank's shard.
struct Unit {
  std::string name;                          // the prefix, or "<root>"
  comm::CommPtr shardComm;                   // the unit's (the constructor's by default)
  comm::CommPtr replicateComm;               // null unless replicated over > 1 rank
  double gradientScale = 1.0;                // FsdpUnitSpec::gradientScale (the root: 1)
  std::vector<std::string> paramNames;
  std::vector<at::Tensor> params;            // the module's parameter tensors
  std::vector<std::vector<int64_t>> shapes;  // their full (local) shapes
  // Each parameter's place in its logical tensor (models::logicalParameters):
  // the whole tensor for plain layers, a slice for a sharded layer's (a TP
  // slice); FSDP's flat shard of it is a flat range of that slice.
  std::vector<models::ParameterLayout> logical;
  std::vector<int64_t> offsets;              // into the flat buffer
  int64_t numel = 0;                         // P
  int64_t paddedNumel = 0;                   // P' = ceil(P / N) * N
  int64_t shardNumel = 0;                    // P' / N
  at::Tensor shard;                          // (P'/N,) fp32 leaf, requires_grad
  at::Tensor full;                           // (P',) while gathered, else undefined
  at::Tensor accumulated;                    // (P',) noSync / earlier arrivals' gradient sum, else undefined
  int needed = 1;                            // backward passes that complete it in a synced step (the root: 1)
  int arrived = 0;                           // of those, counted so far in this synced step
  // The unit's tessera Linear / Embedding layers (each in the innermost unit
  // whose prefix names it, as parameters are): a deferred one (split
  // backward) names the WeightGradStore the unit's post-backward waits in.
  std::vector<torch::nn::Module*> gemmLayers;
  int holds = 0;                             // post-backwards queued in that store: the unit stays gathered
  // fp8 scaling "auto" (else null): FP8-LM's scalers of the unit's two
  // gradient streams, the reduce-scatter and (hybrid) the replicate all-reduce.
  std::unique_ptr<comm::Fp8AutoScaler> shardScaler;
  std::unique_ptr<comm::Fp8AutoScaler> replicateScaler;
  std::function<FsdpUnitOutput(const at::Tensor&)> forward;  // empty for the root
};

// A reduce-scatter in flight: `input` is the unit's full flat gradient,
// `output` receives this rank's averaged slice.
struct PendingReduce {
  size_t unit = 0;
  at::Tensor input;
  at::Tensor output;
  comm::WorkPtr work;
  SteadyClock::time_point launchedAt;
  bool done = false;
};

// `name` is `prefix` or lies under it ("blocks.1.attn.qkv.weight" under "blocks.1").
bool hasPrefix(const std::string& name, const std::string& prefix);

double secondsBetween(SteadyClock::time_point from, SteadyClock::time_point to);

}  // namespace tessera::parallel::fsdp_internal

namespace tessera::parallel {

struct FullyShardedDataParallel::State {
  using Unit = fsdp_internal::Unit;
  using PendingReduce = fsdp_internal::PendingReduce;

  comm::CommPtr shardComm;      // the constructor's: the root's and every unit's default
  comm::CommPtr replicateComm;  // the same; null unless hybrid with > 1 replica
  GradientComm gradComm = GradientComm::kFp32;  // FsdpConfig::gradComm
  std::vector<Unit> units;      // spec order; the root last when it has parameters
  bool hasRoot = false;
  bool unsharded = false;       // unshard() in effect

  // Guards noSyncDepth, pending and stats: unit backward runs on autograd's thread.
  mutable std::mutex mutex;
  int noSyncDepth = 0;
  std::vector<PendingReduce> pending;
  DataParallelStats stats;
  GradientFp8Stats fp8Step;     // fp8: the current synced step's figures so far

  Unit& root() { return units.back(); }

  // Caller holds the mutex. Every exposed second and byte is counted through
  // these, so the per-comm maps sum to the totals.
  void countExposed(const comm::CommPtr& comm, double seconds);
  void countBytes(const comm::CommPtr& comm, int64_t bytes);

  // Makes the unit's parameters views of `full` (P',). Local.
  static void bind(Unit& unit, at::Tensor full);
  // Swaps empty tensors into the unit's parameters; the flat buffer dies with
  // its last reference. Local.
  static void release(Unit& unit);
  // Collective over the unit's shard comm: all-gather its shards into its parameters.
  void gather(Unit& unit);

  // Units may reduce over different comms, whose operations complete
  // independently: poll every one. Caller holds the mutex.
  void pollCompletions();
  // A unit's full flat gradient (P',) from its backward: accumulate it inside
  // noSync, otherwise (plus what noSync accumulated) reduce-scatter it.
  // In a synced step the unit's first needed - 1 gradients (setGradientArrivals)
  // accumulate the same way, and the last one launches the reduce-scatter of the sum.
  // Takes the mutex.
  void reduceUnitGradient(size_t index, at::Tensor flat);
  // Reduce-scatters flat plus what the unit accumulated (async, over the
  // unit's shard comm). Caller holds the mutex.
  void launchReduce(size_t index, at::Tensor flat);
  // The WeightGradStore the unit's deferred layers queue their dW in, or null
  // when none is deferred. Local.
  static std::shared_ptr<models::WeightGradStore> deferredStore(const Unit& unit);
  // A unit's post-backward: its gradient from B (`grads`, per parameter,
  // undefined where B produced none) plus what the deferred weight-gradient
  // deliveries accumulated in the parameters' .grad, flattened and handed to
  // reduceUnitGradient. `held`: the unit was kept gathered for W; free it
  // after the last such post-backward.
  void postBackward(size_t index, const std::vector<at::Tensor>& grads, bool held);
  // The root's full gradients (accumulated in .grad by autograd) go the same
  // way as a unit's; then its full parameters are freed. Collective.
  void reduceRootGradient();

  // Unit `index` (not the root) on x through the gather/run/free autograd
  // function: {x} or {x, aux} as the unit returns, with grad_fn. Collective
  // over the unit's shard comm, in forward and again in backward.
  std::vector<at::Tensor> runWithRecomputation(size_t index, const at::Tensor& x);
};

namespace fsdp_internal {

// Collective: the unit is gathered while this object lives and freed after,
// also when the unit's forward throws -- unless a backward of the unit awaits
// its deferred weight gradients (holds > 0): then it is already gathered (the
// parameters do not change within a step, so the gather is skipped on every
// rank alike) and stays gathered for them.
class GatheredUnit {
 public:
  GatheredUnit(FullyShardedDataParallel::State& state, Unit& unit) : unit_(unit) {
    if (!unit.full.defined()) state.gather(unit);
  }
  ~GatheredUnit() {
    if (unit_.holds == 0) FullyShardedDataParallel::State::release(unit_);
  }
  GatheredUnit(const GatheredUnit&) = delete;
  GatheredUnit& operator=(const GatheredUnit&) = delete;

 private:
  Unit& unit_;
};

}  // namespace fsdp_internal
}  // namespace tessera::parallel
