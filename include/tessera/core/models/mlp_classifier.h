// A multi-layer perceptron classifier: the fashion-MNIST model (784 inputs,
// 10 classes). tessera Linear layers with ReLU between them, no normalization.
// Parameters: layers.<i>.weight, layers.<i>.bias, i = 0 .. hidden_sizes.size().
// Initialization and dropout do not depend on layout (init.h, random.h): each
// parameter from (seed, its name, its logical shape), each dropout mask from
// (seed, step, micro-batch, hidden layer, element index).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/random.h"

namespace tessera::models {

struct MlpClassifierConfig {
  int64_t input_dim = 784;                     // features per example (28 * 28 pixels)
  std::vector<int64_t> hidden_sizes = {256, 128};  // width of each hidden layer, each >= 1; may be empty
  int64_t num_classes = 10;                    // output logits, >= 2
  double dropout = 0.0;                        // dropout after each hidden ReLU, in [0, 1)
  uint64_t seed = 1234;                        // seeds the parameter init and the dropout masks

  // Throws ConfigError naming the field ("model.hidden_sizes").
  void validate(const std::string& prefix = "model.") const;
};

class MlpClassifierImpl : public torch::nn::Module {
 public:
  // Validates config (throws ConfigError) and initializes from config.seed:
  // He-uniform weights (bound sqrt(6 / fan_in), for ReLU), zero biases.
  explicit MlpClassifierImpl(const MlpClassifierConfig& config);

  // x: (B, input_dim) or (B, ...) flattening to input_dim, floating -> logits (B, num_classes).
  torch::Tensor forward(const torch::Tensor& x);

  // Mean cross-entropy. labels: (B,) int64 in [0, num_classes) -> ().
  torch::Tensor loss(const torch::Tensor& x, const torch::Tensor& labels);

  const MlpClassifierConfig& config() const { return config_; }

  // Which forward the next forwards are (the dropout masks they draw); the
  // contract of GptImpl::setRandomKey. Dropout site i follows hidden layer i.
  void setRandomKey(int64_t step, int64_t microBatch);

  torch::nn::ModuleList layers{nullptr};  // tessera Linear modules, input to output

 private:
  MlpClassifierConfig config_;
  DropoutKey dropout_key_;  // site set per hidden layer in forward
};
TORCH_MODULE(MlpClassifier);

}  // namespace tessera::models
