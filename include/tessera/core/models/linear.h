// tessera's linear layer: y = x W^T + b, the one GEMM-bearing layer every
// model uses (the GPT's qkv, proj, fc and untied head; every MoE expert and
// the router; the MLP classifier). Tensor parallelism (column / row), the
// deferred weight gradient and bf16 / FP8 are modes of this layer
// (layer_options.h), so they reach every model without touching model code.
//
// Parameters (relative to the layer): weight (out, in), bias (out) when bias.
// A layer knows each parameter's logical shape and the slice it holds
// (DeclaresParameterLayout); plain layers hold the whole tensor.
//
// Initial values: construction draws PyTorch's default (U(-1/sqrt(in),
// 1/sqrt(in)) for weight and bias, from torch's global generator) so a layer
// used on its own behaves like torch::nn::Linear. A model overwrites every
// parameter with the layout-independent init of init.h (a function of seed,
// parameter name and logical shape), so the model's values never depend on
// torch's generator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/layer_options.h"
#include "tessera/core/models/logical_parameters.h"

namespace tessera::models {

// The GEMM every tessera layer runs: x (..., in) -> x W^T + b (..., out) under
// `options`' precision (kFp32 casts operands and computes in fp32; kDefault
// uses the operands' dtype). bias may be undefined. Embedding::attend (the
// tied head) runs it too, so a precision mode applies to both.
at::Tensor applyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const LayerOptions& options);

class LinearImpl : public torch::nn::Module, public DeclaresParameterLayout {
 public:
  // Throws InvalidArgument for non-positive sizes, and what
  // LayerOptions::validate throws for a mode this build lacks.
  LinearImpl(int64_t in_features, int64_t out_features, bool bias = true, LayerOptions options = {});

  // x: (..., in) -> (..., out).
  at::Tensor forward(const at::Tensor& x);

  const ParameterLayout* parameterLayout(const std::string& local_name) const override;
  const LayerOptions& options() const { return options_; }
  int64_t inFeatures() const { return in_features_; }
  int64_t outFeatures() const { return out_features_; }

  at::Tensor weight;  // (out, in)
  at::Tensor bias;    // (out); undefined without bias

 private:
  int64_t in_features_;
  int64_t out_features_;
  LayerOptions options_;
  ParameterLayout weight_layout_;
  ParameterLayout bias_layout_;
};
TORCH_MODULE(Linear);

}  // namespace tessera::models
