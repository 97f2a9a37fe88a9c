// tessera-train with [precision] end to end (tessera-run, real processes over
// Gloo): FP8 at every level trains; an FP8 run resumed from its checkpoint
// continues bit for bit (codes, scales and amax histories restored exactly);
// tensor-parallel and pipeline FP8 runs follow the tp = 1 / pp = 1 FP8 run.
//
// Why FP8 curves are compared loosely across meshes: a weight's scale is
// taken over the logical tensor (the same at any tp), but activations and
// gradients are scaled from the tensor each rank holds (numerics/
// fp8_scaling.h) -- a row-parallel layer's input shard at tp = 2, one
// micro-batch in a pipeline -- so scales, and with them E4M3 roundings,
// differ. The bound (1e-2 absolute per step, 8 steps) leaves room for
// that and stays an order below what a broken split moves (a missing
// all-reduce: > 0.1).
// The fp32-vs-fp8 convergence comparison is tessera-bench convergence's.
//
// Tiny GPT (2 layers, d_model 64, 8 steps, one thread). Default: the
// checkpoint case and tp / pp parity; the recipe x level matrix and FSDP are
// labelled "long" (tests named "Long*").
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

constexpr int kSteps = 8;
constexpr double kMeshTolerance = 1e-2;

const std::vector<std::string> kTiny = {
    "model.n_layer=2",   "model.d_model=64",  "data.seq_len=32",    "data.batch_size=8",
    "train.steps=8",     "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
    "train.threads=1",   "train.clip=0.5",    "optim.warmup_steps=2"};

struct Curve {
  std::vector<double> losses;
  uint64_t dpBytesFirst = 0;  // the data-parallel traffic after the first step (with the initial broadcast)
  uint64_t dpBytes = 0;       // after the last step: dpBytes - dpBytesFirst is the gradients' of steps 2..8
  nlohmann::json fp8Comm;     // the last line's "fp8_comm" object (FP8 gradient communication), null without
};

Curve train(const std::string& tag, int ranks, const std::vector<std::string>& sets,
            const std::vector<std::string>& extraArgs = {}) {
  const std::string metrics = ::testing::TempDir() + "prec_" + tag + "_" + std::to_string(getpid()) + ".jsonl";
  std::vector<std::string> argv = {TESSERA_RUN_PATH,   "--nproc-per-node", std::to_string(ranks), "--master-port", "0",
                                   TESSERA_TRAIN_PATH, "--config", std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-fp8.toml",
                                   "--metrics", metrics};
  argv.insert(argv.end(), extraArgs.begin(), extraArgs.end());
  for (const auto* list : {&kTiny, &sets}) {
    for (const std::string& s : *list) {
      argv.push_back("--set");
      argv.push_back(s);
    }
  }
  const ProcessResult r = runProcess(argv, std::chrono::seconds(240), {}, testing::foreignLaunchVariables());
  EXPECT_EQ(r.exitCode, 0) << tag << ":\n" << r.output;
  Curve c;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    c.losses.push_back(j["loss"].get<double>());
    c.dpBytes = 0;
    for (const auto& [name, comm] : j["comm"].items()) {
      if (name == "dp_replicate" || name == "dp_shard" || name == "dp") c.dpBytes += comm["bytes"].get<uint64_t>();
    }
    if (c.losses.size() == 1) c.dpBytesFirst = c.dpBytes;
    c.fp8Comm = j.contains("fp8_comm") ? j["fp8_comm"] : nlohmann::json();
  }
  std::remove(metrics.c_str());
  return c;
}

void expectTrains(const Curve& c, const std::string& tag) {
  ASSERT_EQ(c.losses.size(), static_cast<size_t>(kSteps)) << tag;
  EXPECT_LT(c.losses.back(), c.losses.front() - 0.1) << tag << ": did not train";
}

void expectClose(const Curve& a, const Curve& b, double tolerance, const std::string& tag) {
  ASSERT_EQ(a.losses.size(), b.losses.size()) << tag;
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_NEAR(a.losses[i], b.losses[i], tolerance) << tag << ": step " << i + 1;
}

// 2 ranks of DDP; `sets` choose the precision.
const std::vector<std::string> kDdp2 = {"parallel.strategy=\"ddp\"", "parallel.dp_replicate=2"};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(PrecisionTrain, Fp8O2ResumesBitForBit) {
  const std::string dir = ::testing::TempDir() + "prec_ckpt_" + std::to_string(getpid());
  const std::vector<std::string> sets = with(kDdp2, {"precision.level=\"O2\""});
  const Curve head = train("o2_head", 2, sets, {"--checkpoint-dir", dir, "--checkpoint-every", "4"});
  const Curve tail = train("o2_tail", 2, sets, {"--resume", dir + "/step-00000004"});
  expectTrains(head, "o2");
  ASSERT_EQ(tail.losses.size(), static_cast<size_t>(kSteps / 2)) << "the resumed run logs steps 5-8";
  for (size_t i = 0; i < tail.losses.size(); ++i) {
    EXPECT_EQ(tail.losses[i], head.losses[kSteps / 2 + i]) << "step " << kSteps / 2 + i + 1 << " differs after resume";
  }
  std::filesystem::remove_all(dir);
}

TEST(PrecisionTrain, Fp8GradientsTravelInAQuarterOfTheBytes) {
  const Curve fp32 = train("fp32", 2, with(kDdp2, {"precision.mode=\"fp32\""}));
  const Curve fp8 = train("fp8_o1", 2, with(kDdp2, {"precision.level=\"O1\""}));
  expectTrains(fp32, "fp32");
  expectTrains(fp8, "fp8 O1");
  // Steps 2..8: gradients only (step 1 also carries DDP's fp32 broadcast of the parameters).
  const uint64_t fp32Bytes = fp32.dpBytes - fp32.dpBytesFirst, fp8Bytes = fp8.dpBytes - fp8.dpBytesFirst;
  ASSERT_GT(fp8Bytes, 0u);
  const double ratio = static_cast<double>(fp32Bytes) / static_cast<double>(fp8Bytes);
  EXPECT_GT(ratio, 3.5) << "fp32 " << fp32Bytes << " B, fp8 " << fp8Bytes << " B";
  EXPECT_LT(ratio, 4.01);
  // The metrics line reports the FP8 ring's overflow rate: none under the safe scale.
  EXPECT_TRUE(fp32.fp8Comm.is_null());
  ASSERT_TRUE(fp8.fp8Comm.is_object());
  EXPECT_EQ(fp8.fp8Comm["scaling"], "safe");
  EXPECT_EQ(fp8.fp8Comm["saturated_fraction_total"].get<double>(), 0.0);
  // Same tokens; FP8 stays near fp32 after 8 steps (the real parity check is the convergence bench).
  EXPECT_NEAR(fp8.losses.back(), fp32.losses.back(), 0.05);
}

TEST(PrecisionTrain, Fp8TensorParallelFollowsTp1) {
  const std::vector<std::string> common = {"precision.level=\"O1\"", "parallel.strategy=\"ddp\""};
  const Curve tp1 = train("tp1", 2, with(common, {"parallel.dp_replicate=2", "parallel.tp=1"}));
  const Curve tp2 = train("tp2", 4, with(common, {"parallel.dp_replicate=2", "parallel.tp=2"}));
  expectTrains(tp1, "tp1");
  expectClose(tp1, tp2, kMeshTolerance, "fp8 tp=2 vs tp=1");
}

TEST(PrecisionTrain, Fp8PipelineWithDeferredWeightGradientsFollowsPp1) {
  // zb_h1 splits every Linear's backward into B and a deferred W (issue 16).
  const std::vector<std::string> common = {"precision.level=\"O1\"", "parallel.strategy=\"none\"",
                                           "parallel.dp_replicate=1", "pipeline.microbatches=2"};
  const Curve pp1 = train("pp1", 1, with(common, {"parallel.pp=1"}));
  const Curve pp2 = train("pp2", 2, with(common, {"parallel.pp=2", "pipeline.schedule=\"zb_h1\""}));
  expectTrains(pp1, "pp1");
  expectClose(pp1, pp2, kMeshTolerance, "fp8 pp=2 zb_h1 vs pp=1");
}

// The matrix: every recipe at O1, O3's whole-tensor ZeRO, FSDP with FP8 reduce-scatter, bf16.
TEST(LongPrecisionTrain, EveryRecipeLevelAndStrategyTrains) {
  for (const char* recipe : {"delayed", "tensorwise", "rowwise", "blockwise"}) {
    expectTrains(train(std::string("o1_") + recipe, 2,
                       with(kDdp2, {"precision.level=\"O1\"", std::string("precision.fp8_recipe=\"") + recipe + "\""})),
                 recipe);
  }
  const std::vector<std::string> fsdp2 = {"parallel.strategy=\"fsdp\"", "parallel.dp_replicate=1", "parallel.dp_shard=2"};
  expectTrains(train("o3_zero", 2, with(fsdp2, {"precision.level=\"O3\""})), "O3 whole-tensor ZeRO");
  expectTrains(train("o1_fsdp", 2, with(fsdp2, {"precision.level=\"O1\""})), "O1 FSDP");
  expectTrains(train("bf16", 2, with(kDdp2, {"precision.mode=\"bf16\"", "parallel.grad_comm=\"bf16\""})), "bf16");
  const Curve autoScaled = train("o1_auto", 2, with(kDdp2, {"precision.level=\"O1\"", "precision.fp8_comm_scaling=\"auto\""}));
  expectTrains(autoScaled, "FP8-LM auto scaling");
  ASSERT_TRUE(autoScaled.fp8Comm.is_object());
  EXPECT_EQ(autoScaled.fp8Comm["scaling"], "auto");
  EXPECT_GT(autoScaled.fp8Comm["mu_max"].get<double>(), 0.0);
}

}  // namespace
}  // namespace tessera
