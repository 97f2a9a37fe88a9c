// FP8 scaling recipes: how the scale of a scaled cast (fp8.h: codes =
// encode(x * scale), value = decode(codes) / scale) is chosen. One interface,
// Fp8Scaler, for the four recipes (REFERENCE.md §8, §10):
//
//   kDelayed    Transformer Engine's DelayedScaling / FP8-LM: one per-tensor
//               scale computed from a window of the amaxes of PREVIOUS casts
//               (the window's max, or its most recent entry), so this cast's
//               scale is known before x is read. The window and the scale are
//               training state (state() / loadState()).
//   kTensorwise torchao "tensorwise" (current scaling): one scale from this
//               tensor's own amax.
//   kRowwise    torchao "rowwise": one scale per row -- the rows of x
//               flattened to 2-D (rows = every leading dim, columns = the last).
//   kBlockwise  DeepSeek-V3 (arXiv 2412.19437): 1x128 tiles along the last dim
//               for activations and gradients, 128x128 blocks for weights
//               (2-D flattened); edge tiles are partial (their amax is over
//               the elements that exist).
//
// Scale from an amax a (every recipe; fp8_max = 448 for E4M3, 57344 for E5M2):
//   power_of_two: 2^(floor(log2(fp8_max / a)) - margin)
//   otherwise:    fp8_max / a / 2^margin
// capped at 2^127 (a tiny amax would give an infinite scale). Where a is 0 or
// not finite: kDelayed keeps its previous scale (TE: a window with a NaN/inf
// keeps the scale until the value leaves the window), the current recipes use
// scale 1 (a zero tile encodes to zeros whatever the scale; a NaN stays NaN,
// an inf saturates in E4M3). Casts SATURATE (Overflow::kSaturate): a value
// beyond the window's amax clamps to +-fp8_max instead of becoming NaN.
//
// Operand roles pick the format (the hybrid FP8 format of FP8-LM / TE:
// E4M3 forward, E5M2 for gradients) and, for kBlockwise, the tile.
//
// Sharding (tensor parallelism; the caller passes `reduceMax`): a WEIGHT's
// amax is taken over the logical tensor -- the per-tensor amax (kDelayed,
// kTensorwise) all-reduce-maxed over the layer's shard group, and for
// kRowwise on a row-parallel weight (rows split across ranks) the per-row
// amaxes -- so tp = p gives the same weight scales as tp = 1. kBlockwise
// weights use the blocks of the local shard (the logical blocks when the
// shard's boundaries are multiples of 128). Activations and gradients use
// their local tensor, never a collective: their scales may differ between tp
// ranks and from tp = 1 (a row-parallel layer's input slice, a column-parallel
// layer's output-gradient slice).
//
// Not here: the FP8 GEMM (core/models/precision.h) and FP8 communication
// (comm/), which choose their own shared scales.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/core/numerics/fp8.h"

namespace tessera::numerics {

enum class ScalingRecipe { kDelayed, kTensorwise, kRowwise, kBlockwise };

const char* toString(ScalingRecipe recipe);  // "delayed", "tensorwise", "rowwise", "blockwise"
// Throws ConfigError naming `field` and the valid values.
ScalingRecipe parseScalingRecipe(const std::string& value, const std::string& field);

// A recipe and its knobs; the defaults are TE's DelayedScaling except the
// history length (TE: 1024; 16 suits short runs and keeps the state small).
struct Fp8RecipeConfig {
  ScalingRecipe recipe = ScalingRecipe::kDelayed;
  int64_t amax_history = 16;  // kDelayed: the window's length, >= 1
  bool amax_from_max = true;  // kDelayed: the scale from the window's max (true) or its most recent amax
  int margin = 0;             // every recipe: the scale divided by 2^margin (headroom), >= 0
  bool power_of_two = true;   // every recipe: scales rounded down to a power of two (exact rescaling)

  // Throws ConfigError naming prefix + field ("precision.margin").
  void validate(const std::string& prefix) const;
};

// The operand a scaler casts, which fixes its format and block shape.
enum class Fp8Role {
  kInput,       // activations: E4M3, 1x128 tiles
  kWeight,      // E4M3, 128x128 blocks
  kGradOutput,  // output gradients: E5M2, 1x128 tiles
};
const char* toString(Fp8Role role);  // "input", "weight", "grad_output"
Fp8Format formatOf(Fp8Role role);

constexpr int64_t kFp8BlockSize = 128;  // kBlockwise's tile edge

// The scale for amax `amax` (the formula above); 1 where amax is 0 or not
// finite. Pure; what every recipe applies to each of its amaxes.
float scaleFromAmax(float amax, Fp8Format format, int margin, bool power_of_two);

// A scaled cast's result: value = decode(codes) / scale.
struct Fp8Tensor {
  at::Tensor codes;  // uint8, x's shape
  at::Tensor scale;  // float32, broadcastable to codes (0-dim, (..., 1) rows, or expanded tiles)
  Fp8Format format = Fp8Format::kE4M3;
  // float32 of codes' shape (fp8.h's decodeFp8).
  at::Tensor dequantize() const;
};

// Applied to the recipe's amax tensor before the scales are derived: an
// all-reduce-max over a shard group (collective), or empty for local amaxes.
using AmaxReduce = std::function<at::Tensor(const at::Tensor&)>;

// The scaling state of one operand of one layer (one role). Not thread-safe:
// one cast at a time (a layer's input and weight casts run in its forward, its
// gradient cast in its backward, never concurrently for one scaler).
class Fp8Scaler {
 public:
  // Throws what config.validate("") throws.
  Fp8Scaler(Fp8RecipeConfig config, Fp8Role role);

  // The saturating scaled cast of x (float32 or bfloat16; other float dtypes
  // are cast to float32 first) under the recipe. kDelayed uses the current
  // scale, then records x's amax and updates the scale for the next cast.
  // `reduceMax`, when given, is called exactly once per cast with the recipe's
  // amax tensor (0-dim per tensor, (rows, 1) per row, the tile grid) and must
  // return one of the same shape: collective when it is, so every rank of the
  // group casts the same operand in the same order. A non-CPU x is cast on
  // the CPU (the codec is CPU code) and its codes and scale come back to x's
  // device.
  Fp8Tensor quantize(const at::Tensor& x, const AmaxReduce& reduceMax = {});

  const Fp8RecipeConfig& config() const { return config_; }
  Fp8Role role() const { return role_; }
  Fp8Format format() const { return formatOf(role_); }
  // The scale tensor of the latest cast (undefined before the first).
  const at::Tensor& lastScale() const { return last_scale_; }

  // kDelayed's training state as a flat float32 tensor:
  // [scale, amax_0, ..., amax_{H-1}] with amax_0 the most recent (zeros where
  // no cast has run yet). stateSize() = 1 + amax_history for kDelayed, 0 for the
  // current recipes (they hold no state). loadState throws InvalidArgument
  // naming both sizes when state has another number of elements.
  int64_t stateSize() const;
  at::Tensor state() const;
  void loadState(const at::Tensor& state);

 private:
  at::Tensor recipeAmax(const at::Tensor& x) const;
  at::Tensor currentScales(const at::Tensor& amax) const;
  at::Tensor expandScale(const at::Tensor& grid, const at::Tensor& x) const;
  void recordAmax(float amax);

  Fp8RecipeConfig config_;
  Fp8Role role_;
  float scale_ = 1.0f;               // kDelayed: the scale of the next cast (TE starts at 1)
  std::vector<float> history_;       // kDelayed: newest first
  at::Tensor last_scale_;
};

}  // namespace tessera::numerics
