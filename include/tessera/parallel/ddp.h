// DistributedDataParallel: every rank of a data-parallel group holds a full
// replica of the model, runs forward/backward on its own slice of the global
// batch, and averages gradients with its peers so that every replica takes the
// same optimizer step.
//
// Gradients are grouped into buckets (flat buffers of about bucketCapBytes)
// and each bucket is all-reduced asynchronously as soon as all its gradients
// are ready, while backward is still computing earlier layers. Parameters are
// assigned to buckets in reverse registration order because backward produces
// gradients roughly in that order, so the first bucket fills first.
//
// A step, on every rank of the group:
//
//   auto loss = lossOf(model->forward(x));       // this rank's slice
//   loss.backward();                             // hooks launch all-reduces
//   ddp.finishGradientSync();                    // wait; .grad = average
//   optimizer.step();
//
// Gradient accumulation: backward passes inside a `noSync()` scope only
// accumulate into .grad locally (no communication); the first backward outside
// the scope syncs the accumulated sum.
//
// Pipelines (issue 16): a parameter's gradient may arrive in several backward
// passes per synced step -- one per micro-batch, and with the split backward
// one per deferred weight-gradient delivery (W) rather than per B.
// setGradientArrivals(N) makes a parameter ready at its N-th hook firing of
// the synced step: the first N - 1 arrivals only accumulate into .grad (as
// inside noSync), the N-th copies .grad + its gradient into the bucket. So
// the bucket's all-reduce cannot start on a partial gradient, and a parameter
// whose gradient comes later (W) is not reported unused at B.
//
// Groups: the parameters are split into groups, each averaged over its own
// communicator (DdpGroup), so that expert parameters can reduce over the
// expert-data-parallel group while dense ones reduce over all of dp. The
// simple constructors make one group of every parameter. A bucket holds
// parameters of one group only. A group may scale its averaged gradients
// (DdpGroup::gradientScale: expert gradients are the sum over their holders
// divided by the whole data-parallel size, not by the holders' count).
//
// Communication precision (DdpConfig::gradComm, `parallel.grad_comm`;
// gradient_comm.h): fp32 all-reduces each bucket as is (bit-exact, the
// default); bf16 sends each bucket as bfloat16 (half the bytes; the average
// comes back to the fp32 .grad); fp8 sends each bucket through the FP8 ring
// (a quarter of the bytes, one shared power-of-two scale per bucket). The
// FP8 ring allows one call in flight per communicator, so a group's fp8
// buckets run one after another on a background thread each, every one
// starting when the previous bucket on the same comm completes: launched from
// the hooks as before, they still overlap backward. During a synced backward
// with fp8, nothing else may issue collectives on a group's comm (the ring's
// own small collectives run on those threads). The group's gradientScale
// applies after the average in every mode. Every rank gets bit-identical
// gradients in every mode. DdpConfig::fp8Scaling picks fp8's shared scale:
// "safe" (the default: no partial sum saturates) or "auto" (FP8-LM: each
// bucket owns one Fp8AutoScaler, whose mu halves after a step in which the
// bucket's saturated fraction exceeded the threshold); DdpSyncStats::fp8
// reports the values encoded and saturated, and mu's range over the buckets.
//
// What this deliberately does not do: sharding (FSDP lives in its own file),
// re-broadcasting buffers every forward (buffers are broadcast once, at
// construction), sparse gradients, or mixed-precision compute (autocast is
// the precision layer's).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/parallel/gradient_comm.h"

namespace torch::nn {
class Module;
}

namespace tessera::parallel {

struct DdpConfig {
  // Target size of one gradient bucket, in bytes. A parameter larger than
  // this gets a bucket of its own. Smaller buckets start communicating
  // earlier but pay more per-call latency. Must be > 0.
  int64_t bucketCapBytes = 25 * 1024 * 1024;
  // What happens to a parameter that received no gradient in a synced step
  // (not used by this rank's forward, or frozen mid-graph):
  // - true: finishGradientSync() marks it ready with its local .grad (zeros
  //   when it has none) so its bucket is all-reduced normally; afterwards its
  //   .grad is the group's average like every other parameter's.
  // - false: the same happens (so peers never hang in a half-launched
  //   bucket), then finishGradientSync() throws InvalidArgument naming the
  //   parameters and pointing at this option.
  // Either way an unused parameter costs overlap: buckets launch in index
  // order, so its bucket and every later one wait for finishGradientSync().
  // (Unlike PyTorch, the autograd graph is not searched for unused
  // parameters before backward.)
  bool findUnusedParameters = false;
  // Broadcast parameters and buffers from rank 0 at construction, so every
  // replica starts identical. Turn off only when replicas are known equal.
  bool broadcastAtConstruction = true;
  // Precision of the gradient all-reduce (`parallel.grad_comm`; file comment).
  // bf16 and fp8 need float32 parameters, fp8 also CPU ones (InvalidArgument
  // from the constructor otherwise).
  GradientComm gradComm = GradientComm::kFp32;
  // fp8's shared scale (`precision.fp8_comm_scaling`; gradient_comm.h):
  // kSafe, the overflow-free default, or kAuto, FP8-LM's automatic scaling
  // with one scaler per bucket configured by fp8AutoScale (every rank must
  // pass the same). Ignored unless gradComm is kFp8.
  Fp8Scaling fp8Scaling = Fp8Scaling::kSafe;
  comm::Fp8AutoScaleConfig fp8AutoScale;

  // Throws ConfigError ("ddp.bucket_cap_bytes", "fp8_comm.<field>") for a bad value.
  void validate() const;
};

// Communication time of one synced step, or summed over steps.
//
// commSeconds is the wall time during which at least one bucket's all-reduce
// was in flight (the union of [launch, completion] over buckets). Completion
// is observed by polling at every gradient hook and exactly at
// finishGradientSync(), so it is an upper bound by at most the time between
// two hooks. exposedSeconds is the time finishGradientSync() spent launching
// leftover buckets and blocked in wait(): communication the backward did not
// hide. hidden = comm - exposed. The ...ByComm maps split bytes and
// exposedSeconds by communicator name (Communicator::name()); each sums to its
// total. A bucket's launch and wait count toward its group's communicator
// (waiting on one group's bucket while another's completes counts toward the
// one waited on); groups whose communicators share a name share an entry.
struct DdpSyncStats {
  int64_t steps = 0;            // synced steps counted
  int64_t buckets = 0;          // buckets all-reduced
  int64_t bucketsLaunchedInBackward = 0;  // of those, launched by a gradient hook (overlappable)
  int64_t bytes = 0;            // gradient bytes all-reduced, at the wire precision (each rank's buffer:
                                // numel * 4 / 2 / 1 for fp32 / bf16 / fp8)
  double commSeconds = 0;       // see above
  double exposedSeconds = 0;    // see above
  std::map<std::string, int64_t> bytesByComm;          // sums to bytes
  std::map<std::string, double> exposedSecondsByComm;  // sums to exposedSeconds
  // grad_comm fp8: the buckets' FP8 figures, the same on every rank (one
  // call per bucket and step; saturated counts every rank's values); with
  // fp8Scaling kAuto, minMu / maxMu over the buckets' scalers after the step
  // (a sum keeps the latest). All zero in fp32 / bf16.
  GradientFp8Stats fp8;

  double hiddenSeconds() const { return commSeconds > exposedSeconds ? commSeconds - exposedSeconds : 0.0; }
  // In [0, 1]; 0 when nothing was communicated.
  double hiddenFraction() const { return commSeconds > 0 ? hiddenSeconds() / commSeconds : 0.0; }
  DdpSyncStats& operator+=(const DdpSyncStats& other);
};

// One communicator and the parameters whose gradients it averages.
struct DdpGroup {
  comm::CommPtr comm;  // not null; its ranks hold replicas of the group's parameters
  // Selects parameters (and, with the module constructor, buffers) by name.
  // Empty selects every name. A name belongs to the first group that selects it.
  std::function<bool(const std::string& name)> selects;
  // Multiplies the group's gradients after the average over `comm`: .grad =
  // gradientScale * (sum over comm's ranks) / comm->size(). Expert
  // parallelism's expert group: its comm is the ranks holding the same experts
  // (dp_replicate), whose gradients already carry every ep rank's tokens (the
  // all-to-all's backward), so gradientScale = 1 / ep makes them the sum over
  // the holders divided by the whole data-parallel size N = dp_replicate * ep,
  // as the single-process gradient is. At 1.0 (the default) nothing is
  // multiplied, so the average stays bit-exact. Must be finite and > 0
  // (InvalidArgument from the constructor otherwise).
  double gradientScale = 1.0;
};

// Not copyable; movable. The hooks it installs on the parameters are removed
// by its destructor, so the module may outlive it (and be wrapped again).
//
// Thread-safety: the hooks may run on autograd worker threads; internal state
// is guarded by a mutex, and bucket all-reduces are issued under it in bucket
// order, so the collective order on each communicator is the same on every
// rank whatever thread runs the hook. The public methods must be called from
// the training thread, not concurrently with backward.
class DistributedDataParallel {
  struct State;

 public:
  using NamedParameter = std::pair<std::string, at::Tensor>;

  // Collective over every group's comm (when config.broadcastAtConstruction):
  // every rank passes a module with the same parameter names, shapes and
  // dtypes, in the same order, and groups with the same selections. Each
  // parameter with requires_grad is synced over the first group that selects
  // its name, and takes the value of that comm's rank 0; each buffer is only
  // broadcast, over the first group that selects it. The module is
  // referenced, not owned: it must outlive this object. Throws ConfigError
  // for a bad config; InvalidArgument for no groups, a null comm, a
  // parameter or buffer no group selects, a group that selects no parameter,
  // or a parameter that is not a dense CPU-or-comm-device tensor; and what
  // the communicators throw (CommError when ranks disagree on the layout).
  DistributedDataParallel(torch::nn::Module& module, std::vector<DdpGroup> groups, DdpConfig config = {});
  // The same over an explicit list of parameters (leaf tensors with
  // requires_grad; names select groups and appear in errors) and no buffers.
  DistributedDataParallel(std::vector<NamedParameter> parameters, std::vector<DdpGroup> groups,
                          DdpConfig config = {});
  // Conveniences: one group, every parameter averaged over comm.
  DistributedDataParallel(torch::nn::Module& module, comm::CommPtr comm, DdpConfig config = {});
  DistributedDataParallel(std::vector<NamedParameter> parameters, comm::CommPtr comm, DdpConfig config = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;
  DistributedDataParallel(DistributedDataParallel&&) noexcept;
  DistributedDataParallel& operator=(DistributedDataParallel&&) noexcept;

  // Collective over every group's comm: every rank calls it once after each
  // synced backward (the same number of times, in the same order relative to
  // other collectives on those comms). Launches the buckets that are not yet
  // launched (handling unused parameters as DdpConfig::findUnusedParameters
  // says), waits for all of them, and writes each group's average into every
  // synced parameter's .grad. Afterwards the next backward starts a new step.
  // Called with no backward since the last call, it syncs the current .grad
  // values (all parameters count as unused). Inside a noSync() scope it does nothing.
  // Throws what wait() throws (TimeoutError, CommError: the object is
  // unusable afterwards) and InvalidArgument for unused parameters (see
  // DdpConfig).
  void finishGradientSync();

  // RAII scope for gradient accumulation. While one is alive, backward passes
  // do not communicate and .grad accumulates locally. Scopes nest. Every rank
  // must use the same pattern of synced and unsynced backward passes.
  class NoSyncGuard {
   public:
    ~NoSyncGuard();
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard(NoSyncGuard&& other) noexcept;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    friend class DistributedDataParallel;
    explicit NoSyncGuard(std::shared_ptr<State> state);
    std::shared_ptr<State> state_;
  };
  // Throws InvalidArgument when a synced backward has started but
  // finishGradientSync() has not run yet (its gradients would be half-sent).
  [[nodiscard]] NoSyncGuard noSync();

  // How many gradient arrivals (hook firings: one per backward pass that
  // produces the parameter's gradient) make each parameter complete in a
  // synced step; `arrivals(name)` gets the parameter's name (a tied tensor's
  // first) and must return >= 1. Null restores 1 for every parameter (one
  // backward per synced step). Arrivals inside noSync() are not counted (they
  // accumulate locally), and the count restarts at every synced step, so k - 1
  // accumulating steps then one synced step of N arrivals average the sum of
  // all of them. A parameter with fewer arrivals than declared at
  // finishGradientSync() is treated as unused (DdpConfig::findUnusedParameters);
  // one more arrival than declared throws InvalidArgument from the hook. Local;
  // throws InvalidArgument while a synced step is under way (call it between
  // steps) or for a count < 1.
  void setGradientArrivals(std::function<int(const std::string& name)> arrivals);

  // Statistics of the last synced step and summed since construction or
  // resetStats().
  DdpSyncStats lastStepStats() const;
  DdpSyncStats totalStats() const;
  void resetStats();

  // The bucket layout: names of each bucket's parameters, bucket 0 first
  // (it holds the last registered parameters).
  std::vector<std::vector<std::string>> bucketParameterNames() const;
  // The groups as constructed (the simple constructors: one, selecting all).
  const std::vector<DdpGroup>& groups() const;
  const DdpConfig& config() const;

 private:
  std::shared_ptr<State> state_;
};

using Ddp = DistributedDataParallel;

}  // namespace tessera::parallel
