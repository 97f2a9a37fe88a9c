// Layout-independent initialization (see init.h for the construction).
#include "tessera/core/models/init.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/module.h>

#include <cmath>

#include "tessera/core/error.h"
#include "tessera/core/models/random.h"

namespace tessera::models {
namespace {

constexpr double kTwoToMinus53 = 1.0 / 9007199254740992.0;
constexpr double kTwoPi = 6.283185307179586476925286766559;

// 53 random bits of (hi, lo) as a double in [0, 1).
double unitInterval(uint32_t hi, uint32_t lo) {
  return static_cast<double>(((uint64_t{hi} << 32) | lo) >> 11) * kTwoToMinus53;
}

// Fills the slice's values: value(a, b, odd) per element, where a (from words
// w0, w1) and b (from w2, w3) in [0, 1) come from the Philox block of counter
// (g / 2, 0, 0) under the parameter's key and odd = g is odd.
template <typename Value>
at::Tensor fillSlice(uint64_t seed, const std::string& name, const std::vector<int64_t>& globalShape,
                     const TensorSlice& slice, Value value) {
  const SliceIndexer indexer(globalShape, slice);
  const uint64_t key64 = streamKey(seed, "init:" + name);
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(key64), static_cast<uint32_t>(key64 >> 32)};
  at::Tensor out = at::empty({indexer.numel()}, at::kFloat);
  float* data = out.data_ptr<float>();
  at::parallel_for(0, indexer.numel(), 1 << 12, [&](int64_t begin, int64_t end) {
    indexer.forRuns(begin, end, [&](int64_t local, int64_t global, int64_t length) {
      // One Philox block serves 2 consecutive global elements.
      for (int64_t i = 0; i < length;) {
        const int64_t g = global + i;
        const int64_t block = g >> 1;
        const auto w = philox4x32({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0, 0}, key);
        const double a = unitInterval(w[0], w[1]);
        const double b = unitInterval(w[2], w[3]);
        for (int64_t odd = g & 1; odd < 2 && i < length; ++odd, ++i) {
          data[local + i] = static_cast<float>(value(a, b, odd != 0));
        }
      }
    });
  });
  return slice.isWholeBox() ? out.view(slice.sizes) : out;
}

}  // namespace

at::Tensor initNormalSlice(uint64_t seed, const std::string& name, const std::vector<int64_t>& globalShape,
                           const TensorSlice& slice, double std, double mean) {
  TESSERA_CHECK_ARG(std >= 0, "initNormalSlice('" << name << "'): std must be >= 0, got " << std);
  // Box-Muller: (r cos t, r sin t) with r = sqrt(-2 ln(1 - a)), t = 2 pi b are two
  // independent N(0, 1); the even element of a pair takes cos, the odd sin.
  return fillSlice(seed, name, globalShape, slice, [&](double a, double b, bool odd) {
    const double r = std::sqrt(-2.0 * std::log(1.0 - a));  // 1 - a in (0, 1]: the log is finite
    const double t = kTwoPi * b;
    return mean + std * r * (odd ? std::sin(t) : std::cos(t));
  });
}

at::Tensor initUniformSlice(uint64_t seed, const std::string& name, const std::vector<int64_t>& globalShape,
                            const TensorSlice& slice, double low, double high) {
  TESSERA_CHECK_ARG(high >= low, "initUniformSlice('" << name << "'): high (" << high << ") < low (" << low << ")");
  // The even element of a pair takes a, the odd b: one block, two values.
  return fillSlice(seed, name, globalShape, slice, [&](double a, double b, bool odd) {
    return low + (high - low) * (odd ? b : a);
  });
}

void initializeParameters(torch::nn::Module& root, uint64_t seed, const InitRule& rule) {
  at::NoGradGuard no_grad;
  for (const LogicalParameter& p : logicalParameters(root)) {
    const ParameterInit init = rule(p);
    at::Tensor target = p.tensor;
    switch (init.kind) {
      case ParameterInit::Kind::kConstant:
        target.fill_(init.a);
        break;
      case ParameterInit::Kind::kNormal:
      case ParameterInit::Kind::kUniform: {
        // Piece by piece into the parameter's flat memory (ParameterLayout's order).
        at::Tensor flat = target.view({-1});
        int64_t offset = 0;
        for (const TensorSlice& slice : p.pieces) {
          const at::Tensor values =
              init.kind == ParameterInit::Kind::kNormal
                  ? initNormalSlice(seed, p.name, p.globalShape, slice, init.b, init.a)
                  : initUniformSlice(seed, p.name, p.globalShape, slice, init.a, init.b);
          flat.narrow(0, offset, slice.numel).copy_(values.reshape({-1}));
          offset += slice.numel;
        }
        break;
      }
    }
  }
}

}  // namespace tessera::models
