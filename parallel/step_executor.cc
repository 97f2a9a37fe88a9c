// The default step executor: forward + backward of each micro-batch on this rank.
#include "tessera/parallel/step_executor.h"

#include <torch/autograd.h>

#include "tessera/core/error.h"

namespace tessera::parallel {
namespace {

class LocalStepExecutor final : public StepExecutor {
 public:
  LocalStepExecutor(TrainableModel& model, DataParallel& dp, int dataRank)
      : model_(model), dp_(dp), dataRank_(dataRank) {}

  std::optional<double> forwardBackward(const std::vector<Batch>& microBatches, int64_t step) override {
    TESSERA_CHECK_ARG(!microBatches.empty(), "StepExecutor::forwardBackward: a step needs at least one micro-batch");
    const auto k = static_cast<int64_t>(microBatches.size());
    double lossSum = 0;
    for (int64_t i = 0; i < k; ++i) {
      // Only the last micro-batch's backward communicates (DDP) or reduce-scatters (FSDP).
      auto guard = i + 1 < k ? dp_.noSync() : nullptr;
      dp_.beforeForward();
      model_.setRandomKey(step, dataRank_ * k + i);
      const at::Tensor loss = model_.loss(microBatches[static_cast<size_t>(i)]);
      // Dividing by k makes the summed gradient that of the mean over k micro-batches.
      (loss / static_cast<double>(k)).backward();
      lossSum += loss.item<double>();
    }
    return lossSum / static_cast<double>(k);
  }

  std::optional<double> evaluate(const Batch& batch) override {
    torch::NoGradGuard noGrad;
    dp_.beforeForward();
    return model_.loss(batch).item<double>();
  }

  bool hasLoss() const override { return true; }

 private:
  TrainableModel& model_;
  DataParallel& dp_;
  int dataRank_;
};

}  // namespace

std::unique_ptr<StepExecutor> makeLocalStepExecutor(TrainableModel& model, DataParallel& dp, int dataRank) {
  TESSERA_CHECK_ARG(dataRank >= 0, "makeLocalStepExecutor: dataRank must be >= 0, got " << dataRank);
  return std::make_unique<LocalStepExecutor>(model, dp, dataRank);
}

}  // namespace tessera::parallel
