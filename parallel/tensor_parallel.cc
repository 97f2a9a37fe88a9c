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

class TensorParallelNorm final : public DataParallelWrapper {
 public:
  TensorParallelNorm(std::unique_ptr<DataParallel> inner, const std::set<std::string>& tpSharded,
                     comm::CommPtr tpComm, comm::CommPtr shardComm)
      : DataParallelWrapper(std::move(inner)), tpComm_(std::move(tpComm)), shardComm_(std::move(shardComm)) {
    // The layout is fixed for the strategy's lifetime: classify its ranges once.
    const auto layout = parameterLayout();
    for (size_t i = 0; i < layout.size(); ++i) {
      for (const ParameterPiece& piece : layout[i]) {
        ranges_.push_back(Range{i, piece.tensorOffset, piece.slice.numel, tpSharded.count(piece.name) > 0});
      }
    }
  }

  double gradNorm() override {
    // [TP-sharded, replicated] squares over this rank's pieces (padding is in no
    // piece), summed where the gradients live; one host sync, after the reductions.
    const std::vector<at::Tensor> params = optimizerParameters();
    at::Tensor sums = at::zeros({2}, at::kDouble);
    for (const Range& range : ranges_) {
      const at::Tensor& grad = params[range.tensor].grad();
      if (!grad.defined()) continue;
      const at::Tensor part = grad.reshape({-1}).narrow(0, range.offset, range.numel).to(at::kDouble);
      sums[range.tpSharded ? 0 : 1] += part.pow(2).sum().cpu();
    }
    if (shardComm_ && shardComm_->size() > 1) shardComm_->allReduce(sums, comm::ReduceOp::kSum);  // FSDP's shards
    at::Tensor tpSum = sums.narrow(0, 0, 1).clone();
    tpComm_->allReduce(tpSum, comm::ReduceOp::kSum);  // the tp shards of each split parameter
    return std::sqrt(tpSum.item<double>() + sums[1].item<double>());
  }

 private:
  comm::CommPtr tpComm_;
  comm::CommPtr shardComm_;
  struct Range {
    size_t tensor;    // index into optimizerParameters()
    int64_t offset;   // first element in that tensor's flat view
    int64_t numel;
    bool tpSharded;   // part of a parameter split over tp
  };
  std::vector<Range> ranges_;
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
  return std::make_unique<TensorParallelNorm>(std::move(inner), tpSharded, std::move(tpComm), std::move(shardComm));
}

}  // namespace tessera::parallel
