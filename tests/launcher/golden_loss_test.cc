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
// The file is named by a hash of the corpus bytes: the curve depends on the
// data, and Debian releases ship different fortunes (Debian 13's edits 7 of
// its files, which moves the curve by up to 0.11). Across libtorch versions
// and BLAS builds the same corpus gives the same curve within float noise
// (libtorch 2.6 on Debian 13 reproduces the 1.13 curve within 4.7e-7 with
// Debian 12's corpus), so one tolerance, 1e-5, holds everywhere. A corpus
// without a recorded curve fails, naming the file to record. To (re)record
// after a deliberate change of the math, or for a new corpus:
//   TESSERA_RECORD_GOLDEN=1 [TESSERA_GOLDEN_DIR=writable/dir] ctest -R GoldenLoss
// then commit the file (under tests/golden/) and say why.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "tessera/core/data/byte_corpus.h"
#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

const std::vector<std::string>& kForeignLaunchVars = testing::foreignLaunchVariables();

constexpr int kSteps = 20;
constexpr double kTolerance = 1e-5;

// FNV-1a 64 of the corpus bytes tessera-train reads, as 16 hex digits.
std::string corpusHash() {
  const at::Tensor bytes = data::ByteCorpus::load().bytes().contiguous();
  const auto* p = bytes.data_ptr<uint8_t>();
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < bytes.numel(); ++i) h = (h ^ p[i]) * 1099511628211ull;
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

std::string goldenPath() {
  const char* dir = std::getenv("TESSERA_GOLDEN_DIR");
  return std::string(dir != nullptr && *dir != '\0' ? dir : TESSERA_GOLDEN_DIR) + "/gpt-tiny-ddp2.corpus-" +
         corpusHash() + ".json";
}

// The losses of `steps` steps of gpt-tiny on 2 ranks, with `extra` flags.
std::vector<double> trainLosses(int steps = kSteps, const std::vector<std::string>& extra = {}) {
  const std::string metrics = ::testing::TempDir() + "golden_" + std::to_string(getpid()) + ".jsonl";
  std::vector<std::string> argv = {
      TESSERA_RUN_PATH, "--nproc-per-node", "2", "--master-port", "0", TESSERA_TRAIN_PATH, "--config",
      std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny.toml", "--metrics", metrics,
      "--set", "train.steps=" + std::to_string(steps), "--set", "train.log_every=1", "--set", "train.eval_batches=0"};
  argv.insert(argv.end(), extra.begin(), extra.end());
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
  const std::string path = goldenPath();
  const char* record = std::getenv("TESSERA_RECORD_GOLDEN");
  if (record != nullptr && std::string(record) == "1") {
    nlohmann::json golden;
    golden["config"] = "examples/configs/gpt-tiny.toml";
    golden["ranks"] = 2;
    golden["corpus_fnv1a64"] = corpusHash();
    golden["losses"] = losses;
    std::ofstream(path) << golden.dump(1) << "\n";
    GTEST_SKIP() << "recorded " << path;
  }
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << "no golden curve for this corpus: " << path
                         << " (record it with TESSERA_RECORD_GOLDEN=1 and commit it)";
  const nlohmann::json golden = nlohmann::json::parse(in);
  const auto expected = golden["losses"].get<std::vector<double>>();
  ASSERT_EQ(expected.size(), losses.size());
  for (size_t i = 0; i < losses.size(); ++i) {
    EXPECT_NEAR(losses[i], expected[i], kTolerance)
        << "step " << i + 1 << " left the golden curve (" << path
        << "); if the math changed on purpose, re-record with TESSERA_RECORD_GOLDEN=1 and say why";
  }
}

// train.device = "cpu" spelled out is the default: the same losses, bit for bit.
TEST(GoldenLoss, ExplicitCpuDeviceTrainsAsTheDefault) {
  constexpr int kFewSteps = 4;
  const std::vector<double> byDefault = trainLosses(kFewSteps);
  const std::vector<double> onCpu = trainLosses(kFewSteps, {"--set", "train.device=\"cpu\""});
  ASSERT_EQ(byDefault.size(), static_cast<size_t>(kFewSteps));
  ASSERT_EQ(onCpu.size(), byDefault.size());
  for (size_t i = 0; i < onCpu.size(); ++i) EXPECT_EQ(onCpu[i], byDefault[i]) << "step " << i + 1;
}

}  // namespace
}  // namespace tessera
