// Tensor parallelism as parallelize() applies it: the model's split and the
// gradient norm over logical parameters.
#include "tessera/parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cmath>
#include <set>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/parallel/tp_regions.h"

namespace tessera::parallel {

void applyTensorParallel(TrainableModel& model, comm::CommPtr tpComm, bool sequenceParallel) {
  TESSERA_CHECK_ARG(tpComm != nullptr, "applyTensorParallel needs the tp communicator");
  auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.tp",
                       "tensor parallelism splits GPT layers; model.kind = \"mlp\" runs with tp = 1, got tp = "
                           << tpComm->size());
  gpt->applyTensorParallel(makeTensorParallelGroup(std::move(tpComm)), sequenceParallel);
}

namespace {

class TensorParallelNorm final : public DataParallel {
 public:
  TensorParallelNorm(std::unique_ptr<DataParallel> inner, std::set<std::string> tpSharded, comm::CommPtr tpComm,
                     comm::CommPtr shardComm)
      : inner_(std::move(inner)), tpComm_(std::move(tpComm)), shardComm_(std::move(shardComm)),
        tpSharded_(std::move(tpSharded)) {}

  std::string name() const override { return inner_->name(); }
  std::vector<at::Tensor> optimizerParameters() override { return inner_->optimizerParameters(); }
  void beforeForward() override { inner_->beforeForward(); }
  void finishGradientSync() override { inner_->finishGradientSync(); }
  std::unique_ptr<NoSyncScope> noSync() override { return inner_->noSync(); }
  DataParallelStats stats() const override { return inner_->stats(); }
  std::vector<std::vector<ParameterPiece>> parameterLayout() const override { return inner_->parameterLayout(); }
  bool sharded() const override { return inner_->sharded(); }

  double gradNorm() override {
    // [TP-sharded, replicated] squares over this rank's pieces (padding is in no piece).
    const std::vector<at::Tensor> params = inner_->optimizerParameters();
    const auto layout = inner_->parameterLayout();
    double sharded = 0, replicated = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& grad = params[i].grad();
      if (!grad.defined()) continue;
      const at::Tensor flat = grad.reshape({-1});
      for (const ParameterPiece& piece : layout[i]) {
        const double sq = flat.narrow(0, piece.tensorOffset, piece.slice.numel).to(at::kDouble).pow(2).sum().item<double>();
        (tpSharded_.count(piece.name) ? sharded : replicated) += sq;
      }
    }
    at::Tensor sums = at::tensor({sharded, replicated}, at::kDouble);
    if (shardComm_ && shardComm_->size() > 1) shardComm_->allReduce(sums, comm::ReduceOp::kSum);  // FSDP's shards
    at::Tensor tpSum = sums.narrow(0, 0, 1).clone();
    tpComm_->allReduce(tpSum, comm::ReduceOp::kSum);  // the tp shards of each split parameter
    return std::sqrt(tpSum.item<double>() + sums[1].item<double>());
  }

 private:
  std::unique_ptr<DataParallel> inner_;
  comm::CommPtr tpComm_;
  comm::CommPtr shardComm_;
  std::set<std::string> tpSharded_;
};

}  // namespace

std::set<std::string> tensorParallelParameters(torch::nn::Module& model) {
  std::set<std::string> names;
  for (const models::LogicalParameter& p : models::logicalParameters(model)) {
    int64_t held = 0;
    for (const TensorSlice& slice : p.pieces) held += slice.numel;
    int64_t whole = 1;
    for (int64_t d : p.globalShape) whole *= d;
    if (held != whole) names.insert(p.name);
  }
  return names;
}

std::unique_ptr<DataParallel> withTensorParallelNorm(std::unique_ptr<DataParallel> inner,
                                                     std::set<std::string> tpSharded, comm::CommPtr tpComm,
                                                     comm::CommPtr shardComm) {
  TESSERA_CHECK_ARG(inner != nullptr && tpComm != nullptr, "withTensorParallelNorm needs a strategy and tp");
  return std::make_unique<TensorParallelNorm>(std::move(inner), std::move(tpSharded), std::move(tpComm),
                                              std::move(shardComm));
}

}  // namespace tessera::parallel
