// An FP8 fake-quant reference for tests, written independently of
// core/numerics/fp8_scaling.cc: element loops over the scalar codec
// (encodeFp8 / decodeFp8 of one value) and the recipes' scale formula spelled
// out (fp8_scaling.h), so a test can compare an FP8 layer with an fp32 GEMM
// on operands quantized -> dequantized at the same points.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tessera/core/numerics/fp8.h"
#include "tessera/core/numerics/fp8_scaling.h"

namespace tessera::testing {

inline float refScale(float amax, float fmax, const numerics::Fp8RecipeConfig& c) {
  if (amax == 0.0f) return 1.0f;
  if (c.power_of_two) {
    return std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(double(fmax) / amax))) - c.margin);
  }
  return fmax / amax / std::ldexp(1.0f, c.margin);
}

inline float amaxOf(const at::Tensor& t) { return t.abs().max().item<float>(); }

// Delayed scaling's bookkeeping, kept by the test: the scale of the next cast
// from the window of previous amaxes (max or most recent).
struct RefDelayed {
  std::vector<float> seen;
  float next(const numerics::Fp8RecipeConfig& c, float fmax) const {
    if (seen.empty()) return 1.0f;
    float window = seen.back();
    if (c.amax_from_max) {
      const size_t from = seen.size() > size_t(c.amax_history) ? seen.size() - size_t(c.amax_history) : 0;
      for (size_t i = from; i < seen.size(); ++i) window = std::max(window, seen[i]);
    }
    return refScale(window, fmax, c);
  }
};

// q then dq of t as the recipe prescribes for `role`; delayedScale for kDelayed.
inline at::Tensor refFakeQuant(const at::Tensor& t, const numerics::Fp8RecipeConfig& c, numerics::Fp8Role role, float delayedScale) {
  const numerics::Fp8Format fmt = role == numerics::Fp8Role::kGradOutput ? numerics::Fp8Format::kE5M2 : numerics::Fp8Format::kE4M3;
  const float fmax = fmt == numerics::Fp8Format::kE4M3 ? 448.0f : 57344.0f;
  const at::Tensor t2 = t.detach().reshape({-1, t.size(-1)}).contiguous();
  const int64_t R = t2.size(0), K = t2.size(1), nc = (K + 127) / 128;
  const int64_t tileRows = role == numerics::Fp8Role::kWeight ? 128 : 1;
  auto group = [&](int64_t r, int64_t k) -> int64_t {
    switch (c.recipe) {
      case numerics::ScalingRecipe::kRowwise: return r;
      case numerics::ScalingRecipe::kBlockwise: return (r / tileRows) * nc + k / 128;
      default: return 0;
    }
  };
  const float* in = t2.data_ptr<float>();
  std::vector<float> amax(static_cast<size_t>(R * nc + R + 1), 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      float& a = amax[static_cast<size_t>(group(r, k))];
      a = std::max(a, std::abs(in[r * K + k]));
    }
  at::Tensor out = at::empty({R, K});
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const float s = c.recipe == numerics::ScalingRecipe::kDelayed ? delayedScale
                                                          : refScale(amax[static_cast<size_t>(group(r, k))], fmax, c);
      const uint8_t code = numerics::encodeFp8(in[r * K + k] * s, fmt, numerics::Overflow::kSaturate);
      o[r * K + k] = numerics::decodeFp8(code, fmt) / s;
    }
  return out.reshape(t.sizes());
}

}  // namespace tessera::testing
