#include "tessera/parallel/pipeline/post_validation.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <string>

#include "tessera/core/error.h"

namespace tessera::parallel::pipeline {
namespace {

class AllGatherStageNorm final : public CrossStageNorm {
 public:
  explicit AllGatherStageNorm(comm::CommPtr pp)
      : pp_(std::move(pp)),
        // Allocated once: the async call reads `mine_` and writes `all_`
        // until finish() has waited, so they outlive every operation.
        mine_(at::zeros({1}, at::kDouble)),
        all_(at::zeros({pp_->size()}, at::kDouble)) {}

  void start(double stageSquaredNorm) override {
    TESSERA_CHECK_ARG(!work_, "CrossStageNorm::start called twice without finish() (reduction #"
                                  << calls_ << " on '" << pp_->name() << "' is still pending)");
    mine_.data_ptr<double>()[0] = stageSquaredNorm;
    if (pp_->size() > 1) work_ = pp_->allGatherAsync(mine_, all_);
    pending_ = true;
  }

  double finish() override {
    TESSERA_CHECK_ARG(pending_, "CrossStageNorm::finish called without start() on '" << pp_->name() << "'");
    pending_ = false;
    ++calls_;
    if (!work_) return mine_.data_ptr<double>()[0];
    comm::WorkPtr work = std::move(work_);
    try {
      work->wait();
    } catch (const TimeoutError& e) {
      // The backend names the ranks of `pp` that never arrived; they are the stages.
      throw TimeoutError("pipeline post-validation: cross-stage gradient norm #" + std::to_string(calls_) +
                         " is missing stages (ranks of the pp group '" + pp_->name() +
                         "' are pipeline stages): " + e.what());
    }
    // Stage order, so every stage adds the same values in the same order.
    const double* values = all_.data_ptr<double>();
    double total = 0;
    for (int64_t s = 0; s < all_.numel(); ++s) total += values[s];
    return total;
  }

 private:
  comm::CommPtr pp_;
  at::Tensor mine_;  // (1,) float64: this stage's squared norm
  at::Tensor all_;   // (p,) float64: every stage's, in stage order
  comm::WorkPtr work_;
  bool pending_ = false;
  int64_t calls_ = 0;  // finished reductions, for messages
};

}  // namespace

std::unique_ptr<CrossStageNorm> makeCrossStageNorm(comm::CommPtr pp) {
  TESSERA_CHECK_ARG(pp != nullptr, "makeCrossStageNorm: the pp communicator is null (pass the mesh's pp axis)");
  return std::make_unique<AllGatherStageNorm>(std::move(pp));
}

}  // namespace tessera::parallel::pipeline
