// The FP8 scaling recipes (fp8_scaling.h) against scales derived by hand on
// constructed data: per tensor, per row, per 1x128 tile and 128x128 block
// (partial edge tiles), and delayed scaling's window, margin, power-of-two
// rounding, the kept scale on amax 0 / NaN, and its state round trip.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/numerics/fp8_scaling.h"

namespace tessera::numerics {
namespace {

// The recipe's formula written out: 2^(floor(log2(fmax / amax)) - margin), or
// fmax / amax / 2^margin in fp32; 1 for amax 0.
float expectedScale(float amax, float fmax, int margin = 0, bool pow2 = true) {
  if (amax == 0.0f) return 1.0f;
  if (pow2) return std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(double(fmax) / amax))) - margin);
  return fmax / amax / std::ldexp(1.0f, margin);
}

Fp8RecipeConfig config(ScalingRecipe recipe, int64_t history = 16, int margin = 0, bool pow2 = true,
                       bool fromMax = true) {
  Fp8RecipeConfig c;
  c.recipe = recipe;
  c.amax_history = history;
  c.margin = margin;
  c.power_of_two = pow2;
  c.amax_from_max = fromMax;
  return c;
}

// Every code equals the scalar codec's saturating encode of x * scale, with
// scale the expected per-element scale.
void expectCodes(const Fp8Tensor& q, const at::Tensor& x, const at::Tensor& expectedScales, Fp8Format format) {
  const at::Tensor xs = x.contiguous().reshape({-1});
  const at::Tensor ss = expectedScales.expand(x.sizes()).contiguous().reshape({-1});
  const at::Tensor cs = q.codes.contiguous().reshape({-1});
  for (int64_t i = 0; i < xs.numel(); ++i) {
    const float v = xs[i].item<float>() * ss[i].item<float>();
    ASSERT_EQ(cs[i].item<uint8_t>(), encodeFp8(v, format, Overflow::kSaturate)) << "element " << i;
  }
}

TEST(ScalingRecipeConfig, ParseAndValidateNameTheField) {
  for (const char* name : {"delayed", "tensorwise", "rowwise", "blockwise"}) {
    EXPECT_STREQ(toString(parseScalingRecipe(name, "precision.fp8_recipe")), name);
  }
  try {
    parseScalingRecipe("rowise", "precision.fp8_recipe");
    FAIL() << "an unknown recipe was accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "precision.fp8_recipe");
    for (const char* name : {"delayed", "tensorwise", "rowwise", "blockwise"}) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  }
  Fp8RecipeConfig bad;
  bad.amax_history = 0;
  try {
    bad.validate("precision.");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "precision.amax_history");
  }
  bad = Fp8RecipeConfig{};
  bad.margin = -1;
  try {
    bad.validate("precision.");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "precision.margin");
  }
}

TEST(ScaleFromAmax, HandDerivedValues) {
  // 448 / 3 = 149.3: floor(log2) = 7.
  EXPECT_EQ(scaleFromAmax(3.0f, Fp8Format::kE4M3, 0, true), 128.0f);
  EXPECT_EQ(scaleFromAmax(3.0f, Fp8Format::kE4M3, 2, true), 32.0f);
  // 448 / 3.5 = 128 exactly: amax lands on 448, no saturation needed.
  EXPECT_EQ(scaleFromAmax(3.5f, Fp8Format::kE4M3, 0, true), 128.0f);
  EXPECT_EQ(scaleFromAmax(448.0f, Fp8Format::kE4M3, 0, true), 1.0f);
  EXPECT_EQ(scaleFromAmax(449.0f, Fp8Format::kE4M3, 0, true), 0.5f);
  EXPECT_EQ(scaleFromAmax(1.0f, Fp8Format::kE5M2, 0, true), 32768.0f);  // 57344 = 1.75 * 2^15
  EXPECT_EQ(scaleFromAmax(3.0f, Fp8Format::kE4M3, 1, false), 448.0f / 3.0f / 2.0f);
  EXPECT_EQ(scaleFromAmax(0.0f, Fp8Format::kE4M3, 0, true), 1.0f);
  EXPECT_EQ(scaleFromAmax(NAN, Fp8Format::kE4M3, 0, true), 1.0f);
  EXPECT_EQ(scaleFromAmax(INFINITY, Fp8Format::kE5M2, 0, false), 1.0f);
  EXPECT_EQ(scaleFromAmax(1e-44f, Fp8Format::kE4M3, 0, true), std::ldexp(1.0f, 127));  // capped, finite
}

TEST(Fp8Scaler, TensorwiseUsesTheCurrentAmax) {
  at::manual_seed(1);
  const at::Tensor x = at::randn({4, 9}) * 5;
  Fp8Scaler scaler(config(ScalingRecipe::kTensorwise), Fp8Role::kInput);
  const Fp8Tensor q = scaler.quantize(x);
  const float scale = expectedScale(x.abs().max().item<float>(), 448);
  ASSERT_EQ(q.scale.dim(), 0);
  EXPECT_EQ(q.scale.item<float>(), scale);
  EXPECT_EQ(q.format, Fp8Format::kE4M3);
  expectCodes(q, x, at::full({}, scale), Fp8Format::kE4M3);
  EXPECT_EQ(scaler.stateSize(), 0);
  // The gradient role: E5M2 and its own maximum.
  Fp8Scaler grad(config(ScalingRecipe::kTensorwise), Fp8Role::kGradOutput);
  const at::Tensor g = x * 1e-4;
  const Fp8Tensor qg = grad.quantize(g);
  EXPECT_EQ(qg.format, Fp8Format::kE5M2);
  EXPECT_EQ(qg.scale.item<float>(), expectedScale(g.abs().max().item<float>(), 57344));
}

TEST(Fp8Scaler, RowwiseOneScalePerRowZeroAndNanRowsFallBack) {
  at::manual_seed(2);
  at::Tensor x = at::randn({2, 3, 5});
  x[0][1] *= 100;
  x[1][0].zero_();
  x[1][2][3] = NAN;
  Fp8Scaler scaler(config(ScalingRecipe::kRowwise, 16, /*margin=*/1), Fp8Role::kInput);
  const Fp8Tensor q = scaler.quantize(x);
  ASSERT_EQ(q.scale.sizes(), (std::vector<int64_t>{2, 3, 1}));
  at::Tensor expected = at::empty({2, 3, 1});
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      float amax = 0;
      bool nan = false;
      for (int64_t k = 0; k < 5; ++k) {
        const float v = x[i][j][k].item<float>();
        nan = nan || std::isnan(v);
        amax = std::max(amax, std::abs(v));
      }
      expected[i][j][0] = nan ? 1.0f : expectedScale(amax, 448, 1);
    }
  }
  EXPECT_TRUE(torch::equal(q.scale, expected)) << q.scale << expected;
  EXPECT_EQ(expected[1][0][0].item<float>(), 1.0f);  // the zero row
  expectCodes(q, x, expected, Fp8Format::kE4M3);  // the NaN element encodes to NaN
}

// Plants one known maximum in every tile of small noise; checks the expanded
// scale element by element against the tile it belongs to.
void checkBlocks(Fp8Role role, int64_t rows, int64_t cols, int64_t tileRows) {
  at::manual_seed(3);
  at::Tensor x = at::rand({rows, cols}) * 0.25 - 0.125;
  const int64_t nr = (rows + tileRows - 1) / tileRows, nc = (cols + 127) / 128;
  std::vector<float> amax(static_cast<size_t>(nr * nc));
  for (int64_t a = 0; a < nr; ++a) {
    for (int64_t b = 0; b < nc; ++b) {
      const float peak = std::ldexp(1.3f, static_cast<int>((a * nc + b) % 9) - 3);  // distinct magnitudes
      const int64_t r = std::min(rows - 1, a * tileRows + (tileRows - 1) / 2);
      const int64_t c = std::min(cols - 1, b * 128 + 100);  // inside the (possibly partial) tile
      x[r][c] = (a + b) % 2 ? -peak : peak;
      amax[static_cast<size_t>(a * nc + b)] = peak;
    }
  }
  Fp8Scaler scaler(config(ScalingRecipe::kBlockwise), role);
  const Fp8Tensor q = scaler.quantize(x);
  const float fmax = fp8Max(formatOf(role));
  at::Tensor expected = at::empty({rows, cols});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      expected[r][c] = expectedScale(amax[static_cast<size_t>((r / tileRows) * nc + c / 128)], fmax);
    }
  }
  EXPECT_TRUE(torch::equal(q.scale.expand({rows, cols}), expected)) << toString(role);
  expectCodes(q, x, expected, formatOf(role));
}

TEST(Fp8Scaler, BlockwiseActivationTilesWithPartialEdge) { checkBlocks(Fp8Role::kInput, 3, 300, 1); }
TEST(Fp8Scaler, BlockwiseGradientTilesAreE5M2) { checkBlocks(Fp8Role::kGradOutput, 2, 129, 1); }
TEST(Fp8Scaler, BlockwiseWeightBlocksWithPartialEdges) { checkBlocks(Fp8Role::kWeight, 130, 300, 128); }

TEST(Fp8Scaler, BlockwiseKeepsLeadingDims) {
  const at::Tensor x = at::randn({2, 3, 130});
  Fp8Scaler scaler(config(ScalingRecipe::kBlockwise), Fp8Role::kInput);
  const Fp8Tensor q = scaler.quantize(x);
  Fp8Scaler flat(config(ScalingRecipe::kBlockwise), Fp8Role::kInput);
  const Fp8Tensor qf = flat.quantize(x.reshape({6, 130}));
  EXPECT_TRUE(torch::equal(q.scale.reshape({6, 130}), qf.scale));
  EXPECT_TRUE(torch::equal(q.codes.reshape({6, 130}), qf.codes));
}

// amaxes of the casts, in order, and the scale delayed scaling must use for
// each: from the window of the previous ones.
TEST(Fp8Scaler, DelayedWindowMarginAndPowerOfTwo) {
  const std::vector<float> amaxes = {40.0f, 3.0f, 0.7f, 5.0f, 0.2f, 0.9f};
  for (bool fromMax : {true, false}) {
    for (bool pow2 : {true, false}) {
      for (int margin : {0, 2}) {
        Fp8Scaler scaler(config(ScalingRecipe::kDelayed, /*history=*/3, margin, pow2, fromMax), Fp8Role::kWeight);
        std::vector<float> seen;
        for (float a : amaxes) {
          float expected = 1.0f;  // TE's initial scale
          if (!seen.empty()) {
            float window = seen.back();
            if (fromMax) {
              for (size_t i = seen.size() >= 3 ? seen.size() - 3 : 0; i < seen.size(); ++i) window = std::max(window, seen[i]);
            }
            expected = expectedScale(window, 448, margin, pow2);
          }
          const at::Tensor x = at::tensor({0.5f * a, -a, 0.25f * a});
          const Fp8Tensor q = scaler.quantize(x);
          ASSERT_EQ(q.scale.item<float>(), expected)
              << "cast " << seen.size() << " fromMax " << fromMax << " pow2 " << pow2 << " margin " << margin;
          expectCodes(q, x, at::full({}, expected), Fp8Format::kE4M3);
          seen.push_back(a);
        }
      }
    }
  }
}

TEST(Fp8Scaler, DelayedKeepsTheScaleOnZeroOrNonFiniteAmax) {
  // Most recent amax: a zero or NaN cast leaves the scale as it was.
  Fp8Scaler recent(config(ScalingRecipe::kDelayed, 4, 0, true, /*fromMax=*/false), Fp8Role::kInput);
  recent.quantize(at::tensor({3.0f}));
  const float s = expectedScale(3.0f, 448);
  EXPECT_EQ(recent.quantize(at::zeros({5})).scale.item<float>(), s);
  EXPECT_EQ(recent.quantize(at::tensor({NAN, 1.0f})).scale.item<float>(), s);  // the zero cast kept it
  EXPECT_EQ(recent.quantize(at::tensor({INFINITY})).scale.item<float>(), s);   // the NaN cast kept it
  EXPECT_EQ(recent.quantize(at::tensor({1.0f})).scale.item<float>(), s);       // the inf cast kept it
  EXPECT_EQ(recent.quantize(at::tensor({1.0f})).scale.item<float>(), expectedScale(1.0f, 448));

  // Window max: a NaN keeps the scale until it leaves the window (2 casts).
  Fp8Scaler window(config(ScalingRecipe::kDelayed, 2), Fp8Role::kInput);
  window.quantize(at::tensor({3.0f}));
  window.quantize(at::tensor({NAN}));
  EXPECT_EQ(window.quantize(at::tensor({1.0f})).scale.item<float>(), s);  // window {NaN, 3}
  EXPECT_EQ(window.quantize(at::tensor({1.0f})).scale.item<float>(), s);  // window {1, NaN}
  EXPECT_EQ(window.quantize(at::tensor({1.0f})).scale.item<float>(), expectedScale(1.0f, 448));  // {1, 1}
}

TEST(Fp8Scaler, CastsSaturate) {
  Fp8Scaler scaler(config(ScalingRecipe::kDelayed), Fp8Role::kInput);
  const Fp8Tensor q = scaler.quantize(at::tensor({1000.0f, -1e9f, 2.0f}));  // first cast: scale 1
  EXPECT_EQ(q.dequantize()[0].item<float>(), 448.0f);
  EXPECT_EQ(q.dequantize()[1].item<float>(), -448.0f);
  EXPECT_EQ(q.dequantize()[2].item<float>(), 2.0f);
}

TEST(Fp8Scaler, ReduceMaxSeesTheRecipeAmaxesOnce) {
  const at::Tensor x = at::tensor({1.0f, -2.0f, 0.5f, 0.25f}).reshape({2, 2});
  int calls = 0;
  Fp8Scaler rows(config(ScalingRecipe::kRowwise), Fp8Role::kWeight);
  const Fp8Tensor q = rows.quantize(x, [&](const at::Tensor& amax) {
    ++calls;
    EXPECT_EQ(amax.sizes(), (std::vector<int64_t>{2, 1}));
    return amax * 4;  // what another rank's larger rows would do
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(q.scale[0][0].item<float>(), expectedScale(8.0f, 448));
  EXPECT_EQ(q.scale[1][0].item<float>(), expectedScale(2.0f, 448));
}

TEST(Fp8Scaler, DelayedStateRoundTrip) {
  at::manual_seed(4);
  Fp8Scaler a(config(ScalingRecipe::kDelayed, 5), Fp8Role::kGradOutput);
  for (int i = 0; i < 3; ++i) a.quantize(at::randn({7}) * (i + 1));
  const at::Tensor state = a.state();
  ASSERT_EQ(state.numel(), 6);
  Fp8Scaler b(config(ScalingRecipe::kDelayed, 5), Fp8Role::kGradOutput);
  b.loadState(state);
  EXPECT_TRUE(torch::equal(b.state(), state));
  for (int i = 0; i < 3; ++i) {
    const at::Tensor x = at::randn({7}) * 0.1 * (i + 1);
    const Fp8Tensor qa = a.quantize(x), qb = b.quantize(x);
    EXPECT_TRUE(torch::equal(qa.codes, qb.codes));
    EXPECT_TRUE(torch::equal(qa.scale, qb.scale));
  }
  try {
    b.loadState(at::zeros({4}));
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("got 4"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("has 6"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tessera::numerics
