// MoeLoadCollector (parallel/moe_load.h) on 2 real processes: each rank runs
// training forwards of a small MoE GPT on its own batches, with capacity small
// enough that choices are dropped; the collected counters must equal a count
// made in one process from MoeFeedForwardImpl::route on BOTH ranks' tokens
// (each block's MoE input recomputed from the block's pieces). Also: eval
// forwards count nothing; ranks holding different blocks (a pipeline split);
// the Trainer's extraMetrics hook on every rank and the "moe" object of the
// metrics line.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/gpt_part.h"
#include "tessera/parallel/moe_load.h"
#include "tessera/train/trainer.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr int64_t kBatch = 4;
constexpr int64_t kLength = 8;
constexpr int64_t kExperts = 4;

// S = B * T = 32 tokens per forward; capacity factor 0.5 gives C = 4 (the
// minimum) against 8 choices per expert on average (top-1): drops every forward.
models::GptConfig moeGpt(int64_t topK) {
  models::GptConfig c = testing::smallGpt(/*tied=*/false);
  c.dropout = 0.0;  // so a training forward routes what the reference's eval forward routes
  c.use_moe = true;
  c.moe.num_experts = kExperts;
  c.moe.top_k = topK;
  c.moe.capacity_factor = 0.5;
  return c;
}

// Rank `rank`'s forward `forward`: different tokens for every pair.
at::Tensor batchOf(int rank, int forward) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + 10 * rank + forward);
  return at::randint(0, 29, {kBatch, kLength}, gen, at::kLong);
}

// Adds one forward's routing counts of global block `block` on hidden state x
// (B, T, C) to out[block], counted from route()'s outputs by hand; returns the
// block's output. `reference` holds the block and is in eval mode (counts nothing).
at::Tensor countBlock(models::GptImpl& reference, int64_t block, const at::Tensor& x,
                      std::map<int64_t, models::MoeLoad>& out) {
  models::BlockImpl& b = reference.blocks->at(reference.blocks->positionOf(block));
  const at::Tensor tokens = b.ln2->forward(x + b.attn->forward(b.ln1->forward(x))).reshape({-1, x.size(-1)});
  const models::MoeRouting routing = b.moe->route(tokens);
  const models::MoeConfig& mc = b.moe->config();
  models::MoeLoad& load = out[block];
  load.routed.resize(static_cast<size_t>(mc.num_experts), 0);
  load.choices += routing.expert.numel();
  load.dropped += (routing.slot < 0).sum().item<int64_t>();
  load.capacity += models::moeCapacity(tokens.size(0), mc.num_experts, mc.capacity_factor, mc.top_k);
  for (int64_t e = 0; e < mc.num_experts; ++e) load.routed[e] += (routing.expert == e).sum().item<int64_t>();
  return b.forward(x);
}

// Every block of the whole-model `reference` on token batch idx.
void countWholeForward(models::GptImpl& reference, const at::Tensor& idx, std::map<int64_t, models::MoeLoad>& out) {
  at::Tensor x = reference.embed(idx);
  for (int64_t block : reference.blocks->globalIndices()) x = countBlock(reference, block, x, out);
}

void checkLayer(const MoeLayerLoad& got, const models::MoeLoad& want, const std::string& what) {
  TESSERA_CHECK(got.counts.choices == want.choices && got.counts.dropped == want.dropped &&
                    got.counts.capacity == want.capacity && got.counts.routed == want.routed,
                what << " block " << got.block << ": collected choices/dropped/capacity " << got.counts.choices << "/"
                     << got.counts.dropped << "/" << got.counts.capacity << ", route() counts " << want.choices
                     << "/" << want.dropped << "/" << want.capacity);
}

// Both ranks: two training forwards each, different batches, and an eval
// forward in between; collect() equals route() over all four batches.
TESSERA_WORKER(moe_load_matches_route) {
  const comm::CommPtr world = ctx.world();
  const models::GptConfig config = moeGpt(std::stoll(ctx.arg("top_k")));
  models::Gpt model(config);
  model->train();
  MoeLoadCollector collector(*model, config.n_layer, kExperts, world);
  torch::NoGradGuard noGrad;
  model->forward(batchOf(ctx.rank, 0));
  model->eval();
  model->forward(batchOf(ctx.rank, 7));  // eval: not counted
  model->train();
  model->forward(batchOf(ctx.rank, 1));
  const MoeLoadReport report = collector.collect();

  models::Gpt reference(config);
  reference->eval();
  std::map<int64_t, models::MoeLoad> want;
  for (int r = 0; r < 2; ++r) {
    for (int f = 0; f < 2; ++f) countWholeForward(*reference, batchOf(r, f), want);
  }
  TESSERA_CHECK(report.layers.size() == 2 && report.layers[0].block == 0 && report.layers[1].block == 1,
                "want layers of blocks 0 and 1, got " << report.layers.size());
  int64_t dropped = 0;
  int64_t choices = 0;
  for (const MoeLayerLoad& layer : report.layers) {
    checkLayer(layer, want.at(layer.block), "training forwards");
    dropped += layer.counts.dropped;
    choices += layer.counts.choices;
    const std::vector<double> load = layer.load();
    for (int64_t e = 0; e < kExperts; ++e) {
      const double expected = static_cast<double>(want.at(layer.block).routed[e]) /
                              static_cast<double>(want.at(layer.block).capacity);
      TESSERA_CHECK(load[e] == expected, "block " << layer.block << " expert " << e << " load " << load[e]);
    }
  }
  TESSERA_CHECK(dropped > 0, "the test needs drops; none happened");
  TESSERA_CHECK(choices == 2 * 2 * 2 * kBatch * kLength * config.moe.top_k,
                "choices = layers x ranks x forwards x tokens x k, got " << choices);
  TESSERA_CHECK(report.droppedFraction() == static_cast<double>(dropped) / static_cast<double>(choices),
                "overall dropped fraction " << report.droppedFraction());

  // The metrics object: rounded values of the same report.
  const nlohmann::json json = nlohmann::json::parse(report.toMetrics().toJson());
  TESSERA_CHECK(std::abs(json["dropped"].get<double>() - report.droppedFraction()) <= 0.5e-4 + 1e-12, json.dump());
  for (const MoeLayerLoad& layer : report.layers) {
    const auto& entry = json["layers"][std::to_string(layer.block)];
    TESSERA_CHECK(std::abs(entry["dropped"].get<double>() - layer.droppedFraction()) <= 0.5e-4 + 1e-12, json.dump());
    TESSERA_CHECK(entry["load"].size() == static_cast<size_t>(kExperts), json.dump());
    for (int64_t e = 0; e < kExperts; ++e) {
      TESSERA_CHECK(std::abs(entry["load"][std::to_string(e)].get<double>() - layer.load()[e]) <= 0.5e-3 + 1e-12,
                    json.dump());
    }
  }

  // Counters reset at collect(); eval forwards count nothing.
  model->eval();
  model->forward(batchOf(ctx.rank, 2));
  const MoeLoadReport evalOnly = collector.collect();
  TESSERA_CHECK(evalOnly.layers.size() == 2, "held layers are reported even with nothing counted");
  for (const MoeLayerLoad& layer : evalOnly.layers) {
    TESSERA_CHECK(layer.counts.choices == 0 && layer.counts.capacity == 0 && layer.droppedFraction() == 0.0,
                  "block " << layer.block << " counted " << layer.counts.choices << " choices in eval mode");
  }
}

TEST(MoeLoad, TwoRanksMatchRouteOnEveryRanksTokensTop1) {
  auto result = testing::runWorkers("moe_load_matches_route", {.ranks = 2, .args = {{"top_k", "1"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(MoeLoad, TwoRanksMatchRouteOnEveryRanksTokensTop2) {
  auto result = testing::runWorkers("moe_load_matches_route", {.ranks = 2, .args = {{"top_k", "2"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

// A pipeline-like split: rank 0 holds the embedding and block 0, rank 1 only
// block 1 (fed its own hidden state). Each layer is counted by its holder
// alone; both ranks agree on the report.
TESSERA_WORKER(moe_load_stage_split) {
  const comm::CommPtr world = ctx.world();
  const models::GptConfig config = moeGpt(1);
  models::GptPart part;
  part.all_blocks = false;
  part.embedding = ctx.rank == 0;
  part.head = false;
  part.blocks = {ctx.rank};
  models::Gpt stage(config, part);
  stage->train();
  MoeLoadCollector collector(*stage, config.n_layer, kExperts, world);
  TESSERA_CHECK(collector.heldBlocks() == std::vector<int64_t>{ctx.rank}, "held blocks");

  models::Gpt reference(config);
  reference->eval();
  torch::NoGradGuard noGrad;
  // Rank 1's input: the output of block 0 on its batch (as a stage would receive).
  const at::Tensor hidden = reference->blocks->at(0).forward(reference->embed(batchOf(1, 0)));
  if (ctx.rank == 0) {
    stage->runBlocks(stage->embed(batchOf(0, 0)), 0, 1);
  } else {
    stage->runBlocks(hidden, 1, 2);
  }
  const MoeLoadReport report = collector.collect();

  std::map<int64_t, models::MoeLoad> want;
  countBlock(*reference, 0, reference->embed(batchOf(0, 0)), want);
  countBlock(*reference, 1, hidden, want);
  TESSERA_CHECK(report.layers.size() == 2, "want both blocks' layers, got " << report.layers.size());
  for (const MoeLayerLoad& layer : report.layers) checkLayer(layer, want.at(layer.block), "stage split");
  TESSERA_CHECK(report.layers[1].counts.choices == kBatch * kLength, "block 1 counted once (rank 1's tokens)");
}

TEST(MoeLoad, RanksHoldingDifferentBlocksReportEachLayerOnce) {
  auto result = testing::runWorkers("moe_load_stage_split", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

// The Trainer over DDP on 2 ranks, the collector's hook as extraMetrics: it
// runs on both ranks at every logged step (rank 1 has no writer), and the
// first line's "moe" object is step 1's training forwards on both ranks'
// batches -- the validation forwards before the line are not counted.
TESSERA_WORKER(moe_load_trainer_hook) {
  const comm::CommPtr world = ctx.world();
  const models::GptConfig config = moeGpt(1);
  models::Gpt gpt(config);
  std::unique_ptr<TrainableModel> model = makeTrainable(gpt);
  std::unique_ptr<DataParallel> dp = makeDdpDataParallel(*gpt, world);
  optim::OptimizerConfig oc;
  std::unique_ptr<optim::Optimizer> optimizer = optim::makeOptimizer(oc, dp->optimizerParameters(), 0.01);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const data::LmDataset dataset(at::randint(0, 29, {kLength * 64 + 1}, gen, at::kLong).to(at::kByte), kLength);
  data::DistributedSampler::Options so;
  so.batchSize = kBatch;
  so.seed = 3;
  so.dpRank = ctx.rank;
  so.dpSize = 2;
  std::unique_ptr<BatchSource> train = makeBatchSource(dataset, so);
  data::DistributedSampler::Options vo = so;
  vo.shuffle = false;
  std::unique_ptr<BatchSource> val = makeBatchSource(dataset, vo);

  // Step 1's batches of both ranks, and their counts on the initial weights.
  models::Gpt reference(config);
  reference->eval();
  std::map<int64_t, models::MoeLoad> want;
  {
    torch::NoGradGuard noGrad;
    for (int r = 0; r < 2; ++r) {
      data::DistributedSampler::Options ro = so;
      ro.dpRank = r;
      countWholeForward(*reference, makeBatchSource(dataset, ro)->next().inputs, want);
    }
  }

  MoeLoadCollector collector(*gpt, config.n_layer, kExperts, world);
  const std::string path = ctx.arg("path");
  std::unique_ptr<MetricsWriter> writer = ctx.rank == 0 ? std::make_unique<MetricsWriter>(path) : nullptr;
  TrainerParts parts;
  parts.model = model.get();
  parts.dp = dp.get();
  parts.optimizer = optimizer.get();
  optim::LrScheduleConfig lc;
  lc.lr = 0.01;
  lc.min_lr = 0.001;
  parts.schedule = optim::makeLrSchedule(lc, 2);
  parts.train = train.get();
  parts.val = val.get();
  parts.dataComm = world;
  parts.metrics = writer.get();
  int calls = 0;
  parts.extraMetrics = [&calls, hook = collector.metricsHook()](MetricsRecord& record) {
    ++calls;
    hook(record);
  };
  TrainConfig tc;
  tc.steps = 2;
  tc.log_every = 1;
  tc.eval_every = 1;
  tc.eval_batches = 1;
  tc.clip = 0;
  tc.seed = 11;
  tc.progress = false;
  Trainer(parts, tc).run();
  TESSERA_CHECK(calls == 2, "rank " << ctx.rank << ": extraMetrics ran " << calls << " times, want 2");
  if (ctx.rank != 0) return;
  writer.reset();  // flushes and closes

  std::ifstream in(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  TESSERA_CHECK(lines.size() == 2, "want 2 metrics lines, got " << lines.size());
  for (const auto& line : lines) TESSERA_CHECK(line.contains("moe") && line.contains("val_loss"), line.dump());
  const nlohmann::json& moe = lines[0]["moe"];
  int64_t dropped = 0;
  int64_t choices = 0;
  for (const auto& [block, load] : want) {
    dropped += load.dropped;
    choices += load.choices;
    const auto& entry = moe["layers"][std::to_string(block)];
    const double fraction = static_cast<double>(load.dropped) / static_cast<double>(load.choices);
    TESSERA_CHECK(std::abs(entry["dropped"].get<double>() - fraction) <= 0.5e-4 + 1e-12,
                  "block " << block << " dropped " << fraction << ": " << moe.dump());
    for (int64_t e = 0; e < kExperts; ++e) {
      const double expected = static_cast<double>(load.routed[e]) / static_cast<double>(load.capacity);
      TESSERA_CHECK(std::abs(entry["load"][std::to_string(e)].get<double>() - expected) <= 0.5e-3 + 1e-12,
                    "block " << block << " expert " << e << " load " << expected << ": " << moe.dump());
    }
  }
  TESSERA_CHECK(dropped > 0, "the test needs drops; none happened");
  const double fraction = static_cast<double>(dropped) / static_cast<double>(choices);
  TESSERA_CHECK(std::abs(moe["dropped"].get<double>() - fraction) <= 0.5e-4 + 1e-12, moe.dump());
}

TEST(MoeLoad, TrainerHookRunsOnEveryRankAndWritesTheLine) {
  const std::string path = ::testing::TempDir() + "moe_load_" + std::to_string(getpid()) + ".jsonl";
  auto result = testing::runWorkers("moe_load_trainer_hook", {.ranks = 2, .args = {{"path", path}}});
  std::remove(path.c_str());
  ASSERT_TRUE(result.ok()) << result.report();
}

// Local checks of the constructor: the whole model's sizes are required.
TEST(MoeLoad, ConstructorRejectsSizesThatDoNotFitTheModel) {
  models::Gpt model(moeGpt(1));  // n_layer = 2, 4 experts
  const comm::CommPtr single = comm::makeSingleRankCommunicator();
  EXPECT_THROW(MoeLoadCollector(*model, 1, kExperts, single), InvalidArgument);  // block 1 >= n_layer
  EXPECT_THROW(MoeLoadCollector(*model, 2, 8, single), InvalidArgument);         // 4 experts, not 8
  EXPECT_THROW(MoeLoadCollector(*model, 2, kExperts, nullptr), InvalidArgument);
  MoeLoadCollector collector(*model, 2, kExperts, single);
  EXPECT_EQ(collector.heldBlocks(), (std::vector<int64_t>{0, 1}));
  // A dense GPT has no MoE layer: nothing to report, the hook adds nothing.
  models::Gpt dense(testing::smallGpt(false));
  MoeLoadCollector none(*dense, 2, kExperts, single);
  MetricsRecord record;
  none.metricsHook()(record);
  EXPECT_EQ(record.toJson(), "{}");
}

}  // namespace
}  // namespace tessera::parallel
