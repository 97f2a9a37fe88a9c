// bf16 and FP8 GEMMs of tessera's Linear, and the model-level precision
// switch and FP8 state (precision.h).
//
// The FP8 path is a composition, so every mode of the layer (sharded,
// deferred weight gradient) keeps working: only the GEMM's operands change.
//   x  -> [q/dq E4M3, straight-through] -> X_q ---+
//   W  -> [q/dq E4M3, straight-through] -> W_q ----> at::linear / deferredLinear -> y -> [dY -> q/dq E5M2] -> out
// The two kinds of node are one hand-written autograd Node (GradientMap)
// whose backward maps the incoming gradient (identity, or the E5M2 cast).
// A Node rather than torch::autograd::Function: the gradient cast must call
// into the layer's scaler, which Function's saved_data (IValues) cannot hold.
#include "tessera/core/models/precision.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/version.h>

#include <ATen/ATen.h>

#include <functional>
#include <utility>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/numerics/torch_float8.h"

namespace tessera::models {
namespace {

using numerics::Fp8Tensor;
using numerics::ScalingRecipe;
using GradientFn = std::function<at::Tensor(const at::Tensor&)>;

// Backward of `out = value` attached to `input`'s graph: d input = map(d out)
// (identity when map is empty).
struct GradientMap final : torch::autograd::Node {
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(1);
    if (!grads[0].defined()) return out;
    out[0] = map ? map(grads[0]) : grads[0];
    return out;
  }
  GradientFn map;
};

// `value` (same shape as input) whose gradient flows to `input` through map.
// value must not be a view that autograd tracks (a fresh tensor or a detached
// alias): _unsafe_view makes the output a non-view, as deferredLinear's.
at::Tensor withGradient(const at::Tensor& input, const at::Tensor& value, GradientFn map) {
  if (!at::GradMode::is_enabled() || !input.requires_grad()) return value;
  at::Tensor out;
  {
    at::NoGradGuard noGrad;
    out = at::_unsafe_view(value.detach(), value.sizes());
  }
  auto node = std::shared_ptr<GradientMap>(new GradientMap(), torch::autograd::deleteNode);
  node->map = std::move(map);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(out, node);
  return out;
}

at::Tensor castTo(const at::Tensor& t, at::ScalarType dtype) { return t.defined() ? t.to(dtype) : t; }

bool deferredGrad(const LayerOptions& options) {
  return options.weight_grad == WeightGrad::kDeferred && at::GradMode::is_enabled();
}

bool perTensor(ScalingRecipe recipe) { return recipe == ScalingRecipe::kDelayed || recipe == ScalingRecipe::kTensorwise; }

// The weight's amax over the logical tensor (fp8_scaling.h "Sharding"): the
// per-tensor amax of any split, and the per-row amaxes where rows are split
// (row-parallel). Column-parallel rows are whole, and blocks stay local.
numerics::AmaxReduce weightAmaxReduce(const LayerOptions& options) {
  const bool sharded = options.sharding == Sharding::kColumn || options.sharding == Sharding::kRow;
  if (!sharded) return {};
  const ScalingRecipe recipe = options.fp8.recipe;
  if (!perTensor(recipe) && !(recipe == ScalingRecipe::kRowwise && options.sharding == Sharding::kRow)) return {};
  ShardGroup* group = options.group.get();
  return [group](const at::Tensor& amax) { return group->allReduceMax(amax); };
}

#if TESSERA_HAS_TORCH_FLOAT8
// The forward-only scaled GEMM on CUDA (precision.h): y = (X_codes / s_x) (W_codes / s_w)^T + b,
// fp32 out. Undefined when the shapes do not suit _scaled_mm (dims multiple of 16).
at::Tensor scaledMm(const Fp8Tensor& xq, const Fp8Tensor& wq, const at::Tensor& bias) {
  const int64_t K = xq.codes.size(-1), N = wq.codes.size(0);
  const at::Tensor a = numerics::codesAsTorchFloat8(xq.codes.reshape({-1, K}).contiguous(), xq.format);  // (M, K)
  if (a.size(0) % 16 != 0 || K % 16 != 0 || N % 16 != 0) return {};
  const at::Tensor b = numerics::codesAsTorchFloat8(wq.codes.contiguous(), wq.format).t();  // (K, N) column-major
  // _scaled_mm's scales multiply (dequantize); ours divide.
  const at::Tensor sa = xq.scale.reciprocal().to(at::kFloat).reshape({});
  const at::Tensor sb = wq.scale.reciprocal().to(at::kFloat).reshape({});
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 4
  // 2.1-2.3: (self, mat2, bias, out_dtype, scale_a, scale_b, scale_result, use_fast_accum) -> (out, amax)
  at::Tensor out = std::get<0>(at::_scaled_mm(a, b, c10::nullopt, at::kFloat, sa, sb));
#else
  // 2.4+: (self, mat2, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum) -> out
  at::Tensor out = at::_scaled_mm(a, b, sa, sb, c10::nullopt, c10::nullopt, at::kFloat);
#endif
  std::vector<int64_t> shape = xq.codes.sizes().vec();
  shape.back() = N;
  out = out.reshape(shape);  // (..., out)
  return bias.defined() ? out + bias : out;
}
#endif

}  // namespace

Fp8LinearScalers::Fp8LinearScalers(const numerics::Fp8RecipeConfig& config)
    : input(std::make_shared<numerics::Fp8Scaler>(config, numerics::Fp8Role::kInput)),
      weight(std::make_shared<numerics::Fp8Scaler>(config, numerics::Fp8Role::kWeight)),
      grad_output(std::make_shared<numerics::Fp8Scaler>(config, numerics::Fp8Role::kGradOutput)) {}

int64_t Fp8LinearScalers::stateSize() const {
  return input->stateSize() + weight->stateSize() + grad_output->stateSize();
}

at::Tensor Fp8LinearScalers::state() const { return at::cat({input->state(), weight->state(), grad_output->state()}); }

void Fp8LinearScalers::loadState(const at::Tensor& state) {
  TESSERA_CHECK_ARG(state.defined() && state.numel() == stateSize(),
                    "Fp8LinearScalers::loadState: got " << (state.defined() ? state.numel() : 0)
                                                        << " values, the layer's FP8 state has " << stateSize());
  const at::Tensor flat = state.reshape({-1});
  int64_t offset = 0;
  for (numerics::Fp8Scaler* s : {input.get(), weight.get(), grad_output.get()}) {
    s->loadState(flat.narrow(0, offset, s->stateSize()));
    offset += s->stateSize();
  }
}

at::Tensor bf16Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      const LayerOptions& options) {
  const at::Tensor xb = castTo(x, at::kBFloat16), wb = castTo(weight, at::kBFloat16), bb = castTo(bias, at::kBFloat16);
  const at::Tensor y = deferredGrad(options) ? deferredLinear(xb, wb, bb, options.weight_grad_store)
                                             : at::linear(xb, wb, bb);  // (..., out) bf16
  return y.to(at::kFloat);
}

at::Tensor fp8Linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const LayerOptions& options, Fp8LinearScalers& scalers) {
  // fp32 operands (a cast node when they are not): the casts read fp32 and
  // the master gradients arrive in the parameters' dtype through the casts.
  const at::Tensor x32 = castTo(x, at::kFloat), w32 = castTo(weight, at::kFloat), b32 = castTo(bias, at::kFloat);
  const Fp8Tensor xq = scalers.input->quantize(x32);                              // (..., in)
  const Fp8Tensor wq = scalers.weight->quantize(w32, weightAmaxReduce(options));  // (out, in)
#if TESSERA_HAS_TORCH_FLOAT8
  const bool needsGrad = at::GradMode::is_enabled() &&
                         (x32.requires_grad() || w32.requires_grad() || (b32.defined() && b32.requires_grad()));
  if (x.is_cuda() && perTensor(options.fp8.recipe) && !needsGrad) {
    const at::Tensor y = scaledMm(xq, wq, b32);
    if (y.defined()) return y;
  }
#endif
  // Straight-through casts: the GEMM's backward multiplies by the quantized
  // operands, so the casts themselves pass gradients unchanged.
  const at::Tensor xd = withGradient(x32, xq.dequantize(), {});
  const at::Tensor wd = withGradient(w32, wq.dequantize(), {});
  const at::Tensor y = deferredGrad(options) ? deferredLinear(xd, wd, at::Tensor(), options.weight_grad_store)
                                             : at::linear(xd, wd);  // (..., out) fp32
  // dY -> E5M2 before the GEMM's backward (B and the deferred W) sees it;
  // the bias outside, so its gradient is the unquantized dY.
  std::shared_ptr<numerics::Fp8Scaler> gradScaler = scalers.grad_output;
  const at::Tensor out =
      withGradient(y, y, [gradScaler](const at::Tensor& dy) { return gradScaler->quantize(dy).dequantize(); });
  return b32.defined() ? out + b32 : out;
}

void setPrecision(torch::nn::Module& model, Precision precision, const numerics::Fp8RecipeConfig& fp8) {
  if (precision == Precision::kFp8) fp8.validate("fp8.");
  model.apply([&](torch::nn::Module& m) {
    auto* linear = dynamic_cast<LinearImpl*>(&m);
    if (linear && linear->options().precision != Precision::kFp32) linear->setPrecision(precision, fp8);
  });
}

at::Tensor fp8ScalingState(const torch::nn::Module& model) {
  std::vector<at::Tensor> parts;
  model.apply([&](const torch::nn::Module& m) {
    const auto* linear = dynamic_cast<const LinearImpl*>(&m);
    if (linear && linear->fp8Scalers()) parts.push_back(linear->fp8Scalers()->state());
  });
  return parts.empty() ? at::empty({0}, at::kFloat) : at::cat(parts);
}

void loadFp8ScalingState(torch::nn::Module& model, const at::Tensor& state) {
  std::vector<Fp8LinearScalers*> layers;
  int64_t expected = 0;
  model.apply([&](torch::nn::Module& m) {
    auto* linear = dynamic_cast<LinearImpl*>(&m);
    if (linear && linear->fp8Scalers()) {
      layers.push_back(linear->fp8Scalers());
      expected += linear->fp8Scalers()->stateSize();
    }
  });
  const int64_t got = state.defined() ? state.numel() : 0;
  TESSERA_CHECK_ARG(got == expected, "loadFp8ScalingState: the state has " << got << " values, the model's FP8 "
                                         << "Linears hold " << expected << " (same model, precision and recipe?)");
  const at::Tensor flat = got == 0 ? state : state.reshape({-1});
  int64_t offset = 0;
  for (Fp8LinearScalers* s : layers) {
    s->loadState(flat.narrow(0, offset, s->stateSize()));
    offset += s->stateSize();
  }
}

}  // namespace tessera::models
