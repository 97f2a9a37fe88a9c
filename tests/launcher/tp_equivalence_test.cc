// "Same math on any mesh", end to end: tessera-train with parallel.tp = N
// or parallel.pp = N (under tessera-run, real processes over Gloo) logs the
// per-step losses, the final validation loss and the token counts of the
// same job at tp = 1 / pp = 1 with the same data ranks, within float noise
// (2e-4 absolute, fp32). The tp = 1 / pp = 1 run is the reference: an independent run of the unsplit model, so a wrong
// split, a missing all-reduce, a tp rank counted as a data rank, a gradient
// norm that counts a shard twice or an optimizer that treats a shard as a
// whole tensor all move the curve by far more than the tolerance (DeMo with
// chunks that straddle the shard boundaries, for instance, moves it by ~4e-3).
//
// Every case is a tiny GPT (2 layers, d_model 64, 8 steps, 1 intra-op thread,
// at most 4 processes) on top of examples/configs/gpt-tiny-tp2.toml. Three
// representative cases (DDP, FSDP with sequence parallelism, streaming DiLoCo)
// run in the default suite ("Default/..."); the full matrix -- SGD, MT-DAO,
// DeMo, hybrid, tp = 4, learned positions with an untied head and dropout, a
// padded vocabulary, gradient accumulation -- is labelled "long" (tests named
// "Long*": ctest -L long). DeMo equals tp = 1 when its chunks align with the
// shard boundaries (optim/demo.h); with chunks that straddle them it runs on
// per-shard chunks, and is only checked to run and train.
//
// Pipelines (PpEquivalence, the same harness): every schedule, with tied
// embeddings across the first and last stage, DDP, FSDP, TP inside stages,
// gradient accumulation over pipeline steps and dropout; two run by default.
//
// Experts (EpEquivalence): an MoE GPT at parallel.ep = 2 logs the losses of
// dp_replicate = 2 (the same two data ranks, every expert on every rank),
// with DDP, FSDP, TED with and without duplicate-token dropping, pipeline
// stages, top-2 routing and DiLoCo; and an ep = 2 checkpoint resumes at
// ep = 1 (and back) on the same curve (EpCheckpoint).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

constexpr double kTolerance = 2e-4;  // absolute, per logged loss (observed: < 1e-6)
constexpr int kSteps = 8;

// Applied to both runs of every case: the tiny model and a short, logged,
// clipped run whose loss moves enough in 8 steps to make the comparison sharp.
const std::vector<std::string> kTiny = {
    "model.n_layer=2",    "model.d_model=64",   "data.seq_len=32",      "data.batch_size=8",
    "train.steps=8",      "train.log_every=1",  "train.eval_every=0",   "train.eval_batches=2",
    "train.threads=1",    "train.clip=0.5",     "optim.warmup_steps=2"};

struct Case {
  std::string name;
  std::string axis;                 // "tp" or "pp": the axis split in the N run, 1 in the reference
  std::vector<std::string> common;  // both runs (besides kTiny): strategy, optimizer, model
  std::vector<std::string> mesh1;   // the tp = 1 run's degrees
  int ranks1;
  std::vector<std::string> meshN;   // the tp = N run's degrees
  int ranksN;
};

// gtest prints the parameter in test listings: its name, not its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Curve {
  std::vector<double> losses;  // per step
  double valLoss = 0;          // after the last step
  int64_t tokens = 0;          // after the last step: counted over the data ranks only
  uint64_t axisBytes = 0;      // after the last step: traffic on the split axis's communicator
};

// tessera-run --nproc-per-node <ranks> tessera-train --config gpt-tiny-tp2.toml --set ... ; the metrics read back.
Curve train(const std::string& tag, int ranks, const std::vector<std::vector<std::string>>& setLists,
            const std::string& axis = "tp", const std::vector<std::string>& extraArgs = {}) {
  const std::string metrics = ::testing::TempDir() + "tp_eq_" + tag + "_" + std::to_string(getpid()) + ".jsonl";
  std::vector<std::string> argv = {TESSERA_RUN_PATH,  "--nproc-per-node", std::to_string(ranks), "--master-port", "0",
                                   TESSERA_TRAIN_PATH, "--config", std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-tp2.toml",
                                   "--metrics", metrics};
  argv.insert(argv.end(), extraArgs.begin(), extraArgs.end());
  for (const auto& sets : setLists) {
    for (const std::string& s : sets) {
      argv.push_back("--set");
      argv.push_back(s);
    }
  }
  const ProcessResult r = runProcess(argv, std::chrono::seconds(240), {}, testing::foreignLaunchVariables());
  Curve c;
  EXPECT_EQ(r.exitCode, 0) << tag << ":\n" << r.output;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    c.losses.push_back(j["loss"].get<double>());
    c.tokens = j["tokens"].get<int64_t>();
    if (j.contains("val_loss")) c.valLoss = j["val_loss"].get<double>();
    c.axisBytes = j["comm"].contains(axis) ? j["comm"][axis]["bytes"].get<uint64_t>() : 0;
  }
  std::remove(metrics.c_str());
  return c;
}

// The N run against the reference with the axis at 1, everything else equal.
void expectSameCurve(const Case& k) {
  const Curve one = train(k.name + "_" + k.axis + "1", k.ranks1,
                          {kTiny, k.common, k.mesh1, {"parallel." + k.axis + "=1"}}, k.axis);
  const Curve many = train(k.name + "_" + k.axis + "N", k.ranksN, {kTiny, k.common, k.meshN}, k.axis);
  ASSERT_EQ(one.losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(many.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_EQ(one.axisBytes, 0u);
  EXPECT_GT(many.axisBytes, 0u) << "the " << k.axis << " run did not split the model";
  EXPECT_LT(one.losses.back(), one.losses.front() - 0.1) << "the reference did not train; the comparison is blunt";
  double largest = 0;
  for (int i = 0; i < kSteps; ++i) {
    EXPECT_NEAR(many.losses[i], one.losses[i], kTolerance) << k.name << ": step " << i + 1;
    largest = std::max(largest, std::abs(many.losses[i] - one.losses[i]));
  }
  std::printf("%s: largest loss difference %.2e over %d steps\n", k.name.c_str(), largest, kSteps);
  EXPECT_NEAR(many.valLoss, one.valLoss, kTolerance) << k.name << ": validation loss";
  EXPECT_EQ(many.tokens, one.tokens) << k.axis << " ranks must read the same batch, not count as data ranks";
}

class TpEquivalence : public ::testing::TestWithParam<Case> {};
TEST_P(TpEquivalence, LogsTheLossesOfTp1) { expectSameCurve(GetParam()); }

std::string caseName(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

// The degrees of each comparison: tp = 2 beside the same data ranks.
const std::vector<std::string> kDdp1 = {"parallel.strategy=ddp", "parallel.dp_replicate=2"};
const std::vector<std::string> kDdp2 = {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.tp=2"};
const std::vector<std::string> kFsdp1 = {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=2"};
const std::vector<std::string> kFsdp2 = {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=2",
                                         "parallel.tp=2"};
// Local-update optimizers: one rank per replica (strategy none), tp = 2 inside each.
const std::vector<std::string> kReplicas1 = {"parallel.strategy=none", "parallel.dp_replicate=2"};
const std::vector<std::string> kReplicas2 = {"parallel.strategy=none", "parallel.dp_replicate=2", "parallel.tp=2"};
const std::vector<std::string> kOneReplica = {"parallel.strategy=none", "parallel.dp_replicate=1"};
const std::string kSp = "parallel.sequence_parallel=true";

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Streaming DiLoCo: H = 4 inner steps, 2 fragments, the all-reduce overlapping 1 step.
const std::vector<std::string> kDiloco = {"optim.name=diloco", "diloco.inner_steps=4", "diloco.fragments=2",
                                          "diloco.delay=1"};

INSTANTIATE_TEST_SUITE_P(
    Default, TpEquivalence,
    ::testing::Values(Case{"ddp", "tp", {}, kDdp1, 2, kDdp2, 4},
                      Case{"fsdp_sequence_parallel", "tp", {}, kFsdp1, 2, plus(kFsdp2, {kSp}), 4},
                      Case{"diloco_streaming", "tp", kDiloco, kReplicas1, 2, kReplicas2, 4}),
    caseName);

INSTANTIATE_TEST_SUITE_P(
    Long, TpEquivalence,
    ::testing::Values(
        Case{"ddp_sequence_parallel", "tp", {}, kDdp1, 2, plus(kDdp2, {kSp}), 4},
        Case{"fsdp", "tp", {}, kFsdp1, 2, kFsdp2, 4},
        // Hybrid within 4 processes: shards over dp_shard, its replica axis of one rank.
        Case{"hybrid", "tp", {"parallel.strategy=hybrid", "parallel.dp_replicate=1", "parallel.dp_shard=2"}, {}, 2,
             {"parallel.tp=2"}, 4},
        Case{"fsdp_grad_accum", "tp", {"train.grad_accum=2"}, kFsdp1, 2, kFsdp2, 4},
        Case{"sgd_ddp", "tp", {"optim.name=sgd", "optim.lr=0.3", "optim.momentum=0.9", "optim.nesterov=true"}, kDdp1, 2,
             kDdp2, 4},
        // Learned positions (wpe on sequence shards), an untied column-parallel head, dropout on shards.
        Case{"learned_untied_dropout_sequence_parallel", "tp",
             {"model.positions=learned", "model.tie_weights=false", "model.dropout=0.1"}, kDdp1, 2,
             plus(kDdp2, {kSp}), 4},
        // 257 rows padded to 2 x 129: the padded logit is in no loss.
        Case{"padded_vocabulary", "tp", {"model.vocab_size=257"}, kDdp1, 2, kDdp2, 4},
        Case{"tp4", "tp", kOneReplica, {}, 1, {"parallel.tp=4"}, 4},
        Case{"tp4_sequence_parallel", "tp", kOneReplica, {}, 1, {"parallel.tp=4", kSp}, 4},
        Case{"mt_dao", "tp", {"optim.name=mt-dao", "optim.lr=3e-3", "mt_dao.sync_params=3", "mt_dao.sync_momenta=[2]"},
             kReplicas1, 2, kReplicas2, 4},
        // Chunks of 16 align with every shard boundary of this model (optim/demo.h): the logical chunks.
        Case{"demo", "tp", {"optim.name=demo", "optim.lr=1e-3", "demo.compression_chunk=16"}, kReplicas1, 2, kReplicas2,
             4}),
    caseName);

// DeMo with chunks that straddle shard boundaries (the default 64 on qkv
// shards of 32-row pieces) runs on per-shard chunks (optim/demo.h): not the
// tp = 1 steps (about 4e-3 apart by step 8), but it must run and train.
TEST(LongTensorParallel, DemoWithChunksAcrossShardBoundariesTrains) {
  const Curve c = train("demo_per_shard", 4, {kTiny, {"optim.name=demo", "optim.lr=1e-3"}, kReplicas2});
  ASSERT_EQ(c.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_GT(c.axisBytes, 0u);
  EXPECT_LT(c.losses.back(), c.losses.front() - 0.1);
}

// ---- Pipelines ----------------------------------------------------------------

class PpEquivalence : public ::testing::TestWithParam<Case> {};
TEST_P(PpEquivalence, LogsTheLossesOfPp1) { expectSameCurve(GetParam()); }

// pp = 2 beside the same data ranks; tp = 1 in both (the config file's tp is 2).
const std::vector<std::string> kPpDdp1 = {"parallel.tp=1", "parallel.strategy=ddp", "parallel.dp_replicate=2"};
const std::vector<std::string> kPpDdp2 = plus(kPpDdp1, {"parallel.pp=2", "pipeline.microbatches=4"});
const std::vector<std::string> kPpFsdp1 = {"parallel.tp=1", "parallel.strategy=fsdp", "parallel.dp_replicate=1",
                                           "parallel.dp_shard=2"};
const std::vector<std::string> kPpFsdp2 = plus(kPpFsdp1, {"parallel.pp=2", "pipeline.microbatches=4"});
const std::vector<std::string> kPpOne = {"parallel.tp=1", "parallel.strategy=none", "parallel.dp_replicate=1"};
const std::vector<std::string> kPp2 = plus(kPpOne, {"parallel.pp=2", "pipeline.microbatches=4"});
std::vector<std::string> schedule(const std::string& name) { return {"pipeline.schedule=" + name}; }
// ZB-V and interleaved cut 2 stages into 4 chunks: 4 blocks.
const std::vector<std::string> kFourBlocks = {"model.n_layer=4"};

INSTANTIATE_TEST_SUITE_P(
    Default, PpEquivalence,
    ::testing::Values(Case{"zb_h1_ddp", "pp", schedule("zb_h1"), kPpDdp1, 2, kPpDdp2, 4},
                      Case{"zb_v", "pp", plus(schedule("zb_v"), kFourBlocks), kPpOne, 1, kPp2, 2}),
    caseName);

INSTANTIATE_TEST_SUITE_P(
    Long, PpEquivalence,
    ::testing::Values(
        Case{"gpipe", "pp", schedule("gpipe"), kPpOne, 1, kPp2, 2},
        Case{"one_f_one_b", "pp", schedule("1f1b"), kPpOne, 1, kPp2, 2},
        Case{"interleaved", "pp", plus(schedule("interleaved_1f1b"), kFourBlocks), kPpOne, 1, kPp2, 2},
        Case{"zb_h2", "pp", schedule("zb_h2"), kPpOne, 1, kPp2, 2},
        Case{"auto", "pp", plus(schedule("auto"), {"pipeline.auto_profile_steps=2"}), kPpOne, 1, kPp2, 2},
        Case{"fsdp_zb_h1", "pp", schedule("zb_h1"), kPpFsdp1, 2, kPpFsdp2, 4},
        Case{"tp2_1f1b", "pp", plus(schedule("1f1b"), {"parallel.tp=2", "parallel.dp_replicate=1"}),
             {"parallel.strategy=none"}, 2,
             plus(kPp2, {"parallel.strategy=none", "parallel.tp=2"}), 4},
        Case{"grad_accum_zb_h1", "pp", plus(schedule("zb_h1"), {"train.grad_accum=2"}), kPpDdp1, 2, kPpDdp2, 4},
        // Dropout: a pipeline micro-batch draws the masks of the same micro-batch under
        // grad_accum (key (step, micro-batch index)), so the reference accumulates 4 x 2 rows
        // (and evaluates the same 16 rows as 8 batches of 2).
        Case{"learned_untied_dropout_1f1b", "pp",
             plus(schedule("1f1b"), {"model.positions=learned", "model.tie_weights=false", "model.dropout=0.1"}),
             plus(kPpOne, {"data.batch_size=2", "train.grad_accum=4", "train.eval_batches=8"}), 1, kPp2, 2},
        // Streaming DiLoCo across 2 replicas of 2 stages: each stage's outer step over dp_replicate.
        Case{"diloco_streaming_zb_h1", "pp", plus(plus(kDiloco, schedule("zb_h1")), {"parallel.tp=1"}), kReplicas1, 2,
             plus(kReplicas1, {"parallel.pp=2", "pipeline.microbatches=4"}), 4},
        Case{"pp4_zb_v", "pp", plus(schedule("zb_v"), {"model.n_layer=8"}), kPpOne, 1,
             plus(kPpOne, {"parallel.pp=4", "pipeline.microbatches=4"}), 4}),
    caseName);

// ---- Experts ------------------------------------------------------------------

class EpEquivalence : public ::testing::TestWithParam<Case> {};
TEST_P(EpEquivalence, LogsTheLossesOfEp1) { expectSameCurve(GetParam()); }

// 4 experts, capacity tight enough that tokens are dropped every step; tp = 1
// unless a case says otherwise (the config file's tp is 2).
const std::vector<std::string> kMoe = {"model.use_moe=true", "model.moe.num_experts=4",
                                       "model.moe.capacity_factor=1.0", "parallel.tp=1"};
const std::vector<std::string> kEpDdp1 = {"parallel.strategy=ddp", "parallel.dp_replicate=2"};
const std::vector<std::string> kEpDdp2 = {"parallel.strategy=ddp", "parallel.dp_replicate=1", "parallel.ep=2"};
const std::vector<std::string> kEpFsdp1 = {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=2"};
const std::vector<std::string> kEpFsdp2 = {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=1",
                                           "parallel.ep=2"};
const std::vector<std::string> kTp2 = {"parallel.tp=2"};

INSTANTIATE_TEST_SUITE_P(Default, EpEquivalence,
                         ::testing::Values(Case{"moe_ddp", "ep", kMoe, kEpDdp1, 2, kEpDdp2, 2},
                                           Case{"moe_ted_dtd_sequence_parallel", "ep", plus(kMoe, kTp2),
                                                kEpDdp1, 4, plus(kEpDdp2, {"parallel.moe_dtd=true", kSp}), 4}),
                         caseName);

INSTANTIATE_TEST_SUITE_P(
    Long, EpEquivalence,
    ::testing::Values(
        Case{"moe_fsdp", "ep", kMoe, kEpFsdp1, 2, kEpFsdp2, 2},
        Case{"moe_top2_sgd", "ep",
             plus(kMoe, {"model.moe.top_k=2", "optim.name=sgd", "optim.lr=0.3", "optim.momentum=0.9"}), kEpDdp1, 2,
             kEpDdp2, 2},
        Case{"moe_ted", "ep", plus(kMoe, kTp2), kEpDdp1, 4, kEpDdp2, 4},
        Case{"moe_ted_dtd", "ep", plus(kMoe, kTp2), kEpDdp1, 4, plus(kEpDdp2, {"parallel.moe_dtd=true"}), 4},
        Case{"moe_ep4", "ep", kMoe, {"parallel.strategy=ddp", "parallel.dp_replicate=4"}, 4,
             {"parallel.strategy=ddp", "parallel.dp_replicate=1", "parallel.ep=4"}, 4},
        Case{"moe_ep2_times_fsdp2", "ep", kMoe,
             {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=4"}, 4,
             {"parallel.strategy=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=2", "parallel.ep=2"}, 4},
        Case{"moe_pipeline_zb_h1", "ep", plus(kMoe, {"parallel.pp=2", "pipeline.microbatches=4",
                                                     "pipeline.schedule=zb_h1"}),
             kEpDdp1, 4, kEpDdp2, 4},
        Case{"moe_hybrid", "ep", kMoe, {"parallel.strategy=hybrid", "parallel.dp_replicate=2", "parallel.dp_shard=2"}, 4,
             {"parallel.strategy=hybrid", "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.ep=2"}, 4},
        Case{"moe_mt_dao", "ep",
             plus(kMoe, {"optim.name=mt-dao", "optim.lr=3e-3", "mt_dao.sync_params=3", "mt_dao.sync_momenta=[2]"}),
             {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.dp_shard=2"}, 4,
             {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.ep=2"}, 4},
        // DiLoCo across 2 replicas, each an ep = 2 group (ddp inside: ep is data-parallel there).
        Case{"moe_diloco", "ep", plus(kMoe, {"optim.name=diloco", "diloco.inner_steps=4"}),
             {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.dp_shard=2"}, 4,
             {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.ep=2"}, 4}),
    caseName);

// DeMo steps by sign(decoded mean): where that mean is rounding noise (an
// expert's gradient summed in another order through the all-to-all), a sign
// flips and the step moves by +-lr. The curve stays on dp_replicate's for
// the first steps and drifts by ~1e-3 by step 8 (measured), so it is only
// checked to run, train and send over ep.
TEST(LongExpertParallel, DemoTrains) {
  const Curve c = train("moe_demo", 4,
                        {kTiny, kMoe, {"optim.name=demo", "optim.lr=1e-3", "demo.compression_chunk=16"},
                         {"parallel.strategy=ddp", "parallel.dp_replicate=2", "parallel.ep=2"}},
                        "ep");
  ASSERT_EQ(c.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_GT(c.axisBytes, 0u);
  EXPECT_LT(c.losses.back(), c.losses.front() - 0.1);
}

// Checkpoints reshard across ep degrees: 8 steps at one layout saving at
// step 4, then the other layout resumed from step 4 logs that run's steps 5-8.
// (Both runs have train.steps = 8: the learning-rate schedule spans it.)
Curve trainMoe(const std::string& tag, const std::vector<std::string>& mesh, const std::vector<std::string>& args) {
  return train(tag, 2, {kTiny, kMoe, mesh}, "ep", args);
}

void expectResumedCurve(const std::vector<std::string>& first, const std::vector<std::string>& second,
                        const std::string& tag, bool checkExport) {
  const std::string dir = ::testing::TempDir() + "ep_ckpt_" + tag + "_" + std::to_string(getpid());
  const Curve head = trainMoe(tag + "_head", first, {"--checkpoint-dir", dir, "--checkpoint-every", "4"});
  const Curve tail = trainMoe(tag + "_tail", second, {"--resume", dir + "/step-00000004"});
  EXPECT_EQ(head.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_EQ(tail.losses.size(), static_cast<size_t>(kSteps / 2)) << "the resumed run logs steps 5-8";
  for (size_t i = 0; i < tail.losses.size() && kSteps / 2 + i < head.losses.size(); ++i) {
    EXPECT_NEAR(tail.losses[i], head.losses[kSteps / 2 + i], kTolerance) << tag << ": step " << kSteps / 2 + i + 1;
  }
  if (checkExport) {
    // tessera-export writes the whole model: every expert of every layer, whichever rank held it.
    const std::string file = dir + "/model.safetensors";
    const ProcessResult exported =
        runProcess({TESSERA_EXPORT_PATH, dir + "/step-00000004", file}, std::chrono::seconds(60));
    EXPECT_EQ(exported.exitCode, 0) << exported.output;
    std::ifstream in(file, std::ios::binary);
    uint64_t headerBytes = 0;
    in.read(reinterpret_cast<char*>(&headerBytes), sizeof headerBytes);
    std::string header(headerBytes, '\0');
    in.read(header.data(), static_cast<std::streamsize>(headerBytes));
    const nlohmann::json names = nlohmann::json::parse(header);
    for (int block = 0; block < 2; ++block) {
      for (int e = 0; e < 4; ++e) {
        const std::string name = "blocks." + std::to_string(block) + ".moe.experts." + std::to_string(e) + ".fc.weight";
        EXPECT_TRUE(names.contains(name)) << tag << ": the export lacks " << name;
      }
    }
    // model.init_from loads that whole file into either layout's experts: the same first loss, not the fresh init's.
    const Curve fromFileFirst = trainMoe(tag + "_init_first", first, {"--set", "model.init_from=" + file});
    const Curve fromFileSecond = trainMoe(tag + "_init_second", second, {"--set", "model.init_from=" + file});
    EXPECT_FALSE(fromFileFirst.losses.empty() || fromFileSecond.losses.empty() || head.losses.empty());
    if (!fromFileFirst.losses.empty() && !fromFileSecond.losses.empty() && !head.losses.empty()) {
      EXPECT_NEAR(fromFileFirst.losses[0], fromFileSecond.losses[0], kTolerance) << tag << ": init_from";
      EXPECT_GT(std::abs(fromFileFirst.losses[0] - head.losses[0]), 10 * kTolerance) << tag << ": init_from loaded nothing";
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(EpCheckpoint, Ep2ResumesAtEp1AndBack) {
  expectResumedCurve(kEpDdp2, kEpDdp1, "ep2_to_ep1", /*checkExport=*/true);
  expectResumedCurve(kEpDdp1, kEpDdp2, "ep1_to_ep2", /*checkExport=*/false);
}

}  // namespace
}  // namespace tessera
