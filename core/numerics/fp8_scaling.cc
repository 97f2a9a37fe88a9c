// The FP8 scaling recipes (fp8_scaling.h): amaxes, scales, the scaled cast.
#include "tessera/core/numerics/fp8_scaling.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::numerics {
namespace {

constexpr int kMaxScaleExponent = 127;  // scales stay finite fp32 powers of two
constexpr int kMinScaleExponent = -126;  // ... and normal

bool perTensor(const Fp8RecipeConfig& config) {
  return config.recipe == ScalingRecipe::kDelayed || config.recipe == ScalingRecipe::kTensorwise;
}

// x as (rows, last dim).
at::Tensor rows2d(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}); }

}  // namespace

const char* toString(ScalingRecipe recipe) {
  switch (recipe) {
    case ScalingRecipe::kDelayed: return "delayed";
    case ScalingRecipe::kTensorwise: return "tensorwise";
    case ScalingRecipe::kRowwise: return "rowwise";
    case ScalingRecipe::kBlockwise: return "blockwise";
  }
  return "?";
}

ScalingRecipe parseScalingRecipe(const std::string& value, const std::string& field) {
  for (ScalingRecipe r : {ScalingRecipe::kDelayed, ScalingRecipe::kTensorwise, ScalingRecipe::kRowwise,
                          ScalingRecipe::kBlockwise}) {
    if (value == toString(r)) return r;
  }
  throw ConfigError(field, "unknown FP8 scaling recipe '" + value +
                               "'; use \"delayed\", \"tensorwise\", \"rowwise\" or \"blockwise\"");
}

void Fp8RecipeConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(amax_history >= 1 && amax_history <= (int64_t{1} << 20), prefix + "amax_history",
                       "must be in [1, 2^20], got " << amax_history);
  TESSERA_CHECK_CONFIG(margin >= 0 && margin <= 64, prefix + "margin", "must be in [0, 64], got " << margin);
}

const char* toString(Fp8Role role) {
  switch (role) {
    case Fp8Role::kInput: return "input";
    case Fp8Role::kWeight: return "weight";
    case Fp8Role::kGradOutput: return "grad_output";
  }
  return "?";
}

Fp8Format formatOf(Fp8Role role) { return role == Fp8Role::kGradOutput ? Fp8Format::kE5M2 : Fp8Format::kE4M3; }

float scaleFromAmax(float amax, Fp8Format format, int margin, bool power_of_two) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 1.0f;
  const double fmax = fp8Max(format);
  if (power_of_two) {
    // The largest e with amax * 2^e <= fp8_max, i.e. floor(log2(fp8_max / amax))
    // without the rounding of the quotient (a quotient rounded up onto a power
    // of two would pick a scale that saturates amax itself).
    int e = static_cast<int>(std::floor(std::log2(fmax / amax)));
    while (std::ldexp(static_cast<double>(amax), e) > fmax) --e;
    while (std::ldexp(static_cast<double>(amax), e + 1) <= fmax) ++e;
    e = std::clamp(e - margin, kMinScaleExponent, kMaxScaleExponent);
    return std::ldexp(1.0f, e);
  }
  // fp32 arithmetic, as TE's scale update (one rounded division).
  const float scale = (fp8Max(format) / amax) / std::ldexp(1.0f, margin);
  return std::min(scale, std::ldexp(1.0f, kMaxScaleExponent));
}

at::Tensor Fp8Tensor::dequantize() const {
  if (codes.device().is_cpu()) return decodeFp8(codes, scale, format);
  return decodeFp8(codes.cpu(), scale.cpu(), format).to(codes.device());
}

Fp8Scaler::Fp8Scaler(Fp8RecipeConfig config, Fp8Role role) : config_(std::move(config)), role_(role) {
  config_.validate("");
  if (config_.recipe == ScalingRecipe::kDelayed) history_.assign(static_cast<size_t>(config_.amax_history), 0.0f);
}

// The amaxes the recipe scales by: 0-dim (per tensor), (rows, 1) (per row),
// (row tiles, column tiles) (per block). A NaN anywhere in a group makes its
// amax NaN (max propagates NaN), so the group's scale falls back as documented.
at::Tensor Fp8Scaler::recipeAmax(const at::Tensor& x) const {
  if (perTensor(config_)) {
    return x.numel() == 0 ? at::zeros({}, x.options().dtype(at::kFloat)) : x.abs().max().to(at::kFloat);
  }
  const at::Tensor a = rows2d(x).abs().to(at::kFloat);  // (R, K)
  if (config_.recipe == ScalingRecipe::kRowwise) return std::get<0>(a.max(1, /*keepdim=*/true));  // (R, 1)
  // Blocks: zero-padded to whole tiles (|x| >= 0, so padding never raises an amax).
  const int64_t tileRows = role_ == Fp8Role::kWeight ? kFp8BlockSize : 1;
  const int64_t R = a.size(0), K = a.size(1);
  const int64_t nr = (R + tileRows - 1) / tileRows, nc = (K + kFp8BlockSize - 1) / kFp8BlockSize;
  const at::Tensor padded = at::constant_pad_nd(a, {0, nc * kFp8BlockSize - K, 0, nr * tileRows - R}, 0);
  const at::Tensor tiles = padded.view({nr, tileRows, nc, kFp8BlockSize});
  return std::get<0>(std::get<0>(tiles.max(3)).max(1));  // (nr, nc)
}

at::Tensor Fp8Scaler::currentScales(const at::Tensor& amax) const {
  const at::Tensor a = amax.to(at::kFloat).contiguous();
  at::Tensor scales = at::empty(a.sizes(), a.options());
  const float* in = a.data_ptr<float>();
  float* out = scales.data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) out[i] = scaleFromAmax(in[i], format(), config_.margin, config_.power_of_two);
  return scales;
}

// The scale grid made broadcastable to x: per tensor 0-dim, per row (..., 1),
// per block expanded to x's shape (the codec takes no tile layout).
at::Tensor Fp8Scaler::expandScale(const at::Tensor& grid, const at::Tensor& x) const {
  if (perTensor(config_)) return grid;
  std::vector<int64_t> sizes = x.sizes().vec();
  if (config_.recipe == ScalingRecipe::kRowwise) {
    sizes.back() = 1;
    return grid.reshape(sizes);
  }
  const int64_t tileRows = role_ == Fp8Role::kWeight ? kFp8BlockSize : 1;
  const int64_t K = x.size(-1), R = x.numel() / std::max<int64_t>(K, 1);
  return grid.repeat_interleave(tileRows, 0)
      .narrow(0, 0, R)
      .repeat_interleave(kFp8BlockSize, 1)
      .narrow(1, 0, K)
      .reshape(sizes)
      .contiguous();
}

void Fp8Scaler::recordAmax(float amax) {
  std::rotate(history_.rbegin(), history_.rbegin() + 1, history_.rend());  // shift toward the old end
  history_.front() = amax;
  float window = history_.front();
  if (config_.amax_from_max) {
    for (float a : history_) window = std::isfinite(a) && std::isfinite(window) ? std::max(window, a) : NAN;
  }
  // TE: the previous scale stays while the window's amax is 0 or not finite.
  if (window > 0.0f && std::isfinite(window)) scale_ = scaleFromAmax(window, format(), config_.margin, config_.power_of_two);
}

Fp8Tensor Fp8Scaler::quantize(const at::Tensor& x, const AmaxReduce& reduceMax) {
  TESSERA_CHECK_ARG(x.defined() && x.is_floating_point(),
                    "Fp8Scaler(" << toString(role_) << ").quantize wants a floating-point tensor, got "
                                 << (x.defined() ? c10::toString(x.scalar_type()) : "an undefined tensor"));
  TESSERA_CHECK_ARG(perTensor(config_) || x.dim() >= 1,
                    "Fp8Scaler(" << toString(role_) << "): the " << toString(config_.recipe)
                                 << " recipe scales rows of the last dim; a 0-dim tensor has none");
  at::NoGradGuard noGrad;
  at::Tensor xc = x.detach().cpu();
  if (xc.scalar_type() != at::kFloat && xc.scalar_type() != at::kBFloat16) xc = xc.to(at::kFloat);

  at::Tensor amax = recipeAmax(xc);
  if (reduceMax) {
    const at::Tensor reduced = reduceMax(amax);
    TESSERA_CHECK_ARG(reduced.sizes() == amax.sizes(), "Fp8Scaler: reduceMax returned shape "
                                                           << reduced.sizes() << " for amaxes of shape " << amax.sizes());
    amax = reduced.to(at::kFloat).cpu();
  }
  at::Tensor scale;
  if (config_.recipe == ScalingRecipe::kDelayed) {
    scale = at::scalar_tensor(scale_, xc.options().dtype(at::kFloat));  // from previous casts' amaxes
    recordAmax(amax.item<float>());
  } else {
    scale = expandScale(currentScales(amax), xc);
  }
  Fp8Tensor out{encodeFp8(xc, scale, format(), Overflow::kSaturate), scale, format()};
  last_scale_ = scale;
  if (!x.device().is_cpu()) {
    out.codes = out.codes.to(x.device());
    out.scale = out.scale.to(x.device());
  }
  return out;
}

int64_t Fp8Scaler::stateSize() const {
  return config_.recipe == ScalingRecipe::kDelayed ? 1 + config_.amax_history : 0;
}

at::Tensor Fp8Scaler::state() const {
  at::Tensor out = at::empty({stateSize()}, at::kFloat);
  if (stateSize() == 0) return out;
  float* p = out.data_ptr<float>();
  p[0] = scale_;
  std::copy(history_.begin(), history_.end(), p + 1);
  return out;
}

void Fp8Scaler::loadState(const at::Tensor& state) {
  TESSERA_CHECK_ARG(state.defined() && state.numel() == stateSize(),
                    "Fp8Scaler(" << toString(role_) << ", " << toString(config_.recipe) << ").loadState: got "
                                 << (state.defined() ? state.numel() : 0) << " values, the state has " << stateSize()
                                 << " (1 + amax_history for delayed, 0 otherwise)");
  if (stateSize() == 0) return;
  const at::Tensor s = state.detach().to(at::kFloat).cpu().contiguous();
  const float* p = s.data_ptr<float>();
  scale_ = p[0];
  std::copy(p + 1, p + stateSize(), history_.begin());
}

}  // namespace tessera::numerics
