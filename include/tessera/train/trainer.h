// Trainer: the training loop, written once for every parallel layout (the
// step's forward and backward go through a parallel::StepExecutor; gradients
// are synced by a parallel::DataParallel strategy) and every optimizer
// (optim::Optimizer, whose step may communicate). This is the training layer:
// above core/, comm/, optim/ and parallel/, which know nothing of it.
//
// One optimizer step, on every rank:
//   1. lr = schedule(step)
//   2. the step's grad_accum micro-batches drawn from the train source, then
//      executor.forwardBackward(micro-batches, step) (DDP's last backward
//      all-reduces, FSDP gathers and reduce-scatters; a pipeline executor runs
//      its schedule)
//   3. finishGradientSync (collective), the global norm of the logical
//      parameters' gradients (collective when sharded; with a pipeline, summed
//      over the stages by TrainerParts::stageNorm), then:
//      - a non-finite norm (a NaN or Inf anywhere reaches it, and every rank
//        sees the same norm) SKIPS the step: no optimizer update, a warning
//        naming the step, StepReport::skipped; the step counter, the lr
//        schedule and the data position still advance (as torch AMP's
//        GradScaler skips a step);
//      - otherwise clip by the norm (train.clip) and step the optimizer (may
//        be collective);
//      and zero the gradients.
//   4. every eval_every steps: validation loss averaged over the data ranks
//   5. callbacks, a metrics line every log_every steps and after every
//      skipped step (on the rank given a writer: the one that has the loss;
//      TrainerParts::extraMetrics, collective, adds fields), a progress line
//
// Optimizer post-validation (Zero Bubble, arXiv 2401.10241 §4), with a
// pipeline (TrainerParts::stageNorm set) and train.post_validation "auto":
// waiting for the norm over every stage before the step would synchronize the
// stages, so the loop starts the cross-stage reduction, steps OPTIMISTICALLY
// with the unclipped gradients while it is in flight, then reads the norm:
// non-finite -> roll back exactly and skip; clip > 0 and norm > clip -> roll
// back exactly, scale the gradients as clipGradNorm does and step again; else
// keep. The rollback restores the optimizer tensors' values and the optimizer
// state() from copies taken just before the step (buffers allocated once and
// reused: one more copy of this rank's optimizer tensors and optimizer state
// in memory), so the parameters are BIT-identical to the synchronous order.
// Only optimizers whose step() is local and changes nothing but the optimizer
// tensors and state() are rolled back (AdamW, SGD); those that communicate or
// have outer steps (DiLoCo and its streaming and elastic forms, DeMo, MT-DAO)
// cannot be undone cheaply -- their collectives have happened -- so with them
// the loop waits for the norm first (the synchronous order), as with "off".
//
// State that makes a run resumable -- step, sampler position, optimizer state,
// torch's RNG -- is a TrainingState value: snapshot() after any step and
// restore() into a fresh Trainer over the same model parameters continues
// exactly as the uninterrupted run. The model parameters are not part of it
// (they may be sharded; the checkpoint layer saves them).
//
// Not here: checkpoint files, mixed precision, pipeline schedules (executors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/data/distributed_sampler.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"
#include "tessera/core/trainable.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/pipeline/post_validation.h"
#include "tessera/parallel/step_executor.h"
#include "tessera/train/train_config.h"

namespace tessera {

// One communicator's share of a step's traffic, cumulative since the
// communicators were made.
struct CommTraffic {
  uint64_t bytesSent = 0;      // bytes this rank sent on it
  double exposedSeconds = 0;   // time the training loop waited for it
};

// What one optimizer step did; the metrics line is made from it.
struct StepReport {
  int64_t step = 0;               // steps completed, counting this one (1 after the first)
  int64_t totalSteps = 0;         // TrainConfig::steps
  double loss = 0;                // training loss of the step, averaged over micro-batches and data ranks
                                  // (NaN on ranks that do not compute the loss)
  std::optional<double> valLoss;  // set when this step was followed by validation
  double lr = 0;                  // learning rate the step used
  double gradNorm = 0;            // global gradient norm before clipping (logical parameters, each once;
                                  // with a pipeline, over every stage); NaN/Inf on a skipped step
  int64_t tokens = 0;             // tokens (examples for classifiers) consumed so far, all data ranks
  double tokensPerSecond = 0;     // over the steps since the previous metrics line, all data ranks
  double timeSeconds = 0;         // wall time since run() started (evaluation included)
  double computeSeconds = 0;      // training-step time not spent waiting for communication
  double commSeconds = 0;         // exposed communication time: the sum of comm[*].exposedSeconds
  uint64_t commBytes = 0;         // bytes this rank sent, cumulative: the sum of comm[*].bytesSent
  // Per communicator, keyed by its name: each mesh axis in use ("dp_shard",
  // "dp_replicate"; "tp", "pp", "ep" when they exist), flattened groups
  // ("dp"), and every other group a step uses (the elastic group, streaming
  // DiLoCo's private group). The entries sum to commBytes and commSeconds.
  std::map<std::string, CommTraffic> comm;
  bool outerStep = false;         // the optimizer ran an outer step (DiLoCo)
  bool skipped = false;           // gradNorm was not finite: no optimizer update this step (metrics "skipped")
  int64_t skippedSteps = 0;       // steps skipped since this Trainer was built, this one included
                                  // (metrics "skipped_steps"; not part of TrainingState)
};

// A communicator whose traffic the metrics count, under `name`.
struct TrafficSource {
  std::string name;
  // Its stats() give the bytes sent; the exposed time is what the strategy
  // reports for it (DataParallelStats::exposedSecondsByComm) or, for a
  // communicator the strategy does not use (an optimizer's: blocking calls),
  // its total operation time.
  comm::CommPtr comm;
  // Instead of `comm`, for groups that come and go (one elastic group per
  // epoch): cumulative bytes sent and exposed seconds. `seconds` may be empty.
  std::function<uint64_t()> bytesSent;
  std::function<double()> seconds;
};

// Hooks at step boundaries, run on every rank in registration order. A hook
// may run collectives only if it does so on every rank.
struct TrainerCallbacks {
  std::vector<std::function<void(int64_t step)>> beforeStep;    // step: steps completed so far
  std::vector<std::function<void(const StepReport&)>> afterStep;
  std::vector<std::function<void(int64_t step, double valLoss)>> afterEval;
  std::vector<std::function<void(const StepReport&)>> afterOuterStep;
};

// Everything needed to continue a run (see the header comment).
struct TrainingState {
  int64_t step = 0;                // optimizer steps completed
  int64_t tokens = 0;              // StepReport::tokens at that point
  data::SamplerState trainSampler; // position of the training batches
  optim::OptimizerState optimizer; // Optimizer::state(), cloned (no aliasing with the live buffers)
  at::Tensor rng;                  // torch's default CPU generator state (uint8)
  // The model's FP8 delayed-scaling state (models::fp8ScalingState: amax
  // histories and scales of every FP8 Linear, this rank's); undefined or
  // empty without FP8 layers. Restored when defined; a run resumed without
  // it (another world size) starts its histories afresh.
  at::Tensor fp8Scaling;
};

// The pieces a Trainer drives. It owns none of them: each must outlive it.
struct TrainerParts {
  TrainableModel* model = nullptr;
  parallel::DataParallel* dp = nullptr;
  // Runs each step's forward + backward. Null: the Trainer makes the local
  // executor (parallel::makeLocalStepExecutor over model and dp).
  parallel::StepExecutor* executor = nullptr;
  optim::Optimizer* optimizer = nullptr;
  optim::LrSchedule schedule;          // step -> lr
  BatchSource* train = nullptr;
  BatchSource* val = nullptr;          // null: no validation
  // The data ranks (ranks reading different batches): averages the reported
  // losses; its size scales the token count. Null: one data rank.
  comm::CommPtr dataComm;
  // The communicators whose traffic the metrics count (StepReport::comm).
  // Empty: dataComm alone, as "dp".
  std::vector<TrafficSource> traffic;
  MetricsWriter* metrics = nullptr;    // the writer of the rank that reports (has the loss); null elsewhere
  bool reportsProgress = true;         // prints the progress line (one rank per job)
  // With a pipeline: sums this stage's squared gradient norm over the stages
  // (collective over pp, once per step). The stage's own norm is
  // dp->gradNorm(), so dp must count each of the stage's logical parameters
  // once (a tied copy counted by one stage only). Null: this stage is the
  // whole model. See the header comment for post-validation.
  std::shared_ptr<parallel::pipeline::CrossStageNorm> stageNorm;
  // More fields for the metrics line (e.g. parallel::MoeLoadCollector::
  // metricsHook: the MoE dropped fraction and expert loads). Collective: called
  // on EVERY rank -- with or without `metrics` -- each time a metrics line is
  // due (every log_every steps, the last step, after a skipped step: the same
  // steps everywhere, as the skip decision is), after validation, so it may run
  // collectives over any group of the job; the fields it adds are written by
  // the rank with `metrics`, after the standard ones. Empty: nothing.
  std::function<void(MetricsRecord&)> extraMetrics;
  // Where the model lives (parallel::ParallelModel::device; resolveDevice for
  // train.device). The sources may hand out CPU batches: each batch is copied
  // here (non_blocking) before the executor sees it, and the loss average over
  // dataComm runs on a tensor here (NCCL takes device tensors only). The
  // Trainer does not move the model: parallelize() did, or the caller did
  // before building dp and the optimizer over its parameters.
  c10::Device device = c10::Device(c10::kCPU);
};

class Trainer {
 public:
  // Validates config (ConfigError) and the parts (InvalidArgument naming a
  // missing one, or a model parameter that is not on parts.device); seeds torch's global generator with config.seed (the
  // randomness left outside the models' keyed dropout; saved per rank).
  Trainer(TrainerParts parts, TrainConfig config);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainerCallbacks& callbacks() { return callbacks_; }

  // Collective over every rank of the job: trains until config.steps steps are done
  // (from the current state) and returns the last step's report. Throws what
  // the model, the communicators or the optimizer throw.
  StepReport run();

  // Not collective. See TrainingState.
  TrainingState snapshot() const;
  // As snapshot(), but the optimizer tensors alias the live buffers (valid
  // until the next step): for callers that copy them anyway (checkpoints).
  TrainingState snapshotView() const;
  // Optimizer steps completed.
  int64_t step() const { return state_.step; }
  // True when steps run optimistically and are rolled back on clip or skip
  // (a stageNorm, post_validation "auto" and an optimizer that allows it).
  bool postValidates() const { return rollback_ != nullptr; }
  // Not collective. Throws InvalidArgument if the sampler or optimizer state
  // does not fit; then nothing changed.
  void restore(const TrainingState& state);

  // Collective over the data ranks: mean validation loss over eval_batches
  // batches per rank, the same batches every call (NaN on ranks without the loss).
  double evaluate();

 private:
  class StepRollback;  // trainer.cc: the copies post-validation restores
  // What step 3 did.
  struct Update {
    double gradNorm = 0;
    bool skipped = false;
    bool outerStep = false;
  };

  double forwardBackward();
  Batch onDevice(Batch batch) const;      // the batch's tensors on parts_.device
  Update update();                        // step 3 up to the zeroing (collective)
  Update clipAndStep(double globalNorm);  // skip, or clip then step
  Update skip(double globalNorm);  // this rank's mean loss of the step's micro-batches (NaN without the loss)
  StepReport makeReport(double localLoss, double lr, const Update& update);
  void countTraffic(StepReport& report) const;
  bool isEvalStep() const;
  bool isLogStep() const;
  double averageOverDp(double value);
  void writeMetrics(const StepReport& report);
  void printProgress(const StepReport& report, bool last) const;

  TrainerParts parts_;
  std::unique_ptr<parallel::StepExecutor> ownExecutor_;  // when parts_.executor was null
  parallel::StepExecutor* executor_ = nullptr;
  TrainConfig config_;
  TrainerCallbacks callbacks_;
  TrainingState state_;
  data::SamplerState valStart_;   // the val source rewinds here before each evaluation
  double stepSeconds_ = 0;        // training-step wall time, summed (this run())
  int64_t windowTokens_ = 0;      // tokens since the last metrics line
  double windowSeconds_ = 0;      // step time since the last metrics line
  Stopwatch sinceRunStart_;       // started with the Trainer; time_s reads it
  int64_t skippedSteps_ = 0;      // StepReport::skippedSteps
  std::unique_ptr<StepRollback> rollback_;  // set when post-validating
};

}  // namespace tessera
