// DataParallel: what a training loop needs from a data-parallel strategy
// (none, DDP, FSDP/ZeRO-3, hybrid), so that the loop is written once and the
// strategy is a config value.
//
// Usage per optimizer step (k micro-batches):
//   for (i < k) {
//     auto guard = i + 1 < k ? dp.noSync() : nullptr;   // accumulate locally
//     dp.beforeForward();
//     loss = model.loss(batch_i) / k;  loss.backward();
//   }
//   dp.finishGradientSync();          // collective
//   double norm = dp.gradNorm();      // collective
//   optimizer.step() on dp.optimizerParameters();
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/state.h"
#include "tessera/parallel/ddp.h"

namespace torch::nn {
class Module;
}

namespace tessera::parallel {

// Communication a strategy did for gradients (and, for FSDP, parameters).
struct DataParallelStats {
  int64_t bytes = 0;           // payload bytes this rank all-reduced / gathered / scattered
  double commSeconds = 0;      // time at least one transfer was in flight
  double exposedSeconds = 0;   // of that, time the training loop waited for it
  // bytes and exposedSeconds split by Communicator::name() (e.g. "world/dp_shard"):
  // the values sum to the totals above. Communicators that share a name share an entry.
  std::map<std::string, int64_t> bytesByComm;
  std::map<std::string, double> exposedSecondsByComm;
  // grad_comm fp8's overflow figures (gradient_comm.h), summed since
  // construction and of the last synced step: values encoded and saturated
  // (fp8LastStep.saturatedFraction() is the step's overflow rate) and, for
  // fp8_comm_scaling "auto", the current mu range. Zero unless fp8.
  GradientFp8Stats fp8Total;
  GradientFp8Stats fp8LastStep;
  double hiddenFraction() const { return commSeconds > 0 ? 1.0 - exposedSeconds / commSeconds : 0.0; }
};

// Which elements of one named model parameter lie where inside an optimizer
// tensor, so that state shaped like optimizerParameters() can be saved by
// parameter name and loaded into another sharding (checkpoint/training_state.h).
// `slice` says which elements of the parameter (core/state.h: an N-D box,
// optionally a flat row-major range of it); they lie, in the slice's own
// element order, at [tensorOffset, tensorOffset + slice.numel) of the flat
// optimizer tensor. none/DDP: the whole parameter; FSDP: a flat range of the
// whole-parameter box (FSDP of a tensor-parallel slice: a flat range of that
// slice's box).
struct ParameterPiece {
  std::string name;              // the module's parameter name, e.g. "blocks.0.attn.qkv.weight"
  std::vector<int64_t> shape;    // that parameter's full (global) shape
  TensorSlice slice;             // which of its elements
  int64_t tensorOffset = 0;      // flat offset within optimizerParameters()[i]
};

// While alive, backward accumulates gradients locally without communicating.
class NoSyncScope {
 public:
  virtual ~NoSyncScope() = default;
};

class DataParallel {
 public:
  virtual ~DataParallel() = default;
  // "none", "ddp", "fsdp", "hybrid".
  virtual std::string name() const = 0;
  // The tensors the optimizer updates: the full parameters (none, DDP) or
  // this rank's shards (FSDP). The same tensors for the object's lifetime.
  virtual std::vector<at::Tensor> optimizerParameters() = 0;
  // Before each forward (FSDP may gather parameters here). Default: nothing.
  virtual void beforeForward() {}
  // Collective: after the last backward of a step. Afterwards the gradients of
  // optimizerParameters() are the averages over every data-parallel rank.
  virtual void finishGradientSync() = 0;
  // Collective when sharded: the L2 norm of the whole model's gradient (after
  // finishGradientSync), the same on every rank; used for clipping.
  // Defined over LOGICAL parameters: sqrt(sum over each logical parameter,
  // counted exactly once whatever its sharding, of |grad|^2). A tensor reached
  // under two names (the tied head) counts once; a replicated tensor (DDP, or
  // later one replicated across tp) counts once, not once per holder; shards
  // (FSDP, later TP/EP slices) are summed over the ranks holding them, and
  // padding counts zero. Implementations that shard sum squares over exactly
  // the group of distinct shards, never over replicas.
  virtual double gradNorm() = 0;
  // See NoSyncScope; nested scopes are allowed.
  virtual std::unique_ptr<NoSyncScope> noSync() = 0;
  // Since construction.
  virtual DataParallelStats stats() const = 0;
  // Per optimizer tensor i, the parameter ranges it holds, in tensorOffset
  // order (elements not covered are padding). none/DDP: one whole piece per
  // parameter; FSDP: this rank's shard cut at parameter boundaries. Local.
  virtual std::vector<std::vector<ParameterPiece>> parameterLayout() const = 0;
  // True when ranks of the data-parallel group hold different pieces (FSDP).
  virtual bool sharded() const = 0;
  // Pipelines: how many gradient arrivals make one parameter's gradient
  // complete in a synced step (one per backward pass -- B or W -- that
  // produces it: M micro-batches, twice for a tensor two chunks of the stage
  // use). The strategy starts a parameter's (DDP bucket's, FSDP unit's)
  // reduction only after the last arrival. `arrivals(name)` takes the module's
  // parameter name; null restores the default, 1 (the Trainer's one backward
  // per synced step). Local; call between steps. With the split backward
  // (weight_grad_store.h) a deferred weight's arrivals are its W deliveries;
  // FSDP finds the store in its units' layers and runs each unit's
  // post-backward behind the unit's W closures (fsdp.h). Pure virtual so that
  // a wrapping strategy cannot forget to forward it.
  virtual void setGradientArrivals(std::function<int(const std::string& name)> arrivals) = 0;
};

// A strategy that wraps another and changes only some of its behaviour (the
// tensor-parallel gradient norm, a pipeline stage's tied copy): every method
// forwards to `inner` unless the subclass overrides it. Owns `inner`.
class DataParallelWrapper : public DataParallel {
 public:
  explicit DataParallelWrapper(std::unique_ptr<DataParallel> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  std::vector<at::Tensor> optimizerParameters() override { return inner_->optimizerParameters(); }
  void beforeForward() override { inner_->beforeForward(); }
  void finishGradientSync() override { inner_->finishGradientSync(); }
  double gradNorm() override { return inner_->gradNorm(); }
  std::unique_ptr<NoSyncScope> noSync() override { return inner_->noSync(); }
  DataParallelStats stats() const override { return inner_->stats(); }
  std::vector<std::vector<ParameterPiece>> parameterLayout() const override { return inner_->parameterLayout(); }
  bool sharded() const override { return inner_->sharded(); }
  void setGradientArrivals(std::function<int(const std::string& name)> arrivals) override {
    inner_->setGradientArrivals(std::move(arrivals));
  }

 protected:
  DataParallel& inner() { return *inner_; }
  const DataParallel& inner() const { return *inner_; }

 private:
  std::unique_ptr<DataParallel> inner_;
};

// A single replica (world of 1, or replication handled elsewhere): no communication.
std::unique_ptr<DataParallel> makeNoDataParallel(torch::nn::Module& model);

// DDP over `comm` (collective: broadcasts rank 0's parameters).
std::unique_ptr<DataParallel> makeDdpDataParallel(torch::nn::Module& model, comm::CommPtr comm, DdpConfig config = {});
// DDP with parameter groups, each averaged over its own communicator
// (DdpGroup: expert parameters over the expert-data-parallel group).
// Collective over every group's comm.
std::unique_ptr<DataParallel> makeDdpDataParallel(torch::nn::Module& model, std::vector<DdpGroup> groups,
                                                  DdpConfig config = {});

// The L2 norm of the gradients of `parameters` (undefined grads count as 0).
double localGradNorm(const std::vector<at::Tensor>& parameters);

}  // namespace tessera::parallel
