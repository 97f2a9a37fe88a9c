// StepExecutor: the seam between the training loop and how one optimizer
// step's forward and backward run across the mesh. The Trainer hands it the
// step's micro-batches; it leaves every optimizer tensor's gradient set for
// the step (before the strategy's final sync) and says which ranks computed
// the loss.
//
// The default (makeLocalStepExecutor) is one forward + backward per
// micro-batch on this rank, all but the last inside DataParallel::noSync().
// A pipeline executor (1F1B, zero-bubble, ...) is another implementation: it
// runs its stage's share of the micro-batches in its schedule's order, and
// only the last stage has the loss. Evaluation goes through the same seam.
//
// Not here: the optimizer step, clipping and gradient sync -- the Trainer
// does those after forwardBackward(), identically for every executor.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "tessera/core/trainable.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::parallel {

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;

  // Collective as the data-parallel strategy is (FSDP gathers, DDP's last
  // backward all-reduces). Runs forward and backward over `microBatches`
  // (k >= 1) so that the gradients are those of the MEAN loss over the k
  // micro-batches; `step` (optimizer steps completed) keys the model's
  // dropout together with the micro-batch index. Returns this rank's mean
  // loss over the micro-batches, or nothing on a rank that does not compute
  // the loss (hasLoss() false). Throws what the model and the comms throw.
  virtual std::optional<double> forwardBackward(const std::vector<Batch>& microBatches, int64_t step) = 0;

  // Collective like forwardBackward, without gradients and in eval mode (the
  // caller switches the module): the mean loss of `batch`, or nothing on a
  // rank without the loss.
  virtual std::optional<double> evaluate(const Batch& batch) = 0;

  // True when this rank computes the loss (every rank here; a pipeline's last stage).
  virtual bool hasLoss() const = 0;
};

// Today's step: per micro-batch i, noSync() unless last, dp.beforeForward(),
// model.setRandomKey(step, dataRank * k + i), loss.backward() of loss / k.
// The key's micro-batch is the GLOBAL micro-batch index within the step, so
// data ranks draw different masks for their different examples, and a layout
// that only moves work between ranks (2 data ranks x 1 micro-batch vs 1 x 2)
// draws the same masks. `model` and `dp` are referenced, not owned: they must
// outlive the executor.
std::unique_ptr<StepExecutor> makeLocalStepExecutor(TrainableModel& model, DataParallel& dp, int dataRank = 0);

}  // namespace tessera::parallel
