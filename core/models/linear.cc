// tessera's Linear: the plain (unsharded, ordinary autograd) implementation.
#include "tessera/core/models/linear.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "tessera/core/error.h"

namespace tessera::models {

at::Tensor applyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const LayerOptions& options) {
  if (options.precision == Precision::kFp32) {
    auto fp32 = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    return at::linear(fp32(x), fp32(weight), fp32(bias));
  }
  return at::linear(x, weight, bias);
}

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias, LayerOptions options)
    : in_features_(in_features), out_features_(out_features), options_(std::move(options)) {
  TESSERA_CHECK_ARG(in_features >= 1 && out_features >= 1,
                    "Linear needs in_features and out_features >= 1, got " << in_features << " and "
                                                                           << out_features);
  options_.validate("Linear(" + std::to_string(in_features) + ", " + std::to_string(out_features) + ")",
                    /*embedding=*/false);
  // torch::nn::Linear's default (kaiming_uniform with a = sqrt(5), which is
  // U(-1/sqrt(in), 1/sqrt(in))), so a layer used alone behaves like torch's.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  weight = register_parameter("weight", at::empty({out_features, in_features}).uniform_(-bound, bound));
  weight_layout_ = {{out_features, in_features}, TensorSlice::whole({out_features, in_features})};
  if (with_bias) {
    bias = register_parameter("bias", at::empty({out_features}).uniform_(-bound, bound));
    bias_layout_ = {{out_features}, TensorSlice::whole({out_features})};
  }
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  TESSERA_CHECK_ARG(x.dim() >= 1 && x.size(-1) == in_features_,
                    "Linear(" << in_features_ << ", " << out_features_ << ") wants (..., " << in_features_
                              << ") inputs, got " << x.sizes());
  return applyLinear(x, weight, bias, options_);  // (..., out)
}

const ParameterLayout* LinearImpl::parameterLayout(const std::string& local_name) const {
  if (local_name == "weight") return &weight_layout_;
  if (local_name == "bias" && bias.defined()) return &bias_layout_;
  return nullptr;
}

}  // namespace tessera::models
