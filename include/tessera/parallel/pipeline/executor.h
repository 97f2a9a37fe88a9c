// The pipeline executor: one rank's action list of a PipelineSchedule run
// over the pp communicator, plugged into the Trainer through the step seam
// (parallel/step_executor.h). One executor for every schedule: GPipe, 1F1B,
// interleaved, ZB-H1/H2/V and auto differ only in the list they hand it.
//
// Per optimizer step (k = train.grad_accum batches, M = pipeline.microbatches):
// each batch is one pipeline step, split into M equal micro-batches along the
// batch dimension; the first k - 1 pipeline steps run inside the strategy's
// noSync(), the last one synchronizes. The loss of each micro-batch is
// scaled by 1 / (k M), so the gradients are those of the mean over the k
// batches, exactly as without a pipeline.
//
// Mixture of experts (StageModel::hasAuxLoss): every chunk's MoE blocks add
// moe.aux_loss_weight * their aux loss to the objective -- the last chunk
// inside its loss, any other chunk as the aux that forward returns, which B
// scales by the same 1 / (k M) and backpropagates together with the
// activation gradient (one backward over both). So gradients equal pp = 1's
// with train.grad_accum = k M (capacity and the aux loss are per forward,
// i.e. per micro-batch). The reported loss is pp = 1's too: the non-last
// chunks' aux values (detached) are summed over the pp ranks with one
// all-reduce at the end of each step and of each evaluate() -- collective
// over pp only for MoE models -- and added on the rank holding the last chunk.
//
// Actions (schedule.h):
//   F(c, m)     forward of chunk c: chunk 0 from the micro-batch's tokens, any
//               other from the received (or, for chunks on the same rank,
//               handed-over) activation; keeps input and output for B.
//   B(c, m)     backward of the chunk's output gradient (the loss on the last
//               chunk); the Linear layers defer their weight-gradient GEMMs
//               into the store under key (c, m) (core/models/weight_grad_store.h);
//               the input gradient goes to chunk c - 1.
//   W(c, m)     drains key (c, m): the weight gradients arrive, and the
//               strategy (told how many arrivals make a gradient complete,
//               DataParallel::setGradientArrivals) starts its reduction after
//               the last one.
//   BW(c, m)    B then W at once (GPipe, 1F1B, interleaved).
//   send/recv   asynchronous point-to-point over pp, tag (kind, chunk, m);
//               a receive is posted where the schedule places it (before it is
//               needed) and waited for by the action that consumes it; every
//               send is waited for before the step returns.
//   offload / reload  (with pipeline.offload) the saved activations of
//               (c, m) go to host memory after F and come back before B,
//               on the activation pool's copy thread (offload.h).
// Every wait has the communicator's timeout: a stage that died fails the
// step with a TimeoutError naming the operation and the peer.
//
// Evaluation runs the chunks in order on the whole batch, without
// micro-batches or gradients.
//
// Timestamps: each compute action's start and end are kept for the last
// step (timeline()), and the mean F, B and W time per chunk pass is kept over
// the steps (measuredCosts()); `tessera-bench pipeline` draws the first and
// the `auto` schedule is built from the second.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/pipeline/schedule.h"
#include "tessera/parallel/pipeline/stage.h"
#include "tessera/parallel/step_executor.h"

namespace tessera::parallel::pipeline {

// One compute action as it ran on this rank, in seconds since
// PipelineExecutor::timelineOrigin().
struct TimedAction {
  Action action;
  double start = 0;
  double end = 0;
};

class PipelineExecutor : public StepExecutor {
 public:
  // The last step's compute actions, in execution order.
  virtual const std::vector<TimedAction>& timeline() const = 0;
  // When the last step began, on the steady clock (CLOCK_MONOTONIC on Linux:
  // one clock for every process of a machine, so stages' timelines align).
  virtual std::chrono::steady_clock::time_point timelineOrigin() const = 0;
  // This rank's mean F, B and W over the steps run, as a whole stage's costs
  // (schedule.h: a chunk pass times the chunks per rank), timed from the
  // moment the action's input is here (a wait for a receive is bubble, not
  // cost). A fused BW counts as B. comm: the last measureTransfer(), 0 before.
  // Zero before the first step.
  virtual PipelineCosts measuredCosts() const = 0;
  // Collective over pp: the one-way time of one activation between two
  // stages (pp ranks 0 and 1 ping-pong the last step's activation shape,
  // the best of 5 round trips halved; every rank gets the result). Needs a
  // step run first.
  virtual double measureTransfer() = 0;
  // The last step's peak of saved activation bytes resident on this rank
  // (ActivationPool::peakResidentBytes), or -1 when neither offload nor
  // ExecutorOptions::measureActivations is on.
  virtual int64_t peakActivationBytes() const = 0;
  // Forgets the costs measured so far (after warm-up steps).
  virtual void resetMeasurements() = 0;
  // Replaces the action list (the `auto` schedule once costs are measured).
  // Collective in effect: every pp rank must switch before the same step.
  virtual void setSchedule(PipelineSchedule schedule) = 0;
  virtual const PipelineSchedule& schedule() const = 0;
  // With offload: wait for each offload action's copies before the next
  // action, so the resident bytes no longer depend on how fast the copy
  // thread is scheduled (tests and measurements of what offload can save;
  // training wants the overlap, the default). Local; call between steps.
  virtual void setSynchronousOffload(bool on) = 0;
};

struct ExecutorOptions {
  int microBatches = 1;  // M: the batch dimension must divide by it
  int dataRank = 0;      // keys dropout: micro-batch (dataRank * k + g) * M + m
  // > 0: the `auto` schedule. The first autoScheduleAfter steps run the
  // given schedule (one that separates B and W, e.g. zb_h1) to measure T_F,
  // T_B, T_W and T_comm; then every pp rank takes the maximum over the
  // stages (collective over pp) and switches to makeSchedule("auto", ...)
  // with those costs, logging them and the simulated bubble.
  int autoScheduleAfter = 0;
  // Activation offload (offload.h, PipeOffload): "none", "all" or
  // "selective" (keep at most offloadBudgetBytes of saved activations
  // resident; the first step runs without offload to measure a micro-batch's
  // bytes, then the schedule gets its offload/reload actions).
  std::string offload = "none";
  double offloadBudgetBytes = 0;
  // Count resident activation bytes even without offload (a baseline for
  // peakActivationBytes()).
  bool measureActivations = false;
};

// `stage`, `dp` are referenced and must outlive the executor; `ppComm` is the
// pp axis's communicator (its rank is this rank's pp coordinate). Switches the
// stage's Linear layers to deferred weight gradients (owned store) and tells
// `dp` the gradient arrivals per step. Throws InvalidArgument when the
// schedule does not match the communicator or the stage.
std::unique_ptr<PipelineExecutor> makePipelineExecutor(StageModel& stage, DataParallel& dp, comm::CommPtr ppComm,
                                                       PipelineSchedule schedule, ExecutorOptions options);

}  // namespace tessera::parallel::pipeline
