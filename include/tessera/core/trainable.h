// What the training loop needs from a model and from the data: a loss on a
// batch, and batches from a sampler whose position is training state.
//
// The training loop (train/trainer.h) and the step executors that run a step's
// forward and backward across the mesh (parallel/step_executor.h) see only
// these two interfaces, so a new model or dataset is an adapter here, not a
// change to the loop. Adapters for the GPT (byte-level fortunes) and the
// fashion-MNIST MLP are provided. This is the models' side of training and
// lives in core/, below parallel/ and train/.
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
  // Keys the model's randomness (dropout) for the next forward: masks are a
  // function of (model seed, step, micro-batch, site, element index), never of
  // a generator's state, so every layout (FSDP recomputation, later TP/PP)
  // draws the same masks as one process. Called by the step executor before
  // every training forward. Default: the model has no randomness.
  virtual void setRandomKey(int64_t step, int64_t microBatch) {}
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
