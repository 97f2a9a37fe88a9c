// Tests of the layout-independent randomness (random.h, init.h): Philox
// against Random123's known answers and ATen's own Philox engine, init slices
// and dropout masks against the same slice of the whole tensor, against
// values recomputed from the Philox words, and their statistics.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x
#include <ATen/core/PhiloxRNGEngine.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/init.h"
#include "tessera/core/models/random.h"

namespace tessera::models {
namespace {

using Shape = std::vector<int64_t>;

// ---- Philox ------------------------------------------------------------------------

TEST(PhiloxTest, KnownAnswers) {
  // Random123 kat_vectors, philox4x32 with 10 rounds: counter, key -> output.
  using Block = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32({0, 0, 0, 0}, {0, 0}), (Block{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (Block{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (Block{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(PhiloxTest, MatchesAtenPhiloxEngine) {
  // ATen's engine: key = seed, counter = (offset, subsequence) as 64-bit halves.
  for (uint64_t seed : {uint64_t{1}, uint64_t{0x0123456789abcdefULL}}) {
    for (uint64_t subsequence : {uint64_t{0}, uint64_t{7} << 32 | 3}) {
      for (uint64_t offset : {uint64_t{0}, uint64_t{5}, uint64_t{1} << 33}) {
        at::philox_engine engine(seed, subsequence, offset);
        std::array<uint32_t, 4> want{};
        for (auto& w : want) w = engine();
        const auto got = philox4x32({static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                     static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)},
                                    {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
        EXPECT_EQ(got, want) << seed << " " << subsequence << " " << offset;
      }
    }
  }
}

TEST(PhiloxTest, StreamKeysSeparateSeedsAndLabels) {
  EXPECT_EQ(streamKey(1, "init:a"), streamKey(1, "init:a"));
  EXPECT_NE(streamKey(1, "init:a"), streamKey(2, "init:a"));
  EXPECT_NE(streamKey(1, "init:a"), streamKey(1, "init:b"));
  EXPECT_NE(streamKey(1, "dropout:1"), streamKey(1, "dropout:2"));
}

// ---- Slices ------------------------------------------------------------------------

// The slices of a (6, 10) and a (3, 5, 7) tensor the tests cut, with the same
// cut made on a whole tensor by narrow() -- the independent path.
struct Cut {
  std::string what;
  TensorSlice slice;
  std::function<at::Tensor(const at::Tensor&)> fromWhole;
};

std::vector<Cut> cutsOf2d() {
  return {
      {"dim 0", TensorSlice::box({2, 0}, {3, 10}), [](const at::Tensor& t) { return t.narrow(0, 2, 3); }},
      {"dim 1", TensorSlice::box({0, 4}, {6, 5}), [](const at::Tensor& t) { return t.narrow(1, 4, 5); }},
      {"flat range of a dim-1 box", TensorSlice::box({0, 4}, {6, 5}).narrowFlat(7, 13),
       [](const at::Tensor& t) { return t.narrow(1, 4, 5).reshape({-1}).narrow(0, 7, 13); }},
      {"flat range of the whole", TensorSlice::flatRange({6, 10}, 13, 29),
       [](const at::Tensor& t) { return t.reshape({-1}).narrow(0, 13, 29); }},
  };
}

Cut cutOf3d() {
  return {"3-D box", TensorSlice::box({1, 1, 2}, {2, 3, 4}),
          [](const at::Tensor& t) { return t.narrow(0, 1, 2).narrow(1, 1, 3).narrow(2, 2, 4); }};
}

TEST(SliceIndexerTest, YieldsGlobalRowMajorIndices) {
  const Shape shape = {3, 5, 7};
  const auto index = at::arange(3 * 5 * 7, at::kLong).view({3, 5, 7});
  for (const Cut& cut : {cutOf3d(), Cut{"flat", TensorSlice::box({1, 1, 2}, {2, 3, 4}).narrowFlat(5, 11),
                                        [](const at::Tensor& t) {
                                          return t.narrow(0, 1, 2).narrow(1, 1, 3).narrow(2, 2, 4).reshape({-1}).narrow(0, 5, 11);
                                        }}}) {
    const SliceIndexer indexer(shape, cut.slice);
    std::vector<int64_t> got(static_cast<size_t>(indexer.numel()), -1);
    indexer.forRange(0, indexer.numel(), [&](int64_t local, int64_t global) { got[static_cast<size_t>(local)] = global; });
    const auto want = cut.fromWhole(index).reshape({-1}).contiguous();
    EXPECT_TRUE(at::equal(at::tensor(got), want)) << cut.what;
    // A range that starts mid-box agrees with the walk from the start.
    indexer.forRange(3, 9, [&](int64_t local, int64_t global) { EXPECT_EQ(global, got[static_cast<size_t>(local)]); });
  }
  EXPECT_THROW(SliceIndexer(shape, TensorSlice::box({2, 0, 0}, {2, 5, 7})), InvalidArgument);
}

// ---- Initialization ------------------------------------------------------------------

TEST(InitTest, SlicesEqualTheSameSliceOfTheWholeInit) {
  const Shape shape = {6, 10};
  const auto whole = initNormalSlice(5, "blocks.0.attn.qkv.weight", shape, TensorSlice::whole(shape), 0.02);
  ASSERT_EQ(whole.sizes(), (std::vector<int64_t>{6, 10}));
  const auto uniform = initUniformSlice(5, "layers.0.weight", shape, TensorSlice::whole(shape), -0.3, 0.3);
  for (const Cut& cut : cutsOf2d()) {
    const auto part = initNormalSlice(5, "blocks.0.attn.qkv.weight", shape, cut.slice, 0.02);
    EXPECT_TRUE(at::equal(part, cut.fromWhole(whole))) << cut.what;
    const auto upart = initUniformSlice(5, "layers.0.weight", shape, cut.slice, -0.3, 0.3);
    EXPECT_TRUE(at::equal(upart, cut.fromWhole(uniform))) << cut.what;
  }
  const Shape shape3 = {3, 5, 7};
  const Cut cut = cutOf3d();
  EXPECT_TRUE(at::equal(initNormalSlice(5, "w", shape3, cut.slice, 1.0),
                        cut.fromWhole(initNormalSlice(5, "w", shape3, TensorSlice::whole(shape3), 1.0))));
}

TEST(InitTest, ValuesAreBoxMullerOverThePhiloxWords) {
  // Recompute a few elements from the documented construction.
  const Shape shape = {4, 9};
  const auto got = initNormalSlice(11, "wte.weight", shape, TensorSlice::whole(shape), 0.5, 0.25).reshape({-1});
  const auto ugot = initUniformSlice(11, "wte.weight", shape, TensorSlice::whole(shape), -2.0, 3.0).reshape({-1});
  const uint64_t key = streamKey(11, "init:wte.weight");
  for (int64_t g : {0, 1, 2, 17, 35}) {
    const auto w = philox4x32({static_cast<uint32_t>(g / 2), 0, 0, 0},
                              {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)});
    const double a = static_cast<double>(((uint64_t{w[0]} << 32) | w[1]) >> 11) / 9007199254740992.0;
    const double b = static_cast<double>(((uint64_t{w[2]} << 32) | w[3]) >> 11) / 9007199254740992.0;
    const double r = std::sqrt(-2.0 * std::log(1.0 - a));
    const double z = g % 2 == 0 ? r * std::cos(2 * M_PI * b) : r * std::sin(2 * M_PI * b);
    EXPECT_FLOAT_EQ(got[g].item<float>(), static_cast<float>(0.25 + 0.5 * z)) << g;
    EXPECT_FLOAT_EQ(ugot[g].item<float>(), static_cast<float>(-2.0 + 5.0 * (g % 2 == 0 ? a : b))) << g;
  }
}

TEST(InitTest, NamesSeedsAndShapes) {
  const Shape shape = {8, 8};
  const auto whole = TensorSlice::whole(shape);
  const auto a = initNormalSlice(1, "blocks.0.mlp.fc.weight", shape, whole, 1.0);
  EXPECT_TRUE(at::equal(a, initNormalSlice(1, "blocks.0.mlp.fc.weight", shape, whole, 1.0)));  // bit-identical
  const auto other_name = initNormalSlice(1, "blocks.1.mlp.fc.weight", shape, whole, 1.0);
  const auto other_seed = initNormalSlice(2, "blocks.0.mlp.fc.weight", shape, whole, 1.0);
  // Independent draws agree nowhere (equal floats by chance: ~64 * 2^-24).
  EXPECT_EQ(at::eq(a, other_name).sum().item<int64_t>(), 0);
  EXPECT_EQ(at::eq(a, other_seed).sum().item<int64_t>(), 0);
  // The shape enters through the row-major index: growing dim 0 (a padded
  // vocabulary) keeps the existing rows.
  EXPECT_TRUE(at::equal(initNormalSlice(1, "blocks.0.mlp.fc.weight", {10, 8}, TensorSlice::whole({10, 8}), 1.0)
                            .narrow(0, 0, 8),
                        a));
  EXPECT_THROW(initNormalSlice(1, "w", shape, TensorSlice::box({0, 4}, {8, 5}), 1.0), InvalidArgument);
  EXPECT_THROW(initNormalSlice(1, "w", shape, whole, -1.0), InvalidArgument);
  EXPECT_THROW(initUniformSlice(1, "w", shape, whole, 1.0, -1.0), InvalidArgument);
}

TEST(InitTest, StatisticsOfALargeDraw) {
  const Shape shape = {1024, 1024};
  const auto z = initNormalSlice(3, "big", shape, TensorSlice::whole(shape), 2.0, 1.0).to(at::kDouble);
  // n = 2^20: the mean's standard error is 2 / 1024, the std's about 2 / 1448.
  EXPECT_NEAR(z.mean().item<double>(), 1.0, 0.01);
  EXPECT_NEAR(z.std().item<double>(), 2.0, 0.01);
  const auto standard = (z - 1.0) / 2.0;
  EXPECT_NEAR((standard.abs() < 1.0).to(at::kDouble).mean().item<double>(), 0.682689, 0.003);
  // The two elements of a Box-Muller pair (cos, sin of one block) are uncorrelated.
  const auto pairs = standard.view({-1, 2});
  EXPECT_NEAR((pairs.select(1, 0) * pairs.select(1, 1)).mean().item<double>(), 0.0, 0.01);

  const auto u = initUniformSlice(3, "big", shape, TensorSlice::whole(shape), -1.0, 3.0).to(at::kDouble);
  EXPECT_GE(u.min().item<double>(), -1.0);
  EXPECT_LT(u.max().item<double>(), 3.0);
  EXPECT_NEAR(u.mean().item<double>(), 1.0, 0.01);
  EXPECT_NEAR(u.var().item<double>(), 16.0 / 12.0, 0.01);
}

// ---- Dropout -------------------------------------------------------------------------

DropoutKey key(int64_t step = 3, int64_t micro = 1, uint64_t site = 4, uint64_t seed = 9) {
  DropoutKey k;
  k.seed = seed;
  k.site = site;
  k.setStep(step, micro);
  return k;
}

TEST(DropoutTest, MaskOfASliceIsTheSliceOfTheWholeMask) {
  const Shape shape = {6, 10};
  const auto whole = dropoutMask(key(), 0.4, shape, TensorSlice::whole(shape));
  ASSERT_EQ(whole.sizes(), (std::vector<int64_t>{6, 10}));
  for (const Cut& cut : cutsOf2d()) {
    EXPECT_TRUE(at::equal(dropoutMask(key(), 0.4, shape, cut.slice), cut.fromWhole(whole))) << cut.what;
  }
  const Shape shape3 = {3, 5, 7};
  const Cut cut = cutOf3d();
  EXPECT_TRUE(at::equal(dropoutMask(key(), 0.4, shape3, cut.slice),
                        cut.fromWhole(dropoutMask(key(), 0.4, shape3, TensorSlice::whole(shape3)))));
}

TEST(DropoutTest, MaskIsThePhiloxWordAgainstTheThreshold) {
  const Shape shape = {5, 7};
  const double p = 0.3;
  const auto mask = dropoutMask(key(), p, shape, TensorSlice::whole(shape), at::kDouble).reshape({-1});
  const uint64_t k = streamKey(9, "dropout:4");
  const auto threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  for (int64_t g = 0; g < 35; ++g) {
    const auto w = philox4x32({static_cast<uint32_t>(g / 4), 0, 3, 1},
                              {static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)});
    EXPECT_EQ(mask[g].item<double>(), w[g % 4] >= threshold ? 1.0 / (1.0 - p) : 0.0) << g;
  }
}

TEST(DropoutTest, KeysSelectMasks) {
  const Shape shape = {64, 96};
  const auto whole = TensorSlice::whole(shape);
  const auto base = dropoutMask(key(), 0.5, shape, whole);
  EXPECT_TRUE(at::equal(base, dropoutMask(key(), 0.5, shape, whole)));
  // Independent masks agree on about half the elements at p = 0.5.
  for (const DropoutKey& other : {key(4), key(3, 2), key(3, 1, 5), key(3, 1, 4, 10)}) {
    const double agree = at::eq(base, dropoutMask(other, 0.5, shape, whole)).to(at::kDouble).mean().item<double>();
    EXPECT_NEAR(agree, 0.5, 0.05) << other.step << " " << other.micro_batch << " " << other.site << " " << other.seed;
  }
}

TEST(DropoutTest, KeepFractionAndValues) {
  const Shape shape = {1024, 1024};
  for (double p : {0.1, 0.5, 0.9}) {
    const auto mask = dropoutMask(key(), p, shape, TensorSlice::whole(shape));
    const auto kept = mask.ne(0);
    EXPECT_NEAR(kept.to(at::kDouble).mean().item<double>(), 1 - p, 0.003) << p;
    EXPECT_TRUE(at::all(mask.masked_select(kept) == static_cast<float>(1.0 / (1.0 - p))).item<bool>()) << p;
  }
}

TEST(DropoutTest, ForwardAndGradientUseTheSameMask) {
  const double p = 0.35;
  const auto x = at::randn({4, 6, 5}, at::kDouble).requires_grad_(true);
  const auto w = at::randn({4, 6, 5}, at::kDouble);
  const auto y = dropout(x, p, /*training=*/true, key());
  const auto mask = dropoutMask(key(), p, {4, 6, 5}, TensorSlice::whole({4, 6, 5}), at::kDouble);
  const auto keep = mask.ne(0).to(at::kDouble);
  EXPECT_TRUE(at::allclose(y, x * keep / (1.0 - p), 0, 1e-15));
  (y * w).sum().backward();
  EXPECT_TRUE(at::allclose(x.grad(), w * keep / (1.0 - p), 0, 1e-15));
  // Central differences of L(x) = sum(w * dropout(x)) at a few elements.
  at::NoGradGuard no_grad;
  const auto flat = x.detach().reshape({-1});
  for (int64_t i : {0, 7, 41, 119}) {
    auto plus = flat.clone(), minus = flat.clone();
    plus[i] += 1e-6;
    minus[i] -= 1e-6;
    const double lp = (w * dropout(plus.view({4, 6, 5}), p, true, key())).sum().item<double>();
    const double lm = (w * dropout(minus.view({4, 6, 5}), p, true, key())).sum().item<double>();
    EXPECT_NEAR((lp - lm) / 2e-6, x.grad().reshape({-1})[i].item<double>(), 1e-6) << i;
  }
}

TEST(DropoutTest, IdentityOutOfTrainingAndBadInput) {
  const auto x = at::randn({3, 4});
  EXPECT_TRUE(dropout(x, 0.5, /*training=*/false, key()).is_same(x));
  EXPECT_TRUE(dropout(x, 0.0, /*training=*/true, key()).is_same(x));
  // A flat-range piece of a bigger tensor.
  const Shape shape = {6, 10};
  const auto slice = TensorSlice::flatRange(shape, 10, 12);
  const auto local = at::ones({12});
  EXPECT_TRUE(at::equal(dropout(local, 0.5, true, key(), shape, slice), dropoutMask(key(), 0.5, shape, slice)));
  EXPECT_THROW(dropout(at::ones({3, 4}), 0.5, true, key(), shape, slice), InvalidArgument);
  EXPECT_THROW(dropout(x, 1.0, true, key()), InvalidArgument);
  EXPECT_THROW(dropoutMask(key(), 0.5, {3, 4}, TensorSlice::whole({3, 4}), at::kLong), InvalidArgument);
  DropoutKey k;
  EXPECT_THROW(k.setStep(-1, 0), InvalidArgument);
  EXPECT_THROW(k.setStep(0, int64_t{1} << 32), InvalidArgument);
}

}  // namespace
}  // namespace tessera::models
