// MLP classifier for fashion-MNIST.
#include "tessera/core/models/mlp_classifier.h"

#include <cmath>

#include "tessera/core/config.h"
#include "tessera/core/models/init.h"
#include "tessera/core/models/linear.h"

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
  dropout_key_.seed = config_.seed;
  layers = register_module("layers", torch::nn::ModuleList());
  int64_t width = config_.input_dim;
  for (int64_t hidden : config_.hidden_sizes) {
    layers->push_back(Linear(width, hidden));
    width = hidden;
  }
  layers->push_back(Linear(width, config_.num_classes));

  // He-uniform weights for ReLU (bound sqrt(6 / fan_in), fan_in from the
  // logical shape), zero biases; each from (seed, name, shape) alone.
  initializeParameters(*this, config_.seed, [](const LogicalParameter& p) {
    if (p.globalShape.size() == 1) return ParameterInit::constant(0.0);
    const double bound = std::sqrt(6.0 / static_cast<double>(p.globalShape[1]));
    return ParameterInit::uniform(-bound, bound);
  });
}

void MlpClassifierImpl::setRandomKey(int64_t step, int64_t microBatch) {
  dropout_key_.setStep(step, microBatch);
}

torch::Tensor MlpClassifierImpl::forward(const torch::Tensor& x) {
  auto h = x.reshape({x.size(0), -1});  // (B, input_dim)
  TESSERA_CHECK_ARG(h.size(1) == config_.input_dim,
                    "MlpClassifier wants " << config_.input_dim << " features per example, got " << x.sizes());
  const size_t last = layers->size() - 1;
  for (size_t i = 0; i < layers->size(); ++i) {
    h = layers[i]->as<LinearImpl>()->forward(h);  // (B, width_i)
    if (i == last) break;
    DropoutKey key = dropout_key_;
    key.site = i;
    h = dropout(torch::relu(h), config_.dropout, is_training(), key);
  }
  return h;  // (B, num_classes)
}

torch::Tensor MlpClassifierImpl::loss(const torch::Tensor& x, const torch::Tensor& labels) {
  return torch::cross_entropy_loss(forward(x), labels);
}

}  // namespace tessera::models
