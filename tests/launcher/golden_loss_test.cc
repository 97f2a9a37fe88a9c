// The golden loss curve: the first 20 training losses (logged every step) of
// examples/configs/gpt-tiny.toml on 2 ranks (DDP), recorded once and checked
// into tests/golden/, compared step by step. A change that alters the math --
// initialization, dropout, data order, the loss, the optimizer, gradient
// averaging -- fails here loudly; a refactor that keeps the math passes.
//
// The first 20 steps are the config's warm-up, whose learning rate does not
// depend on train.steps, so running 20 steps reproduces the first 20 of the
// full 200-step run.
//
// Each platform keeps its own file, named by libtorch's major.minor version
// (BLAS and libtorch change float rounding): tests/golden/gpt-tiny-ddp2.torch-1.13.json
// here. On a platform without its own file the test compares against the
// 1.13 file with a documented looser tolerance (1e-3 absolute: float noise of
// another BLAS grows over 20 AdamW steps, a changed formula does not stay
// within it). To (re)record after a deliberate change of the math:
//   TESSERA_RECORD_GOLDEN=1 ctest -R GoldenLoss   (then commit the file and say why)
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>

#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

const std::vector<std::string>& kForeignLaunchVars = testing::foreignLaunchVariables();

constexpr int kSteps = 20;
constexpr double kSamePlatformTolerance = 1e-5;
constexpr double kOtherPlatformTolerance = 1e-3;

std::string goldenPath(int major, int minor) {
  return std::string(TESSERA_GOLDEN_DIR) + "/gpt-tiny-ddp2.torch-" + std::to_string(major) + "." +
         std::to_string(minor) + ".json";
}

std::vector<double> trainLosses() {
  const std::string metrics = ::testing::TempDir() + "golden_" + std::to_string(getpid()) + ".jsonl";
  const std::vector<std::string> argv = {
      TESSERA_RUN_PATH, "--nproc-per-node", "2", "--master-port", "0", TESSERA_TRAIN_PATH, "--config",
      std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny.toml", "--metrics", metrics,
      "--set", "train.steps=" + std::to_string(kSteps), "--set", "train.log_every=1", "--set", "train.eval_batches=0"};
  const ProcessResult r = runProcess(argv, std::chrono::seconds(180), {}, kForeignLaunchVars);
  EXPECT_EQ(r.exitCode, 0) << r.output;
  std::vector<double> losses;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) losses.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  std::remove(metrics.c_str());
  return losses;
}

TEST(GoldenLoss, GptTinyOnTwoRanksFollowsTheRecordedCurve) {
  const std::vector<double> losses = trainLosses();
  ASSERT_EQ(losses.size(), static_cast<size_t>(kSteps));
  const std::string own = goldenPath(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
  const char* record = std::getenv("TESSERA_RECORD_GOLDEN");
  if (record != nullptr && std::string(record) == "1") {
    nlohmann::json golden;
    golden["config"] = "examples/configs/gpt-tiny.toml";
    golden["ranks"] = 2;
    golden["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
    golden["losses"] = losses;
    std::ofstream(own) << golden.dump(1) << "\n";
    GTEST_SKIP() << "recorded " << own;
  }
  std::ifstream ownFile(own);
  const bool samePlatform = ownFile.good();
  std::ifstream in(samePlatform ? own : goldenPath(1, 13));
  ASSERT_TRUE(in.good()) << "no golden file " << own << " nor the 1.13 one";
  const nlohmann::json golden = nlohmann::json::parse(in);
  const auto expected = golden["losses"].get<std::vector<double>>();
  ASSERT_EQ(expected.size(), losses.size());
  const double tolerance = samePlatform ? kSamePlatformTolerance : kOtherPlatformTolerance;
  for (size_t i = 0; i < losses.size(); ++i) {
    EXPECT_NEAR(losses[i], expected[i], tolerance)
        << "step " << i + 1 << " left the golden curve (" << (samePlatform ? own : goldenPath(1, 13))
        << "); if the math changed on purpose, re-record with TESSERA_RECORD_GOLDEN=1 and say why";
  }
}

}  // namespace
}  // namespace tessera
