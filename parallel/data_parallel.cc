#include "tessera/parallel/data_parallel.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "tessera/core/models/logical_parameters.h"

namespace tessera::parallel {
namespace {

std::vector<at::Tensor> trainableParameters(torch::nn::Module& model) {
  std::vector<at::Tensor> out;
  for (auto& p : model.parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

// Per trainable parameter what it holds of its logical tensor (the whole
// tensor for plain layers; a sharded layer's declared pieces, one after the
// other), named as the module names it (a tied tensor once, under its first name).
std::vector<std::vector<ParameterPiece>> wholeParameterLayout(torch::nn::Module& model) {
  std::vector<std::vector<ParameterPiece>> layout;
  for (const models::LogicalParameter& p : models::logicalParameters(model)) {
    std::vector<ParameterPiece> pieces;
    int64_t offset = 0;
    for (const TensorSlice& slice : p.pieces) {
      pieces.push_back(ParameterPiece{p.name, p.globalShape, slice, offset});
      offset += slice.numel;
    }
    layout.push_back(std::move(pieces));
  }
  return layout;
}

class NoDataParallel final : public DataParallel {
 public:
  explicit NoDataParallel(torch::nn::Module& model)
      : parameters_(trainableParameters(model)), layout_(wholeParameterLayout(model)) {}
  std::string name() const override { return "none"; }
  std::vector<at::Tensor> optimizerParameters() override { return parameters_; }
  void finishGradientSync() override {}
  double gradNorm() override { return localGradNorm(parameters_); }
  std::unique_ptr<NoSyncScope> noSync() override { return std::make_unique<NoSyncScope>(); }
  DataParallelStats stats() const override { return {}; }
  std::vector<std::vector<ParameterPiece>> parameterLayout() const override { return layout_; }
  bool sharded() const override { return false; }
  // Nothing is reduced: every arrival just accumulates into .grad.
  void setGradientArrivals(std::function<int(const std::string&)>) override {}

 private:
  std::vector<at::Tensor> parameters_;
  std::vector<std::vector<ParameterPiece>> layout_;
};

class DdpDataParallel final : public DataParallel {
 public:
  DdpDataParallel(torch::nn::Module& model, std::vector<DdpGroup> groups, DdpConfig config)
      : parameters_(trainableParameters(model)), layout_(wholeParameterLayout(model)),
        ddp_(model, std::move(groups), config) {}
  std::string name() const override { return "ddp"; }
  std::vector<at::Tensor> optimizerParameters() override { return parameters_; }
  void finishGradientSync() override { ddp_.finishGradientSync(); }
  // After the sync every replica holds the same averaged gradient, so the
  // local norm is the global one: no communication needed.
  double gradNorm() override { return localGradNorm(parameters_); }
  std::unique_ptr<NoSyncScope> noSync() override {
    struct Scope final : NoSyncScope {
      explicit Scope(DistributedDataParallel::NoSyncGuard g) : guard(std::move(g)) {}
      DistributedDataParallel::NoSyncGuard guard;
    };
    return std::make_unique<Scope>(ddp_.noSync());
  }
  DataParallelStats stats() const override {
    const DdpSyncStats s = ddp_.totalStats();
    DataParallelStats out{s.bytes, s.commSeconds, s.exposedSeconds, s.bytesByComm, s.exposedSecondsByComm, {}, {}};
    out.fp8Total = s.fp8;
    out.fp8LastStep = ddp_.lastStepStats().fp8;
    return out;
  }
  std::vector<std::vector<ParameterPiece>> parameterLayout() const override { return layout_; }
  bool sharded() const override { return false; }
  void setGradientArrivals(std::function<int(const std::string&)> arrivals) override {
    ddp_.setGradientArrivals(std::move(arrivals));
  }

 private:
  std::vector<at::Tensor> parameters_;
  std::vector<std::vector<ParameterPiece>> layout_;
  DistributedDataParallel ddp_;
};

}  // namespace

std::unique_ptr<DataParallel> makeNoDataParallel(torch::nn::Module& model) {
  return std::make_unique<NoDataParallel>(model);
}

std::unique_ptr<DataParallel> makeDdpDataParallel(torch::nn::Module& model, comm::CommPtr comm, DdpConfig config) {
  std::vector<DdpGroup> groups;
  groups.push_back(DdpGroup{std::move(comm), {}});
  return std::make_unique<DdpDataParallel>(model, std::move(groups), config);
}

std::unique_ptr<DataParallel> makeDdpDataParallel(torch::nn::Module& model, std::vector<DdpGroup> groups,
                                                  DdpConfig config) {
  return std::make_unique<DdpDataParallel>(model, std::move(groups), config);
}

double localGradNorm(const std::vector<at::Tensor>& parameters) {
  double sumSquares = 0;
  for (const auto& p : parameters) {
    if (p.grad().defined()) sumSquares += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(sumSquares);
}

}  // namespace tessera::parallel
