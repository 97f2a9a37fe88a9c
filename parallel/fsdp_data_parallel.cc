// FSDP behind the DataParallel interface the training loop drives: name()
// "fsdp", or "hybrid" when the replicate communicator has more than one rank.
#include "tessera/parallel/fsdp.h"

#include <utility>

namespace tessera::parallel {

namespace {

class FsdpDataParallel final : public DataParallel {
 public:
  template <typename... Args>
  explicit FsdpDataParallel(bool hybrid, Args&&... args)
      : hybrid_(hybrid), fsdp_(std::forward<Args>(args)...), shards_(fsdp_.shards()) {}
  std::string name() const override { return hybrid_ ? "hybrid" : "fsdp"; }
  std::vector<at::Tensor> optimizerParameters() override { return shards_; }
  void beforeForward() override { fsdp_.beforeForward(); }
  void finishGradientSync() override { fsdp_.finishGradientSync(); }
  double gradNorm() override { return fsdp_.gradNorm(); }
  std::unique_ptr<NoSyncScope> noSync() override { return fsdp_.noSync(); }
  DataParallelStats stats() const override { return fsdp_.stats(); }
  std::vector<std::vector<ParameterPiece>> parameterLayout() const override { return fsdp_.shardLayout(); }
  bool sharded() const override { return true; }
  void setGradientArrivals(std::function<int(const std::string&)> arrivals) override {
    fsdp_.setGradientArrivals(std::move(arrivals));
  }

 private:
  bool hybrid_;
  FullyShardedDataParallel fsdp_;
  std::vector<at::Tensor> shards_;
};

bool isHybrid(const comm::CommPtr& replicateComm) { return replicateComm && replicateComm->size() > 1; }

}  // namespace

std::unique_ptr<DataParallel> makeFsdpDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm,
                                                   comm::CommPtr replicateComm, const FsdpExpertUnits* experts,
                                                   FsdpConfig config) {
  const bool hybrid = isHybrid(replicateComm);
  return std::make_unique<FsdpDataParallel>(hybrid, gpt, std::move(shardComm), std::move(replicateComm),
                                            experts, config);
}

std::unique_ptr<DataParallel> makeFsdpDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> units,
                                                   comm::CommPtr shardComm, comm::CommPtr replicateComm,
                                                   FsdpConfig config) {
  const bool hybrid = isHybrid(replicateComm);
  return std::make_unique<FsdpDataParallel>(hybrid, module, std::move(units), std::move(shardComm),
                                            std::move(replicateComm), config);
}

}  // namespace tessera::parallel
