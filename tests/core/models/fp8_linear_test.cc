// The FP8 and bf16 precisions of Linear (precision.h), single process:
// forward and backward (x, W and b gradients) equal, exactly, an fp32
// reference written here that applies the same quantize -> dequantize at the
// same points (E4M3 x and W, E5M2 dY) with scales derived from the recipe's
// formula, for every recipe over several steps (delayed: the window); the
// deferred weight gradient equals the immediate one; bf16 against an fp64
// GEMM of the bf16 operands; setPrecision and the FP8 state round trip.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/precision.h"
#include "tessera/core/models/weight_grad_store.h"
#include "tessera/core/numerics/fp8.h"
#include "tessera/core/numerics/fp8_scaling.h"
#include "tests/harness/fp8_reference.h"

namespace tessera::models {
namespace {

using numerics::Fp8Format;
using numerics::Fp8RecipeConfig;
using numerics::Fp8Role;
using numerics::ScalingRecipe;
using testing::amaxOf;
using testing::RefDelayed;
using testing::refFakeQuant;

// The reference layer: its own delayed state per role.
struct RefFp8Linear {
  Fp8RecipeConfig c;
  RefDelayed x, w, g;
  at::Tensor fq(const at::Tensor& t, Fp8Role role, RefDelayed& d) {
    const float fmax = role == Fp8Role::kGradOutput ? 57344.0f : 448.0f;
    const at::Tensor q = refFakeQuant(t, c, role, d.next(c, fmax));
    d.seen.push_back(amaxOf(t));
    return q;
  }
};

struct Grads {
  at::Tensor y, dx, dw, db;
};

// One forward + backward of the reference with output gradient G.
Grads referenceStep(RefFp8Linear& ref, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    const at::Tensor& G) {
  const at::Tensor xq = ref.fq(x, Fp8Role::kInput, ref.x).requires_grad_();
  const at::Tensor wq = ref.fq(w, Fp8Role::kWeight, ref.w).requires_grad_();
  const at::Tensor bl = b.detach().clone().requires_grad_();
  // The bias after the GEMM: its gradient is the unquantized dY.
  const at::Tensor gemm = at::linear(xq, wq);
  gemm.backward(ref.fq(G, Fp8Role::kGradOutput, ref.g));
  const at::Tensor y = gemm.detach() + bl;
  y.backward(G);
  return {y.detach(), xq.grad(), wq.grad(), bl.grad()};
}

Grads layerStep(Linear& layer, const at::Tensor& xData, const at::Tensor& G) {
  layer->zero_grad();
  const at::Tensor x = xData.clone().requires_grad_();
  const at::Tensor y = layer->forward(x);
  (y * G).sum().backward();  // dY = G exactly
  return {y.detach(), x.grad(), layer->weight.grad(), layer->bias.grad()};
}

void expectEqual(const Grads& a, const Grads& b, const std::string& what) {
  EXPECT_TRUE(torch::equal(a.y, b.y)) << what << ": y, max diff " << (a.y - b.y).abs().max().item<float>();
  EXPECT_TRUE(torch::equal(a.dx, b.dx)) << what << ": x.grad, max diff " << (a.dx - b.dx).abs().max().item<float>();
  EXPECT_TRUE(torch::equal(a.dw, b.dw)) << what << ": W.grad, max diff " << (a.dw - b.dw).abs().max().item<float>();
  EXPECT_TRUE(torch::equal(a.db, b.db)) << what << ": b.grad, max diff " << (a.db - b.db).abs().max().item<float>();
}

Fp8RecipeConfig recipe(ScalingRecipe r, bool pow2 = true, int margin = 0) {
  Fp8RecipeConfig c;
  c.recipe = r;
  c.amax_history = 2;  // short, so three steps slide the window
  c.power_of_two = pow2;
  c.margin = margin;
  return c;
}

LayerOptions fp8Options(const Fp8RecipeConfig& c) {
  LayerOptions o;
  o.precision = Precision::kFp8;
  o.fp8 = c;
  return o;
}

// (in 200, out 130): partial 1x128 tiles along both dims and a partial
// 128x128 weight block; three steps with changing magnitudes.
TEST(Fp8Linear, EqualsTheFakeQuantReferenceForEveryRecipe) {
  for (ScalingRecipe r : {ScalingRecipe::kDelayed, ScalingRecipe::kTensorwise, ScalingRecipe::kRowwise,
                          ScalingRecipe::kBlockwise}) {
    for (const auto& [pow2, margin] : std::vector<std::pair<bool, int>>{{true, 0}, {false, 1}}) {
      const Fp8RecipeConfig c = recipe(r, pow2, margin);
      const std::string what = std::string(numerics::toString(r)) + (pow2 ? " pow2" : " fp32 scale, margin 1");
      at::manual_seed(7);
      Linear layer(200, 130, true, fp8Options(c));
      RefFp8Linear ref{c};
      for (int step = 0; step < 3; ++step) {
        const at::Tensor x = at::randn({2, 3, 200}) * (step + 1);
        const at::Tensor G = at::randn({2, 3, 130}) * 1e-3 * (3 - step);
        const Grads expected = referenceStep(ref, x, layer->weight, layer->bias, G);
        expectEqual(layerStep(layer, x, G), expected, what + " step " + std::to_string(step));
      }
    }
  }
}

TEST(Fp8Linear, DeferredWeightGradientEqualsImmediate) {
  for (ScalingRecipe r : {ScalingRecipe::kDelayed, ScalingRecipe::kTensorwise, ScalingRecipe::kRowwise,
                          ScalingRecipe::kBlockwise}) {
    at::manual_seed(8);
    Linear immediate(200, 130, true, fp8Options(recipe(r)));
    LayerOptions deferredOptions = fp8Options(recipe(r));
    auto store = std::make_shared<QueuedWeightGradStore>();
    deferredOptions.weight_grad = WeightGrad::kDeferred;
    deferredOptions.weight_grad_store = store;
    Linear deferred(200, 130, true, deferredOptions);
    {
      at::NoGradGuard noGrad;
      deferred->weight.copy_(immediate->weight);
      deferred->bias.copy_(immediate->bias);
    }
    for (int step = 0; step < 2; ++step) {
      const at::Tensor x = at::randn({2, 3, 200}) * (step + 1);
      const at::Tensor G = at::randn({2, 3, 130}) * 1e-2;
      const Grads a = layerStep(immediate, x, G);
      deferred->zero_grad();
      const at::Tensor xd = x.clone().requires_grad_();
      (deferred->forward(xd) * G).sum().backward();
      ASSERT_EQ(store->pending(), 1u) << numerics::toString(r);
      EXPECT_TRUE(!deferred->weight.grad().defined() || deferred->weight.grad().abs().max().item<float>() == 0)
          << "the weight gradient arrived before W";
      store->drain(0);
      EXPECT_TRUE(torch::equal(xd.grad(), a.dx)) << numerics::toString(r);
      EXPECT_TRUE(torch::equal(deferred->weight.grad(), a.dw)) << numerics::toString(r);
      EXPECT_TRUE(torch::equal(deferred->bias.grad(), a.db)) << numerics::toString(r);
    }
  }
}

TEST(Bf16Linear, Bf16OperandsFp32ResultMasterWeightsUntouched) {
  at::manual_seed(9);
  LayerOptions options;
  options.precision = Precision::kBf16;
  Linear layer(64, 24, true, options);
  const at::Tensor master = layer->weight.detach().clone();
  const at::Tensor x = at::randn({5, 64}).requires_grad_();
  const at::Tensor y = layer->forward(x);
  ASSERT_EQ(y.scalar_type(), at::kFloat);
  const at::Tensor G = at::randn({5, 24});
  (y * G).sum().backward();
  // fp64 GEMMs of the bf16-rounded operands: the bf16 result is within one
  // bf16 rounding (2^-8 relative) of them, plus accumulation slack.
  auto bf = [](const at::Tensor& t) { return t.detach().to(at::kBFloat16).to(at::kDouble); };
  const at::Tensor yRef = bf(x).matmul(bf(layer->weight).t()) + bf(layer->bias);
  const at::Tensor scale = bf(x).abs().matmul(bf(layer->weight).abs().t()) + bf(layer->bias).abs();
  EXPECT_TRUE(((y.to(at::kDouble) - yRef).abs() <= scale * std::ldexp(1.0, -7)).all().item<bool>());
  EXPECT_FALSE(torch::equal(y, at::linear(x, layer->weight, layer->bias)));  // not fp32 arithmetic
  const at::Tensor dwRef = bf(G).t().matmul(bf(x));
  ASSERT_EQ(layer->weight.grad().scalar_type(), at::kFloat);
  EXPECT_TRUE(((layer->weight.grad().to(at::kDouble) - dwRef).abs() <=
               bf(G).abs().t().matmul(bf(x).abs()) * std::ldexp(1.0, -7))
                  .all()
                  .item<bool>());
  EXPECT_TRUE(torch::equal(layer->weight, master));
}

TEST(Fp8Linear, OnlyLinearLayersTakeFp8) {
  EXPECT_THROW(Embedding(10, 4, fp8Options(recipe(ScalingRecipe::kDelayed))), InvalidArgument);
  Fp8RecipeConfig bad = recipe(ScalingRecipe::kDelayed);
  bad.amax_history = 0;
  EXPECT_THROW(Linear(4, 4, true, fp8Options(bad)), ConfigError);
  EXPECT_THROW(applyLinear(at::randn({2, 4}), at::randn({3, 4}), at::Tensor(), fp8Options(recipe(ScalingRecipe::kTensorwise))),
               InvalidArgument);  // no scaling state
}

// A small model: two Linears, an fp32 router and an embedding.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    LayerOptions fp32;
    fp32.precision = Precision::kFp32;
    emb = register_module("emb", Embedding(11, 16));
    fc = register_module("fc", Linear(16, 32));
    proj = register_module("proj", Linear(32, 16));
    router = register_module("router", Linear(16, 4, false, fp32));
  }
  at::Tensor forward(const at::Tensor& ids) {
    const at::Tensor h = proj->forward(at::gelu(fc->forward(emb->forward(ids))));
    return router->forward(h).sum() + emb->attend(h).square().mean();
  }
  Embedding emb{nullptr};
  Linear fc{nullptr}, proj{nullptr}, router{nullptr};
};
TORCH_MODULE(Net);

TEST(SetPrecision, SwitchesLinearsButNotTheRouterAndStateRoundTrips) {
  at::manual_seed(10);
  Fp8RecipeConfig c = recipe(ScalingRecipe::kDelayed);
  c.amax_history = 3;
  Net a, b;
  {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  }
  EXPECT_EQ(fp8ScalingState(*a).numel(), 0);
  setPrecision(*a, Precision::kFp8, c);
  EXPECT_EQ(a->fc->options().precision, Precision::kFp8);
  EXPECT_EQ(a->proj->options().precision, Precision::kFp8);
  EXPECT_EQ(a->router->options().precision, Precision::kFp32);
  EXPECT_EQ(a->emb->options().precision, Precision::kDefault);
  EXPECT_EQ(fp8ScalingState(*a).numel(), 2 * 3 * (1 + 3));

  const at::Tensor ids = at::randint(0, 11, {3, 5});
  for (int step = 0; step < 2; ++step) a->forward((ids + step) % 11).backward();
  const at::Tensor state = fp8ScalingState(*a);
  EXPECT_GT(state.abs().sum().item<float>(), 0);
  setPrecision(*b, Precision::kFp8, c);
  loadFp8ScalingState(*b, state);
  EXPECT_TRUE(torch::equal(fp8ScalingState(*b), state));
  a->zero_grad();
  b->zero_grad();
  const at::Tensor la = a->forward(ids), lb = b->forward(ids);
  EXPECT_TRUE(torch::equal(la, lb));
  la.backward();
  lb.backward();
  EXPECT_TRUE(torch::equal(a->fc->weight.grad(), b->fc->weight.grad()));
  EXPECT_TRUE(torch::equal(fp8ScalingState(*a), fp8ScalingState(*b)));

  Net other;
  c.amax_history = 4;
  setPrecision(*other, Precision::kFp8, c);
  try {
    loadFp8ScalingState(*other, state);
    FAIL() << "a state of another size loaded";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("24"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("30"), std::string::npos) << e.what();
  }
  setPrecision(*other, Precision::kFp8, recipe(ScalingRecipe::kTensorwise));
  EXPECT_EQ(fp8ScalingState(*other).numel(), 0);  // current recipes hold no state
  setPrecision(*other, Precision::kBf16);
  EXPECT_EQ(other->fc->options().precision, Precision::kBf16);
  EXPECT_EQ(other->fc->fp8Scalers(), nullptr);
}

}  // namespace
}  // namespace tessera::models
