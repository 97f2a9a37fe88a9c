// Trainer: the training loop, written once for every data-parallel strategy
// (none, DDP, FSDP through parallel::DataParallel) and every optimizer
// (optim::Optimizer, whose step may communicate).
//
// One optimizer step, on every rank of the data-parallel group:
//   1. lr = schedule(step)
//   2. grad_accum micro-batches of forward + backward; all but the last inside
//      DataParallel::noSync(), so gradients are averaged once per step
//   3. finishGradientSync (collective), clip by the global norm (collective
//      when sharded), optimizer step (may be collective), zero the gradients
//   4. every eval_every steps: validation loss averaged over the group
//   5. callbacks, a metrics line every log_every steps, a progress line
//
// State that makes a run resumable -- step, sampler position, optimizer state,
// torch's RNG -- is a TrainingState value: snapshot() after any step and
// restore() into a fresh Trainer over the same model parameters continues
// exactly as the uninterrupted run. The model parameters are not part of it
// (they may be sharded; the checkpoint layer saves them).
//
// Not here: checkpoint files, mixed precision, pipeline schedules.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/data/distributed_sampler.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"
#include "tessera/core/training/train_config.h"
#include "tessera/core/training/trainable.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera {

// What one optimizer step did; the metrics line is made from it.
struct StepReport {
  int64_t step = 0;               // steps completed, counting this one (1 after the first)
  int64_t totalSteps = 0;         // TrainConfig::steps
  double loss = 0;                // training loss of the step, averaged over micro-batches and dp ranks
  std::optional<double> valLoss;  // set when this step was followed by validation
  double lr = 0;                  // learning rate the step used
  double gradNorm = 0;            // global gradient norm before clipping
  int64_t tokens = 0;             // tokens (examples for classifiers) consumed so far, all dp ranks
  double tokensPerSecond = 0;     // over the steps since the previous metrics line, all dp ranks
  double timeSeconds = 0;         // wall time since run() started (evaluation included)
  double computeSeconds = 0;      // training-step time not spent waiting for communication
  double commSeconds = 0;         // exposed communication time (DataParallel::stats().exposedSeconds)
  uint64_t commBytes = 0;         // bytes this rank sent on the dp communicators, cumulative
  bool outerStep = false;         // the optimizer ran an outer step (DiLoCo)
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
};

// The pieces a Trainer drives. It owns none of them: each must outlive it.
struct TrainerParts {
  TrainableModel* model = nullptr;
  parallel::DataParallel* dp = nullptr;
  optim::Optimizer* optimizer = nullptr;
  optim::LrSchedule schedule;          // step -> lr
  BatchSource* train = nullptr;
  BatchSource* val = nullptr;          // null: no validation
  // The data-parallel group: averages the reported losses; its size scales
  // the token count. Null: a single replica.
  comm::CommPtr dpComm;
  // The communicators whose bytes sent make comm_bytes (FSDP + hybrid
  // talk on two). Empty: dpComm alone.
  std::vector<comm::CommPtr> trafficComms;
  // Bytes sent on communicators that come and go (the elastic groups, one
  // per epoch), cumulative; added to comm_bytes. Null: none.
  std::function<uint64_t()> extraTrafficBytes;
  MetricsWriter* metrics = nullptr;    // rank 0's writer; null on the others
  bool isRank0 = true;                 // prints the progress line
};

class Trainer {
 public:
  // Validates config (ConfigError) and the parts (InvalidArgument naming a
  // missing one); seeds torch's global generator with config.seed.
  Trainer(TrainerParts parts, TrainConfig config);

  TrainerCallbacks& callbacks() { return callbacks_; }

  // Collective over the dp group: trains until config.steps steps are done
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
  // Not collective. Throws InvalidArgument if the sampler or optimizer state
  // does not fit; then nothing changed.
  void restore(const TrainingState& state);

  // Collective over the dp group: mean validation loss over eval_batches
  // batches per rank, the same batches every call.
  double evaluate();

 private:
  double forwardBackward();  // this rank's mean loss of the step's micro-batches
  StepReport makeReport(double localLoss, double lr, double gradNorm, bool outerStep);
  bool isEvalStep() const;
  bool isLogStep() const;
  double averageOverDp(double value);
  void writeMetrics(const StepReport& report);
  void printProgress(const StepReport& report, bool last) const;

  TrainerParts parts_;
  TrainConfig config_;
  TrainerCallbacks callbacks_;
  TrainingState state_;
  data::SamplerState valStart_;   // the val source rewinds here before each evaluation
  double stepSeconds_ = 0;        // training-step wall time, summed (this run())
  int64_t windowTokens_ = 0;      // tokens since the last metrics line
  double windowSeconds_ = 0;      // step time since the last metrics line
  Stopwatch sinceRunStart_;       // started with the Trainer; time_s reads it
};

}  // namespace tessera
