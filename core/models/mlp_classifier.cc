// MLP classifier for fashion-MNIST.
#include "tessera/core/models/mlp_classifier.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/linear.h>

#include <cmath>

#include "tessera/core/config.h"

namespace tessera::models {

void MlpClassifierConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(input_dim >= 1, prefix + "input_dim", "must be >= 1, got " << input_dim);
  for (size_t i = 0; i < hidden_sizes.size(); ++i) {
    TESSERA_CHECK_CONFIG(hidden_sizes[i] >= 1, prefix + "hidden_sizes",
                         "every width must be >= 1, got " << hidden_sizes[i] << " at index " << i);
  }
  TESSERA_CHECK_CONFIG(num_classes >= 2, prefix + "num_classes", "must be >= 2, got " << num_classes);
  TESSERA_CHECK_CONFIG(dropout >= 0 && dropout < 1, prefix + "dropout", "must be in [0, 1), got " << dropout);
}

MlpClassifierImpl::MlpClassifierImpl(const MlpClassifierConfig& config) : config_(config) {
  config_.validate();
  layers = register_module("layers", torch::nn::ModuleList());
  int64_t width = config_.input_dim;
  for (int64_t hidden : config_.hidden_sizes) {
    layers->push_back(torch::nn::Linear(width, hidden));
    width = hidden;
  }
  layers->push_back(torch::nn::Linear(width, config_.num_classes));

  // He-uniform weights for ReLU (bound sqrt(6 / fan_in)), zero biases, from our
  // own generator so the parameters depend on the seed alone.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(config_.seed);
  torch::NoGradGuard no_grad;
  for (const auto& layer : *layers) {
    auto* linear = layer->as<torch::nn::LinearImpl>();
    const double bound = std::sqrt(6.0 / static_cast<double>(linear->weight.size(1)));
    linear->weight.uniform_(-bound, bound, generator);
    linear->bias.zero_();
  }
}

torch::Tensor MlpClassifierImpl::forward(const torch::Tensor& x) {
  auto h = x.reshape({x.size(0), -1});  // (B, input_dim)
  TESSERA_CHECK_ARG(h.size(1) == config_.input_dim,
                    "MlpClassifier wants " << config_.input_dim << " features per example, got " << x.sizes());
  const size_t last = layers->size() - 1;
  for (size_t i = 0; i < layers->size(); ++i) {
    h = layers[i]->as<torch::nn::LinearImpl>()->forward(h);  // (B, width_i)
    if (i == last) break;
    h = torch::relu(h);
    if (config_.dropout > 0) h = torch::dropout(h, config_.dropout, is_training());
  }
  return h;  // (B, num_classes)
}

torch::Tensor MlpClassifierImpl::loss(const torch::Tensor& x, const torch::Tensor& labels) {
  return torch::cross_entropy_loss(forward(x), labels);
}

}  // namespace tessera::models
