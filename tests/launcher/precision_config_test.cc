// [precision] and parallel.grad_comm in tessera-train's config: the keys are
// read, and resolvePrecision() -- the one decision -- turns them into what the
// layers, the strategy and the optimizer do, with every conflict a
// ConfigError naming the keys involved.
#include <gtest/gtest.h>

#include "launcher/train_config.h"
#include "tests/harness/checks.h"

namespace tessera::launcher {
namespace {

using testing::configErrorOf;

const std::string kMinimalGpt = R"(
[model]
kind = "gpt"
n_layer = 2
[data]
seq_len = 32
[train]
steps = 10
)";

ConfigError parseError(const std::vector<std::string>& overrides) {
  return configErrorOf([&] { parseTrainJobConfig(kMinimalGpt, overrides); });
}

parallel::PrecisionPlan planOf(const std::vector<std::string>& overrides) {
  const TrainJobConfig c = parseTrainJobConfig(kMinimalGpt, overrides);
  return parallel::resolvePrecision(c.parallel.precision, c.parallel.grad_comm, c.parallel.strategy,
                                    c.steppingOptimizer());
}

TEST(PrecisionConfig, KeysAreReadIntoThePlan) {
  const TrainJobConfig c = parseTrainJobConfig(
      kMinimalGpt + "[precision]\nmode = \"fp8\"\nlevel = \"O2\"\nfp8_recipe = \"rowwise\"\namax_history = 8\n"
                    "margin = 1\n");
  EXPECT_EQ(c.parallel.precision.mode, "fp8");
  EXPECT_EQ(c.parallel.precision.amax_history, 8);
  const parallel::PrecisionPlan plan = parallel::resolvePrecision(c.parallel.precision, c.parallel.grad_comm,
                                                                  c.parallel.strategy, c.steppingOptimizer());
  EXPECT_EQ(plan.layers, models::Precision::kFp8);
  EXPECT_EQ(plan.recipe.recipe, numerics::ScalingRecipe::kRowwise);
  EXPECT_EQ(plan.recipe.amax_history, 8);
  EXPECT_EQ(plan.recipe.margin, 1);
  EXPECT_EQ(plan.gradientComm, parallel::GradientComm::kFp8);  // implied by every FP8 level
  EXPECT_EQ(plan.optimizerStates, "fp8");
  EXPECT_EQ(plan.master, "fp32");
  EXPECT_EQ(plan.label, "fp8-O2");
}

TEST(PrecisionConfig, LevelsBuildOnEachOther) {
  parallel::PrecisionPlan p = planOf({"precision.mode=fp8"});
  EXPECT_EQ(p.optimizerStates, "fp32");  // O1: FP8 GEMMs and communication only
  EXPECT_EQ(p.recipe.recipe, numerics::ScalingRecipe::kDelayed);
  p = planOf({"precision.mode=fp8", "precision.level=O3", "parallel.strategy=fsdp"});
  EXPECT_EQ(p.optimizerStates, "fp8");
  EXPECT_EQ(p.master, "fp16");
  EXPECT_TRUE(p.wholeTensorZero);  // O3's "fsdp" is ZeRO over whole tensors
  EXPECT_FALSE(planOf({"precision.mode=fp8", "precision.level=O3"}).wholeTensorZero);  // ddp: unsharded
}

TEST(PrecisionConfig, GradCommIsAKeyOfTheFp32AndBf16Modes) {
  EXPECT_EQ(planOf({}).gradientComm, parallel::GradientComm::kFp32);
  EXPECT_EQ(planOf({"parallel.grad_comm=bf16"}).gradientComm, parallel::GradientComm::kBf16);
  EXPECT_EQ(planOf({"precision.mode=bf16", "parallel.grad_comm=fp8"}).gradientComm, parallel::GradientComm::kFp8);
  EXPECT_EQ(planOf({"precision.mode=bf16"}).layers, models::Precision::kBf16);
  // Under fp8 it is decided already: setting it names both keys.
  const ConfigError e = parseError({"precision.mode=fp8", "parallel.grad_comm=fp32"});
  EXPECT_EQ(e.field(), "parallel.grad_comm");
  EXPECT_NE(std::string(e.what()).find("precision.mode"), std::string::npos) << e.what();
}

TEST(PrecisionConfig, ConflictsNameTheKeys) {
  ConfigError e = parseError({"precision.mode=fp16"});
  EXPECT_EQ(e.field(), "precision.mode");
  EXPECT_NE(std::string(e.what()).find("bf16"), std::string::npos) << e.what();
  e = parseError({"precision.mode=fp8", "precision.level=O4"});
  EXPECT_EQ(e.field(), "precision.level");
  e = parseError({"precision.mode=fp8", "precision.fp8_recipe=tilewise"});
  EXPECT_EQ(e.field(), "precision.fp8_recipe");
  EXPECT_NE(std::string(e.what()).find("blockwise"), std::string::npos) << e.what();
  e = parseError({"precision.mode=fp8", "precision.amax_history=0"});
  EXPECT_EQ(e.field(), "precision.amax_history");
  e = parseError({"precision.mode=fp8", "precision.level=O2", "optim.name=sgd"});
  EXPECT_EQ(e.field(), "precision.level");
  EXPECT_NE(std::string(e.what()).find("optim.name"), std::string::npos) << e.what();
  e = parseError({"precision.mode=fp8", "precision.level=O3", "parallel.strategy=hybrid"});
  EXPECT_EQ(e.field(), "parallel.strategy");
  EXPECT_NE(std::string(e.what()).find("O3"), std::string::npos) << e.what();
  e = parseError({"parallel.grad_comm=fp4"});
  EXPECT_EQ(e.field(), "parallel.grad_comm");
  e = parseError({"precision.fp8_comm_scaling=fast"});
  EXPECT_EQ(e.field(), "precision.fp8_comm_scaling");
  EXPECT_TRUE(planOf({"precision.mode=fp8", "precision.fp8_comm_scaling=auto"}).fp8AutoScaling);
  EXPECT_FALSE(planOf({"precision.mode=fp8"}).fp8AutoScaling);
  // The level is read only with fp8 (a bf16 run ignores it).
  EXPECT_EQ(planOf({"precision.mode=bf16", "precision.level=O2", "optim.name=sgd"}).optimizerStates, "fp32");
  // DiLoCo's inner optimizer is the one O2 replaces the states of.
  EXPECT_EQ(planOf({"precision.mode=fp8", "precision.level=O2", "optim.name=diloco", "parallel.strategy=none"})
                .optimizerStates,
            "fp8");
}

TEST(PrecisionConfig, ShippedFp8ConfigIsValidOnTwoRanks) {
  const TrainJobConfig c = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-fp8.toml");
  EXPECT_EQ(c.parallel.precision.mode, "fp8");
  EXPECT_NO_THROW(c.parallel.validate(2));
}

}  // namespace
}  // namespace tessera::launcher
