// tessera-train end to end under tessera-run on 2 ranks: the fashion-MNIST
// config for a few steps, a bad config, and "the GPT learns context" -- the
// shipped tiny GPT config must end at least 0.3 nats/byte below a smoothed
// bigram model fitted here on the same training split and scored on the same
// validation bytes.
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <array>
#include <cmath>
#include <fstream>
#include <set>

#include "tessera/core/data/byte_corpus.h"
#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

const std::vector<std::string>& kForeignLaunchVars = testing::foreignLaunchVariables();

std::string tempPath(const std::string& name) {
  return ::testing::TempDir() + name + "_" + std::to_string(getpid()) + ".jsonl";
}

// tessera-run --nproc-per-node 2 tessera-train --config <config> --metrics <metrics> <extra...>
ProcessResult trainOnTwoRanks(const std::string& config, const std::string& metrics,
                              const std::vector<std::string>& extra, std::chrono::seconds timeout) {
  std::vector<std::string> argv = {TESSERA_RUN_PATH, "--nproc-per-node", "2", "--master-port", "0",
                                   TESSERA_TRAIN_PATH, "--config", std::string(TESSERA_EXAMPLE_CONFIGS) + "/" + config,
                                   "--metrics", metrics};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return runProcess(argv, timeout, {}, kForeignLaunchVars);
}

std::vector<nlohmann::json> readJsonLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));  // throws on a malformed line
  return out;
}

TEST(TrainCli, MnistOnTwoRanksWritesValidJsonLines) {
  const std::string metrics = tempPath("mnist");
  const ProcessResult r = trainOnTwoRanks(
      "mnist-mlp.toml", metrics,
      {"--set", "train.steps=12", "--set", "train.log_every=4", "--set", "train.eval_every=8", "--set",
       "train.eval_batches=2"},
      std::chrono::seconds(120));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const auto lines = readJsonLines(metrics);
  ASSERT_EQ(lines.size(), 3u) << r.output;
  uint64_t lastBytes = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& l = lines[i];
    EXPECT_EQ(l["step"], 4 * static_cast<int>(i + 1));
    for (const char* key : {"loss", "lr", "tokens_per_s", "time_s", "compute_s", "comm_s"}) {
      ASSERT_TRUE(l.contains(key) && l[key].is_number()) << key << " in " << l.dump();
    }
    EXPECT_EQ(l["tokens"], l["step"].get<int>() * 64 * 2);  // examples, both ranks
    EXPECT_GT(l["comm_bytes"].get<uint64_t>(), lastBytes);  // cumulative, growing
    lastBytes = l["comm_bytes"].get<uint64_t>();
    EXPECT_EQ(l.contains("val_loss"), i >= 1) << l.dump();  // after steps 8 and 12
  }
  EXPECT_LT(lines.back()["loss"].get<double>(), 2.0);  // chance is ln 10 = 2.30
  std::remove(metrics.c_str());
}

// The same loop over FSDP (parallel.strategy = "fsdp"): a few steps of the tiny GPT.
TEST(TrainCli, GptWithFsdpOnTwoRanks) {
  const std::string metrics = tempPath("fsdp");
  const ProcessResult r = trainOnTwoRanks(
      "gpt-tiny.toml", metrics,
      {"--set", "parallel.strategy=fsdp", "--set", "parallel.dp_replicate=1", "--set", "parallel.dp_shard=2", "--set",
       "train.steps=4", "--set", "train.log_every=2", "--set", "train.eval_batches=2", "--set", "data.batch_size=8"},
      std::chrono::seconds(120));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const auto lines = readJsonLines(metrics);
  ASSERT_EQ(lines.size(), 2u) << r.output;
  EXPECT_EQ(lines.back()["tokens"], 4 * 8 * 64 * 2);
  EXPECT_TRUE(lines.back().contains("val_loss"));
  EXPECT_GT(lines.back()["comm_bytes"].get<uint64_t>(), 0u);
  std::remove(metrics.c_str());
}

TEST(TrainCli, BadConfigFailsOnEveryRankNamingTheKey) {
  const ProcessResult r =
      trainOnTwoRanks("mnist-mlp.toml", tempPath("bad"), {"--set", "optim.lrr=0.1"}, std::chrono::seconds(60));
  EXPECT_NE(r.exitCode, 0);
  EXPECT_NE(r.output.find("config field 'optim.lrr': unknown key (valid: name, lr,"), std::string::npos) << r.output;

  const ProcessResult degrees = trainOnTwoRanks("mnist-mlp.toml", tempPath("bad"), {"--set", "parallel.dp_replicate=3"},
                                                std::chrono::seconds(60));
  EXPECT_NE(degrees.exitCode, 0);
  EXPECT_NE(degrees.output.find("the world has 2 ranks"), std::string::npos) << degrees.output;
}

// train.device and parallel.backend = "nccl" as a user meets them, from the
// binary alone (a world of 1): on this machine CUDA is not there, which the
// startup check reports naming train.device (exit 2, a config error);
// NCCL on the CPU is refused before anything starts.
TEST(TrainCli, DeviceErrorsNameTheKey) {
  if (at::hasCUDA() && torch::cuda::device_count() > 0) GTEST_SKIP() << "CUDA is available here";
  const std::string config = std::string(TESSERA_EXAMPLE_CONFIGS) + "/mnist-mlp.toml";
  const ProcessResult cuda = runProcess({TESSERA_TRAIN_PATH, "--config", config, "--set", "train.device=cuda"},
                                        std::chrono::seconds(60), {}, kForeignLaunchVars);
  EXPECT_EQ(cuda.exitCode, 2) << cuda.output;
  EXPECT_NE(cuda.output.find("config field 'train.device': is \"cuda\", but"), std::string::npos) << cuda.output;
  EXPECT_NE(cuda.output.find("CUDA"), std::string::npos) << cuda.output;

  const ProcessResult nccl = runProcess({TESSERA_TRAIN_PATH, "--config", config, "--set", "parallel.backend=nccl"},
                                        std::chrono::seconds(60), {}, kForeignLaunchVars);
  EXPECT_EQ(nccl.exitCode, 2) << nccl.output;
  EXPECT_NE(nccl.output.find("config field 'parallel.backend'"), std::string::npos) << nccl.output;
  EXPECT_NE(nccl.output.find("set train.device = \"cuda\""), std::string::npos) << nccl.output;
}

// The example program (examples/train_gpt.cc) trains alone for a few steps.
TEST(TrainCli, ExampleTrainGptRuns) {
  const ProcessResult r = runProcess({TRAIN_GPT_EXAMPLE_PATH, "3"}, std::chrono::seconds(60), {}, kForeignLaunchVars);
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_NE(r.output.find("\"step\": 3"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("final validation loss"), std::string::npos) << r.output;
}

// Add-k bigram: P(b | a) = (count(a b) + k) / (count(a) + 256 k), fitted on
// `train`; returns the mean -ln P over consecutive pairs of `val`. k is the
// best of a few values on `val` itself, which only makes the baseline harder to beat.
double bigramNatsPerByte(const at::Tensor& train, const at::Tensor& val) {
  std::vector<double> counts(256 * 256, 0.0), totals(256, 0.0);
  const uint8_t* t = train.data_ptr<uint8_t>();
  for (int64_t i = 0; i + 1 < train.numel(); ++i) {
    counts[t[i] * 256 + t[i + 1]] += 1;
    totals[t[i]] += 1;
  }
  const uint8_t* v = val.data_ptr<uint8_t>();
  double best = INFINITY;
  for (double k : {1.0, 0.3, 0.1, 0.03, 0.01}) {
    double nll = 0;
    for (int64_t i = 0; i + 1 < val.numel(); ++i) {
      nll -= std::log((counts[v[i] * 256 + v[i + 1]] + k) / (totals[v[i]] + 256 * k));
    }
    best = std::min(best, nll / static_cast<double>(val.numel() - 1));
  }
  return best;
}

TEST(TrainCli, TheGptLearnsContext) {
  // The validation split tessera-train uses (gpt-tiny.toml: seq_len 64, val_fraction 0.1).
  data::DataConfig dc;
  dc.seq_len = 64;
  dc.val_fraction = 0.1;
  const data::LmSplit split = data::splitCorpus(data::ByteCorpus::load(), dc);
  // Evaluate on every whole global batch of the validation split (2 ranks x 16), in file order.
  const int64_t evalBatches = split.val.size() / 32;
  const int64_t evalBytes = evalBatches * 32 * 64 + 1;  // the targets' last byte included
  const double bigram = bigramNatsPerByte(split.train.tokens(), split.val.tokens().slice(0, 0, evalBytes));

  const std::string metrics = tempPath("gpt");
  const ProcessResult r = trainOnTwoRanks(
      "gpt-tiny.toml", metrics,
      {"--set", "train.eval_every=0", "--set", "train.eval_batches=" + std::to_string(evalBatches), "--set",
       "train.log_every=50"},
      std::chrono::seconds(400));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const auto lines = readJsonLines(metrics);
  ASSERT_FALSE(lines.empty());
  ASSERT_TRUE(lines.back().contains("val_loss")) << lines.back().dump();
  const double val = lines.back()["val_loss"].get<double>();
  std::printf("bigram %.4f nats/byte, GPT %.4f after %d steps in %.1f s\n", bigram, val,
              lines.back()["step"].get<int>(), lines.back()["time_s"].get<double>());
  EXPECT_LE(val, bigram - 0.3) << "bigram " << bigram << ", GPT " << val;
  std::remove(metrics.c_str());
}

}  // namespace
}  // namespace tessera
