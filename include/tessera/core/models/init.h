// Initialization that does not depend on layout: a parameter's initial values
// are a pure function of (seed, parameter name, global shape), so any process
// can produce exactly its slice of a logical tensor without building the full
// model, and a model sharded any way starts from the values of one process.
//
// Element g (row-major index in the global tensor) of parameter `name`:
//   block:   Philox block of counter (g / 2, 0, 0) under
//            streamKey(seed, "init:" + name) (random.h); its words (w0, w1)
//            give a, (w2, w3) give b, each 53 bits in [0, 1);
//   normal:  Box-Muller, z = sqrt(-2 ln(1 - a)) * (g even ? cos : sin)(2 pi b);
//            value mean + std * z (a pair of elements shares one block);
//   uniform: u = (g even ? a : b); value low + (high - low) * u.
// The global shape enters only through g (the element's row-major index), so
// growing dim 0 -- a vocabulary padded to a multiple of the tp degree -- keeps
// the values of the existing rows.
//
// Values are computed in double and returned as float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/core/models/logical_parameters.h"
#include "tessera/core/state.h"

namespace torch::nn {
class Module;
}

namespace tessera::models {

// The values `slice` holds of N(mean, std^2) over a global tensor of
// `globalShape`: float32, shaped slice.sizes when slice.isWholeBox(), else
// (slice.numel). Throws InvalidArgument when the slice does not fit or std < 0.
at::Tensor initNormalSlice(uint64_t seed, const std::string& name, const std::vector<int64_t>& globalShape,
                           const TensorSlice& slice, double std, double mean = 0.0);

// The same for U[low, high). Throws InvalidArgument when the slice does not
// fit or high < low.
at::Tensor initUniformSlice(uint64_t seed, const std::string& name, const std::vector<int64_t>& globalShape,
                            const TensorSlice& slice, double low, double high);

// How one parameter starts.
struct ParameterInit {
  enum class Kind { kNormal, kUniform, kConstant };
  Kind kind = Kind::kConstant;
  double a = 0;  // normal: mean; uniform: low; constant: the value
  double b = 0;  // normal: std; uniform: high

  static ParameterInit normal(double std, double mean = 0.0) { return {Kind::kNormal, mean, std}; }
  static ParameterInit uniform(double low, double high) { return {Kind::kUniform, low, high}; }
  static ParameterInit constant(double value) { return {Kind::kConstant, value, 0}; }
};

// Picks a parameter's init from its name and logical shape.
using InitRule = std::function<ParameterInit(const LogicalParameter& parameter)>;

// Overwrites every trainable parameter of `root` (logicalParameters(root):
// each one's own slice) with the values `rule` picks, drawn as above. Not
// collective; every process calls it for its own slices. Throws what `rule`
// and the slice functions throw.
void initializeParameters(torch::nn::Module& root, uint64_t seed, const InitRule& rule);

}  // namespace tessera::models
