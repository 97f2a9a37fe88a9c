#include "tessera/core/trainable.h"

#include <torch/nn/functional/loss.h>

#include "tessera/core/error.h"

namespace tessera {
namespace {

class GptTrainable final : public TrainableModel {
 public:
  explicit GptTrainable(models::Gpt gpt) : gpt_(std::move(gpt)) {}
  torch::nn::Module& module() override { return *gpt_; }
  at::Tensor loss(const Batch& batch) override { return gpt_->loss(batch.inputs, batch.targets); }
  void setRandomKey(int64_t step, int64_t microBatch) override { gpt_->setRandomKey(step, microBatch); }

 private:
  models::Gpt gpt_;
};

class MlpTrainable final : public TrainableModel {
 public:
  explicit MlpTrainable(models::MlpClassifier mlp) : mlp_(std::move(mlp)) {}
  torch::nn::Module& module() override { return *mlp_; }
  at::Tensor loss(const Batch& batch) override { return mlp_->loss(batch.inputs, batch.targets); }
  void setRandomKey(int64_t step, int64_t microBatch) override { mlp_->setRandomKey(step, microBatch); }

 private:
  models::MlpClassifier mlp_;
};

// Batches gathered by `Dataset::batch(indices)` in the sampler's order.
template <typename Dataset>
class SampledBatchSource final : public BatchSource {
 public:
  SampledBatchSource(Dataset dataset, data::DistributedSampler::Options options)
      : dataset_(std::move(dataset)), sampler_(withSize(options, dataset_.size())) {}

  Batch next() override {
    auto b = dataset_.batch(sampler_.next());
    Batch out;
    if constexpr (std::is_same_v<Dataset, data::LmDataset>) {
      out.inputs = b.inputs;
      out.targets = b.targets;
      out.tokens = b.inputs.numel();
    } else {
      out.inputs = b.images;
      out.targets = b.labels;
      out.tokens = b.labels.numel();
    }
    return out;
  }
  data::SamplerState state() const override { return sampler_.state(); }
  void loadState(const data::SamplerState& state) override { sampler_.loadState(state); }

 private:
  static data::DistributedSampler::Options withSize(data::DistributedSampler::Options options, int64_t size) {
    options.numExamples = size;
    return options;
  }

  Dataset dataset_;
  data::DistributedSampler sampler_;
};

}  // namespace

std::unique_ptr<TrainableModel> makeTrainable(models::Gpt gpt) {
  TESSERA_CHECK_ARG(!gpt.is_empty(), "makeTrainable: the Gpt holder is empty");
  return std::make_unique<GptTrainable>(std::move(gpt));
}

std::unique_ptr<TrainableModel> makeTrainable(models::MlpClassifier mlp) {
  TESSERA_CHECK_ARG(!mlp.is_empty(), "makeTrainable: the MlpClassifier holder is empty");
  return std::make_unique<MlpTrainable>(std::move(mlp));
}

std::unique_ptr<BatchSource> makeBatchSource(data::LmDataset dataset, data::DistributedSampler::Options options) {
  return std::make_unique<SampledBatchSource<data::LmDataset>>(std::move(dataset), options);
}

std::unique_ptr<BatchSource> makeBatchSource(data::ImageDataset dataset, data::DistributedSampler::Options options) {
  return std::make_unique<SampledBatchSource<data::ImageDataset>>(std::move(dataset), options);
}

}  // namespace tessera
