// Activation offload for pipeline stages (PipeOffload, arXiv 2503.01328):
// after a micro-batch's F the tensors autograd saved for its backward move to
// host memory, and come back ahead of its B, overlapped with the compute in
// between.
//
// Mechanism: saved-tensor hooks through tessera's own autograd Engine.
// libtorch exposes default saved-tensor hooks only to Python, but every
// SavedVariable (the slot an autograd node keeps a tensor in) asks the default
// Engine for hooks when it is built (Engine::get_default_saved_variable_hooks,
// the virtual Python's engine overrides). The first ActivationPool of a
// process installs a subclass of the engine as the default one
// (torch::autograd::set_default_engine_stub; offload_engine.cc). It hands out
// hooks only while a Capture is alive on the calling thread; everywhere else
// it returns none and autograd runs exactly as before. Processes that never
// build a pool never install it. Every op is covered (LayerNorm, attention,
// GELU, the deferred Linear, dropout masks) without tessera wrapping them.
//
// What is offloaded: whole storages, each once, however many saved tensors
// (views) share it; on unpack each view is rebuilt on the reloaded storage
// with its own sizes, strides, offset and dtype, so backward sees bitwise the
// tensors F saved and gradients are bitwise those without offload. Never
// offloaded nor counted: leaves that require grad (parameters; a stage's
// input, which the executor holds anyway), views of them (weight.t()) and the
// storages of
// Options::parameters (layers may save a DETACHED parameter, e.g. the
// deferred Linear's weight). Kept resident but counted: storages smaller than
// Options::minBytes, and tensors on devices other than CPU and CUDA.
//
// Copies: one copy thread per pool runs offload and reload jobs in the order
// they were asked for. CPU: a memcpy to a fresh host buffer (there is no
// device memory on CPU; what drops is residentBytes(), tessera's exact count
// of activation bytes in the compute pool). CUDA: the copy thread issues the
// copies on a side stream of the device (after an event recorded on the
// compute stream at offload(), so F's kernels have written the tensors) into
// pinned host memory and waits for them; reloaded storages are allocated on
// the compute stream, so the caching allocator orders their reuse with B.
// The CUDA branch is written against c10's device-generic stream API (no
// CUDA headers) and has NOT been run (no GPU here).
//
// Threads: a pool is used from one compute thread (the executor's) plus its
// own copy thread; residentBytes() and peakResidentBytes() may be read from
// any thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::parallel::pipeline {

namespace detail {
struct PoolState;
}  // namespace detail

// The saved activations of one pipeline stage, keyed like the executor's
// (chunk, micro-batch) key.
class ActivationPool {
 public:
  struct Options {
    // "none" | "all" | "selective" (pipeline.offload). Only shouldOffload()
    // reads it: the pool moves whatever offload() is asked to move.
    std::string policy = "none";
    // selective: bytes of saved activations the stage may keep resident
    // (pipeline.offload_budget_mb * 2^20); 0 = none resident.
    double budgetBytes = 0;
    // Storages smaller than this stay resident (a copy costs more than it saves).
    int64_t minBytes = 4096;
    // The stage's parameters: storages never offloaded nor counted.
    std::vector<at::Tensor> parameters;
    // Longest wait of an unpack (and of waitIdle) for a copy, in seconds.
    double timeoutSeconds = 300;
    // Fault injection for tests: runs on the copy thread before each
    // storage's copy (reload = false for an offload), once the storage is
    // marked in flight; an exception it throws fails that copy.
    std::function<void(int64_t key, bool reload)> beforeCopy;
  };

  // Starts the copy thread and, the first time in the process, installs the
  // offload engine (also for policy "none": such a pool only counts, e.g. the
  // baseline of a measurement; build no pool at all for a run that neither
  // offloads nor measures). Throws InvalidArgument for an unknown policy or a
  // negative budget (naming pipeline.offload / pipeline.offload_budget_mb).
  explicit ActivationPool(Options options);
  // Stops the copy thread after its current job (queued jobs are dropped;
  // tensors still saved in live graphs stay usable: an unpack of an
  // offloaded one copies it back on the calling thread).
  ~ActivationPool();
  ActivationPool(const ActivationPool&) = delete;
  ActivationPool& operator=(const ActivationPool&) = delete;

  // RAII: while alive, the tensors autograd saves on THIS thread belong to
  // `key` (the executor wraps each F in one). Captures nest (the innermost
  // wins); destroy them in reverse order of creation, on the same thread.
  class Capture {
   public:
    virtual ~Capture() = default;
  };
  std::unique_ptr<Capture> capture(int64_t key);

  // Asynchronously moves key's offloadable storages to host memory. Returns
  // at once. InvalidArgument naming the key when it was never captured or is
  // released.
  void offload(int64_t key);
  // Asynchronously brings key's offloaded storages back. An unpack during B
  // waits (up to timeoutSeconds, then TimeoutError naming the key) for its
  // storage; one that was offloaded and not asked back is copied back by the
  // unpack itself. A failed copy makes the unpack throw Error naming the key
  // and the cause. InvalidArgument naming the key as offload().
  void reload(int64_t key);
  // After B: forgets the key. Its saved tensors are freed by autograd when
  // the graph goes (they leave residentBytes() then, not here).
  void release(int64_t key);
  // Blocks until the copy thread has no job left (tests, measurements).
  // TimeoutError after timeoutSeconds.
  void waitIdle();

  // Bytes of saved activations resident in the compute pool now: saved, not
  // yet freed by autograd and not offloaded, each storage once, by its nbytes.
  int64_t residentBytes() const;
  int64_t peakResidentBytes() const;
  void resetPeak();  // peak := resident now

  // The policy's choice for one key: "none" never, "all" always, "selective"
  // while the resident bytes of the keys captured and not offloaded exceed
  // budgetBytes (so the earliest, longest-lived micro-batches go first).
  // withOffload() below makes the same choice ahead of time for a schedule.
  bool shouldOffload(int64_t key) const;

  const Options& options() const { return options_; }

 private:
  Options options_;
  std::shared_ptr<detail::PoolState> state_;
};

// pipeline.offload values: "none", "all", "selective".
const std::vector<std::string>& offloadPolicies();

// Adds kOffload right after each chosen F (after the sends that directly
// follow it) and kReload ahead of its B (kBackwardInput or kBackward) by one
// compute action: just before the compute action that precedes B on the
// rank, so the copy back overlaps it. A (chunk, m) whose B comes within two
// compute actions of its F is never chosen (nothing would stay off the
// device). Existing kOffload/kReload actions are dropped first.
//   "none"       the schedule unchanged (minus old offload actions).
//   "all"        every (chunk, m) with room between F and B.
//   "selective"  per rank, walking its list: wherever the resident count
//                exceeds `budgetMicroBatches`, the live (chunk, m) with the
//                largest F-to-B gap is chosen (the early micro-batches and
//                first chunks, PipeOffload's longest-lived ones), until the
//                count stays within budget everywhere or nothing is left.
// Unit of the budget: micro-batch activations of the whole stage, as in
// PipelineCosts::memF (a chunk pass counts 1/v with v chunks per rank). The
// executor converts pipeline.offload_budget_mb with the bytes one
// micro-batch's F saved (residentBytes() growth over that F). A chosen
// (chunk, m) counts as resident during its F and from its reload to its B.
// InvalidArgument for an unknown policy or a negative budget.
PipelineSchedule withOffload(PipelineSchedule schedule, const std::string& policy, double budgetMicroBatches);

}  // namespace tessera::parallel::pipeline
