// What the training loop needs from a model and from the data: a loss on a
// batch, and batches from a sampler whose position is training state.
//
// The Trainer sees only these two interfaces, so a new model or dataset is an
// adapter here, not a change to the loop. Adapters for the GPT (byte-level
// fortunes) and the fashion-MNIST MLP are provided.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "tessera/core/data/byte_corpus.h"
#include "tessera/core/data/distributed_sampler.h"
#include "tessera/core/data/fashion_mnist.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/mlp_classifier.h"

namespace torch::nn {
class Module;
}

namespace tessera {

// One rank's batch.
struct Batch {
  at::Tensor inputs;   // model input: (B, T) int64 token ids, or (B, 784) float images
  at::Tensor targets;  // (B, T) next tokens, or (B,) class labels
  int64_t tokens = 0;  // units of work in the batch, for throughput: B * T tokens, or B examples
};

// A model as the loop sees it.
class TrainableModel {
 public:
  virtual ~TrainableModel() = default;
  // The module the data-parallel wrapper and the optimizer act on.
  virtual torch::nn::Module& module() = 0;
  // Mean loss over the batch: a differentiable scalar ().
  virtual at::Tensor loss(const Batch& batch) = 0;
};

// Next-byte cross-entropy of the GPT (plus its MoE aux loss). Shares `gpt`.
std::unique_ptr<TrainableModel> makeTrainable(models::Gpt gpt);
// Classification cross-entropy of the MLP. Shares `mlp`.
std::unique_ptr<TrainableModel> makeTrainable(models::MlpClassifier mlp);

// An endless stream of this rank's batches.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch next() = 0;
  // The sampler's position: state() then loadState() in a fresh source with
  // the same options makes next() continue identically.
  virtual data::SamplerState state() const = 0;
  virtual void loadState(const data::SamplerState& state) = 0;
};

// Batches of `dataset` in the order a DistributedSampler with `options` gives
// (options.numExamples is filled in from the dataset). The dataset is held
// by value (it shares its tensors). Throws InvalidArgument like the sampler.
std::unique_ptr<BatchSource> makeBatchSource(data::LmDataset dataset, data::DistributedSampler::Options options);
std::unique_ptr<BatchSource> makeBatchSource(data::ImageDataset dataset, data::DistributedSampler::Options options);

}  // namespace tessera
