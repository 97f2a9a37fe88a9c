// Learning-rate schedules, the optimizer factory and gradient clipping,
// against values computed by hand (the formulas written out independently
// of the implementation).
#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>
#include <torch/torch.h>

#include <cmath>

#include "tessera/core/config.h"
#include "tessera/optim/grad_clip.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::optim {
namespace {

TEST(LrSchedule, CosineWarmsUpLinearlyThenDecaysToMinLr) {
  LrScheduleConfig c;
  c.schedule = "cosine";
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup_steps = 2;
  EXPECT_DOUBLE_EQ(learningRateAt(c, 0, 12), 0.5);   // 1 * 1/2
  EXPECT_DOUBLE_EQ(learningRateAt(c, 1, 12), 1.0);   // 1 * 2/2
  EXPECT_DOUBLE_EQ(learningRateAt(c, 2, 12), 1.0);   // p = 0
  EXPECT_DOUBLE_EQ(learningRateAt(c, 7, 12), 0.55);  // p = 5/10: 0.1 + 0.9 * (1 + cos(pi/2)) / 2
  EXPECT_NEAR(learningRateAt(c, 4, 12), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.2)), 1e-15);
  EXPECT_DOUBLE_EQ(learningRateAt(c, 12, 12), 0.1);  // p = 1
  EXPECT_DOUBLE_EQ(learningRateAt(c, 30, 12), 0.1);  // past the end
}

TEST(LrSchedule, WarmupStableDecayHoldsThenDecaysLinearly) {
  LrScheduleConfig c;
  c.schedule = "wsd";
  c.lr = 1.0;
  c.min_lr = 0.0;
  c.warmup_steps = 1;
  c.decay_fraction = 0.2;  // 10 steps: decay over steps 8, 9 (ends at 10)
  EXPECT_DOUBLE_EQ(learningRateAt(c, 0, 10), 1.0);
  EXPECT_DOUBLE_EQ(learningRateAt(c, 5, 10), 1.0);
  EXPECT_DOUBLE_EQ(learningRateAt(c, 8, 10), 1.0);
  EXPECT_DOUBLE_EQ(learningRateAt(c, 9, 10), 0.5);
  EXPECT_DOUBLE_EQ(learningRateAt(c, 10, 10), 0.0);
}

TEST(LrSchedule, ConstantAndBoundFunction) {
  LrScheduleConfig c;
  c.schedule = "constant";
  c.lr = 0.3;
  c.warmup_steps = 3;
  const LrSchedule s = makeLrSchedule(c, 100);
  EXPECT_DOUBLE_EQ(s(0), 0.1);
  EXPECT_DOUBLE_EQ(s(2), 0.3);
  EXPECT_DOUBLE_EQ(s(99), 0.3);
}

TEST(LrSchedule, BadValuesNameTheField) {
  LrScheduleConfig c;
  c.lr = 1e-3;
  c.min_lr = 1e-2;
  try {
    c.validate();
    FAIL() << "min_lr > lr accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "optim.min_lr");
  }
  c.min_lr = 0;
  c.schedule = "linear";
  try {
    c.validate();
    FAIL() << "unknown schedule accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "optim.schedule");
    EXPECT_NE(std::string(e.what()).find("cosine, wsd, constant"), std::string::npos) << e.what();
  }
}

// Two AdamW steps with different gradients, against Loshchilov & Hutter's
// Algorithm 2 written out per element.
TEST(Optimizer, AdamWMatchesTheFormula) {
  OptimizerConfig c;
  c.name = "adamw";
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  const double lr = 0.1;
  at::Tensor p = torch::tensor({1.0, -2.0}, torch::kDouble).requires_grad_();
  auto opt = makeOptimizer(c, {p}, lr);
  const std::vector<std::vector<double>> grads = {{0.5, -0.25}, {1.0, 0.75}};
  std::vector<double> expected = {1.0, -2.0}, m = {0, 0}, v = {0, 0};
  for (int t = 1; t <= 2; ++t) {
    p.mutable_grad() = torch::tensor(grads[t - 1], torch::kDouble);
    opt->step();
    for (int i = 0; i < 2; ++i) {
      const double g = grads[t - 1][i];
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * g;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * g * g;
      const double mHat = m[i] / (1 - std::pow(c.beta1, t));
      const double vHat = v[i] / (1 - std::pow(c.beta2, t));
      expected[i] = expected[i] * (1 - lr * c.weight_decay) - lr * mHat / (std::sqrt(vHat) + c.eps);
    }
  }
  EXPECT_NEAR(p[0].item<double>(), expected[0], 1e-12);
  EXPECT_NEAR(p[1].item<double>(), expected[1], 1e-12);
}

TEST(Optimizer, SgdMomentumAndLearningRateChange) {
  OptimizerConfig c;
  c.name = "sgd";
  c.momentum = 0.9;
  c.weight_decay = 0;
  at::Tensor p = torch::tensor({1.0}, torch::kDouble).requires_grad_();
  auto opt = makeOptimizer(c, {p}, 0.1);
  p.mutable_grad() = torch::tensor({2.0}, torch::kDouble);
  opt->step();  // buf = 2, p = 1 - 0.1 * 2 = 0.8
  EXPECT_NEAR(p.item<double>(), 0.8, 1e-15);
  opt->setLearningRate(0.5);
  EXPECT_DOUBLE_EQ(opt->learningRate(), 0.5);
  p.mutable_grad() = torch::tensor({1.0}, torch::kDouble);
  opt->step();  // buf = 0.9 * 2 + 1 = 2.8, p = 0.8 - 0.5 * 2.8 = -0.6
  EXPECT_NEAR(p.item<double>(), -0.6, 1e-15);
  opt->zeroGrad();
  EXPECT_EQ(p.grad().item<double>(), 0.0);
}

TEST(Optimizer, SavedStateContinuesIdentically) {
  OptimizerConfig c;
  at::Tensor a = torch::tensor({1.0, 2.0, 3.0}).requires_grad_();
  at::Tensor b = a.detach().clone().requires_grad_();
  auto optA = makeOptimizer(c, {a}, 0.01);
  auto optB = makeOptimizer(c, {b}, 0.01);
  a.mutable_grad() = torch::tensor({0.1, -0.2, 0.3});
  optA->step();
  b.detach().copy_(a.detach());
  optB->loadState(optA->state());
  for (auto* t : {&a, &b}) t->mutable_grad() = torch::tensor({-0.5, 0.4, 0.2});
  optA->step();
  optB->step();
  EXPECT_TRUE(torch::equal(a, b)) << a << b;
}

TEST(Optimizer, BadConfigNamesTheField) {
  OptimizerConfig c;
  c.name = "adam";
  try {
    makeOptimizer(c, {torch::zeros({1}).requires_grad_()}, 0.1);
    FAIL() << "unknown optimizer accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "optim.name");
    EXPECT_NE(std::string(e.what()).find("adamw, sgd"), std::string::npos) << e.what();
  }
  c = {};
  c.beta2 = 1.0;
  EXPECT_THROW(c.validate(), ConfigError);
}

// Gradients (3, 4): norm 5, clipped to max_norm by the factor max/(5 + 1e-6).
TEST(GradClip, ScalesEveryGradientByTheGlobalNorm) {
  torch::nn::Linear layer(torch::nn::LinearOptions(1, 1).bias(true));
  auto dp = parallel::makeNoDataParallel(*layer);
  layer->weight.mutable_grad() = torch::full({1, 1}, 3.0);
  layer->bias.mutable_grad() = torch::full({1}, 4.0);
  EXPECT_NEAR(clipGradNorm(*dp, 10.0), 5.0, 1e-6);  // under the limit: untouched
  EXPECT_FLOAT_EQ(layer->weight.grad().item<float>(), 3.0f);
  EXPECT_NEAR(clipGradNorm(*dp, 1.0), 5.0, 1e-6);
  const double scale = 1.0 / (5.0 + 1e-6);
  EXPECT_NEAR(layer->weight.grad().item<float>(), 3.0 * scale, 1e-6);
  EXPECT_NEAR(layer->bias.grad().item<float>(), 4.0 * scale, 1e-6);
  EXPECT_NEAR(dp->gradNorm(), 1.0, 1e-5);
  EXPECT_DOUBLE_EQ(clipScale(5.0, 0.0), 1.0);  // disabled
}

}  // namespace
}  // namespace tessera::optim
