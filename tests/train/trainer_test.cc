// The Trainer's pieces on a small MLP and synthetic data (fast, one process),
// and the Trainer over DDP on 2 ranks against one process with the global batch.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <fstream>
#include <set>

#include "tessera/train/trainer.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/fixtures.h"

namespace tessera {
namespace {

using testing::syntheticDataset;

// One model + data-parallel strategy + optimizer + data, for a Trainer.
struct Rig {
  models::MlpClassifier mlp{nullptr};
  std::unique_ptr<TrainableModel> model;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train;
  std::unique_ptr<BatchSource> val;
  comm::CommPtr dpComm;

  Rig(int64_t batchSize, const std::string& optimizerName, double dropout = 0.0, comm::CommPtr comm = nullptr)
      : dpComm(std::move(comm)) {
    models::MlpClassifierConfig mc;
    mc.input_dim = 8;
    mc.hidden_sizes = {16};
    mc.num_classes = 3;
    mc.dropout = dropout;
    mlp = models::MlpClassifier(mc);
    model = makeTrainable(mlp);
    dp = dpComm ? parallel::makeDdpDataParallel(*mlp, dpComm) : parallel::makeNoDataParallel(*mlp);
    optim::OptimizerConfig oc;
    oc.name = optimizerName;
    optimizer = optim::makeOptimizer(oc, dp->optimizerParameters(), 0.05);
    data::DistributedSampler::Options so;
    so.batchSize = batchSize;
    so.seed = 3;
    so.dpRank = dpComm ? dpComm->rank() : 0;
    so.dpSize = dpComm ? dpComm->size() : 1;
    train = makeBatchSource(syntheticDataset(), so);
    so.shuffle = false;
    val = makeBatchSource(syntheticDataset(), so);
  }

  TrainerParts parts(MetricsWriter* metrics = nullptr) {
    TrainerParts p;
    p.model = model.get();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    optim::LrScheduleConfig lc;
    lc.lr = 0.05;
    lc.min_lr = 0.005;
    lc.warmup_steps = 2;
    p.schedule = optim::makeLrSchedule(lc, 8);
    p.train = train.get();
    p.val = val.get();
    p.dataComm = dpComm;
    p.metrics = metrics;
    return p;
  }

  at::Tensor flatParameters() const {
    std::vector<at::Tensor> flat;
    for (const auto& p : mlp->parameters()) flat.push_back(p.detach().flatten());
    return torch::cat(flat);
  }
};

TrainConfig smallConfig(int64_t steps) {
  TrainConfig c;
  c.steps = steps;
  c.clip = 0;
  c.eval_every = 2;
  c.eval_batches = 2;
  c.log_every = 2;
  c.seed = 11;
  c.progress = false;
  return c;
}

// k micro-batches of b accumulate to the gradient of one batch of k*b.
TEST(Trainer, GradientAccumulationEqualsABiggerBatch) {
  Rig small(8, "sgd");
  TrainConfig c = smallConfig(3);
  c.grad_accum = 2;
  Trainer(small.parts(), c).run();

  Rig big(16, "sgd");
  Trainer(big.parts(), smallConfig(3)).run();
  testing::expectTensorsEqual(small.flatParameters(), big.flatParameters(), "parameters", 1e-6, 1e-5);
}

TEST(Trainer, MetricsLinesHaveExactlyTheDocumentedFields) {
  const std::string path = ::testing::TempDir() + "trainer_metrics_" + std::to_string(getpid()) + ".jsonl";
  {
    Rig rig(8, "adamw");
    MetricsWriter writer(path);
    TrainConfig c = smallConfig(5);
    c.eval_every = 4;
    Trainer(rig.parts(&writer), c).run();
  }
  std::ifstream in(path);
  std::string line;
  std::vector<nlohmann::json> lines;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u);  // steps 2, 4, and the last (5)
  const std::set<std::string> base = {"step", "loss", "lr", "tokens", "tokens_per_s", "time_s",
                                      "compute_s", "comm_s", "comm_bytes", "comm"};
  for (size_t i = 0; i < lines.size(); ++i) {
    std::set<std::string> keys;
    for (auto it = lines[i].begin(); it != lines[i].end(); ++it) keys.insert(it.key());
    std::set<std::string> expected = base;
    if (i > 0) expected.insert("val_loss");  // evaluated after step 4 and the last step
    EXPECT_EQ(keys, expected) << lines[i].dump();
  }
  EXPECT_EQ(lines[0]["step"], 2);
  EXPECT_EQ(lines[2]["step"], 5);
  EXPECT_EQ(lines[2]["tokens"], 5 * 8);
  EXPECT_GT(lines[2]["time_s"].get<double>(), 0.0);
  EXPECT_EQ(lines[2]["comm_bytes"], 0);  // one replica: no communication
  EXPECT_TRUE(lines[2]["comm"].is_object() && lines[2]["comm"].empty()) << lines[2].dump();
  std::remove(path.c_str());
}

TEST(Trainer, CallbacksFireAtStepAndEvalBoundaries) {
  Rig rig(8, "adamw");
  Trainer trainer(rig.parts(), smallConfig(5));  // evaluates after steps 2, 4, 5
  std::vector<int64_t> before, after, evals;
  trainer.callbacks().beforeStep.push_back([&](int64_t step) { before.push_back(step); });
  trainer.callbacks().afterStep.push_back([&](const StepReport& r) { after.push_back(r.step); });
  trainer.callbacks().afterEval.push_back([&](int64_t step, double loss) {
    EXPECT_TRUE(std::isfinite(loss));
    evals.push_back(step);
  });
  int outer = 0;
  trainer.callbacks().afterOuterStep.push_back([&](const StepReport&) { ++outer; });
  const StepReport last = trainer.run();
  EXPECT_EQ(before, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(after, (std::vector<int64_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(evals, (std::vector<int64_t>{2, 4, 5}));
  EXPECT_EQ(outer, 0);  // AdamW has no outer step
  EXPECT_EQ(last.step, 5);
  ASSERT_TRUE(last.valLoss.has_value());
}

// Stop after 3 steps, snapshot, rebuild everything, restore, run to 6: the
// same parameters as 6 uninterrupted steps. Dropout makes the RNG matter.
TEST(Trainer, SnapshotRestoreContinuesIdentically) {
  Rig straight(8, "adamw", 0.2);
  Trainer(straight.parts(), smallConfig(6)).run();

  Rig first(8, "adamw", 0.2);
  Trainer firstTrainer(first.parts(), smallConfig(6));
  firstTrainer.callbacks().beforeStep.push_back([](int64_t step) {
    if (step == 3) throw std::runtime_error("interrupted");
  });
  EXPECT_THROW(firstTrainer.run(), std::runtime_error);
  const TrainingState state = firstTrainer.snapshot();
  EXPECT_EQ(state.step, 3);

  Rig second(8, "adamw", 0.2);
  {
    torch::NoGradGuard noGrad;
    auto from = first.mlp->parameters();
    auto to = second.mlp->parameters();
    for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
  }
  Trainer secondTrainer(second.parts(), smallConfig(6));
  secondTrainer.restore(state);
  secondTrainer.run();
  testing::expectTensorsEqual(second.flatParameters(), straight.flatParameters(), "parameters");
}

TEST(Trainer, MissingPartIsAnError) {
  Rig rig(8, "sgd");
  TrainerParts parts = rig.parts();
  parts.optimizer = nullptr;
  EXPECT_THROW(Trainer(parts, smallConfig(1)), InvalidArgument);
  TrainConfig bad = smallConfig(1);
  bad.grad_accum = 0;
  try {
    Trainer(rig.parts(), bad);
    FAIL() << "grad_accum 0 accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "train.grad_accum");
  }
}

// Each rank trains with DDP on its half of the batch; then it trains a local
// replica with the whole batch, which must end with the same parameters.
TESSERA_WORKER(trainer_ddp_matches_one_process) {
  const comm::CommPtr world = ctx.world();
  Rig ddp(8, "adamw", 0.0, world);
  const StepReport report = Trainer(ddp.parts(), smallConfig(4)).run();
  TESSERA_CHECK(report.commBytes > 0, "DDP sent no bytes");
  TESSERA_CHECK(report.tokens == 4 * 16, "tokens count every rank's batch, got " << report.tokens);

  Rig single(16, "adamw");
  Trainer(single.parts(), smallConfig(4)).run();
  testing::expectTensorsEqual(ddp.flatParameters(), single.flatParameters(), "DDP vs one process", 1e-6, 1e-5);
}

TEST(Trainer, DdpOnTwoRanksMatchesOneProcessWithTheGlobalBatch) {
  auto result = testing::runWorkers("trainer_ddp_matches_one_process", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

// The per-communicator entries of a step report sum to its totals: DDP's
// communicator (bytes from its stats, exposed time from the strategy), a
// second communicator the loop does not drive (all its time is exposed), and
// a group counted by a function (as the elastic group is).
TESSERA_WORKER(trainer_traffic_entries_sum_to_totals) {
  const comm::CommPtr world = ctx.world();
  const comm::CommPtr other = world->split(0, world->rank(), "side");
  Rig ddp(8, "adamw", 0.0, world);
  TrainerParts parts = ddp.parts();
  parts.traffic = {TrafficSource{"dp_replicate", world, {}, {}}, TrafficSource{"side", other, {}, {}},
                   TrafficSource{"elastic", nullptr, [] { return uint64_t{1000}; }, [] { return 0.25; }}};
  Trainer trainer(parts, smallConfig(3));
  trainer.callbacks().beforeStep.push_back([&](int64_t) {
    at::Tensor t = at::ones({256});
    other->allReduce(t, comm::ReduceOp::kSum);  // traffic on "side" every step
  });
  const StepReport report = trainer.run();
  TESSERA_CHECK(report.comm.size() == 3, "expected 3 entries, got " << report.comm.size());
  uint64_t bytes = 0;
  double seconds = 0;
  for (const auto& [name, traffic] : report.comm) {
    bytes += traffic.bytesSent;
    seconds += traffic.exposedSeconds;
  }
  TESSERA_CHECK(bytes == report.commBytes, "entries sum to " << bytes << " bytes, total " << report.commBytes);
  TESSERA_CHECK(std::abs(seconds - report.commSeconds) < 1e-9,
                "entries sum to " << seconds << " s, total " << report.commSeconds);
  TESSERA_CHECK(report.comm.at("elastic").bytesSent == 1000, "function-counted group");
  TESSERA_CHECK(report.comm.at("side").bytesSent == other->stats().totalBytesSent(), "side bytes");
  TESSERA_CHECK(report.comm.at("side").bytesSent > 0 && report.comm.at("dp_replicate").bytesSent > 0,
                "both communicators carried traffic");
  const double ddpExposed = ddp.dp->stats().exposedSecondsByComm.at(world->name());
  TESSERA_CHECK(std::abs(report.comm.at("dp_replicate").exposedSeconds - ddpExposed) < 1e-9,
                "DDP's communicator reports the strategy's exposed time");
}

TEST(Trainer, PerCommunicatorTrafficSumsToTheTotals) {
  auto result = testing::runWorkers("trainer_traffic_entries_sum_to_totals", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera
