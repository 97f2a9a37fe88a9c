// parallelize(): the [parallel] config reconciled once (errors name the key,
// the axis and the degrees), the plan every layout gets, the named
// communicators the metrics count, who reports, and gradNorm over logical
// parameters (each counted once) against a single-process reference.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "tessera/core/error.h"
#include "tessera/parallel/parallelize.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/checks.h"

namespace tessera::parallel {
namespace {

using testing::configErrorOf;

ParallelConfig configOf(int dpReplicate, int dpShard, const std::string& strategy) {
  ParallelConfig c;
  c.mesh.dp_replicate = dpReplicate;
  c.mesh.dp_shard = dpShard;
  c.strategy = strategy;
  return c;
}


bool mentions(const ConfigError& e, const std::string& text) {
  return std::string(e.what()).find(text) != std::string::npos;
}

TEST(ParallelConfigResolve, ErrorsNameTheKeyTheAxisAndTheDegrees) {
  ConfigError e = configErrorOf([] { configOf(2, 2, "ddp").resolve(4, false); });
  EXPECT_EQ(e.field(), "parallel.dp_shard");
  EXPECT_TRUE(mentions(e, "got 2")) << e.what();

  e = configErrorOf([] { configOf(2, 1, "ddp").resolve(3, false); });
  EXPECT_EQ(e.field(), "parallel");
  EXPECT_TRUE(mentions(e, "= 2 but the world has 3 ranks")) << e.what();

  ParallelConfig ep = configOf(1, 1, "none");
  ep.mesh.ep = 2;
  e = configErrorOf([&] { ep.resolve(2, false); });  // ranks along ep read different batches: gradients must sync
  EXPECT_EQ(e.field(), "parallel.strategy");
  EXPECT_TRUE(mentions(e, "parallel.ep (2)")) << e.what();
  ep.strategy = "ddp";
  EXPECT_NO_THROW(ep.resolve(2, false));

  // Pipelines run (pp = 2 resolves); their own keys are checked with it.
  ParallelConfig pp = configOf(1, 1, "none");
  pp.mesh.pp = 2;
  EXPECT_NO_THROW(pp.resolve(2, false));
  pp.pipeline.schedule = "zb_h9";
  e = configErrorOf([&] { pp.resolve(2, false); });
  EXPECT_EQ(e.field(), "pipeline.schedule");
  EXPECT_TRUE(mentions(e, "zb_h1")) << e.what();

  ParallelConfig zero = configOf(1, 1, "none");
  zero.mesh.tp = 0;
  e = configErrorOf([&] { zero.resolve(1, false); });
  EXPECT_EQ(e.field(), "parallel.tp");
  EXPECT_TRUE(mentions(e, "axis tp must be >= 1, got 0")) << e.what();

  e = configErrorOf([] { configOf(2, 1, "hybrid").resolve(2, /*localUpdates=*/true); });
  EXPECT_EQ(e.field(), "parallel.strategy");
  e = configErrorOf([] { configOf(1, 1, "zero").resolve(1, false); });
  EXPECT_EQ(e.field(), "parallel.strategy");
  // Another prefix (the C++ API's own sections) names its own keys.
  e = configErrorOf([] { configOf(2, 2, "fsdp").resolve(4, false, "job.parallel."); });
  EXPECT_EQ(e.field(), "job.parallel.dp_replicate");
}

// The device check of the C++ API (parallelize() runs it before any
// collective): NCCL only on CUDA, and on CUDA only what is device-generic.
TEST(ParallelConfigValidateDevice, NcclNeedsCudaAndCudaRefusesCpuOnlyParts) {
  ParallelConfig nccl = configOf(1, 1, "ddp");
  nccl.backend = "nccl";
  EXPECT_NO_THROW(nccl.resolve(1, false));
  ConfigError e = configErrorOf([&] { nccl.validateDevice(/*cuda=*/false, false); });
  EXPECT_EQ(e.field(), "parallel.backend");
  EXPECT_TRUE(mentions(e, "set train.device = \"cuda\"")) << e.what();
  EXPECT_NO_THROW(configOf(2, 1, "ddp").validateDevice(true, false));
  EXPECT_NO_THROW(configOf(4, 1, "hybrid").validateDevice(false, false));  // the CPU: nothing refused

  e = configErrorOf([] { configOf(1, 2, "fsdp").validateDevice(true, false, "adamw", "job.device", "job.parallel."); });
  EXPECT_EQ(e.field(), "job.parallel.strategy");
  EXPECT_TRUE(mentions(e, "job.device = \"cuda\"")) << e.what();
  ParallelConfig tp = configOf(1, 1, "none");
  tp.mesh.tp = 2;
  EXPECT_EQ(configErrorOf([&] { tp.validateDevice(true, false); }).field(), "parallel.tp");
  EXPECT_EQ(configErrorOf([] { configOf(2, 1, "ddp").validateDevice(true, /*localUpdates=*/true); }).field(),
            "optim.name");
  ParallelConfig gloo = configOf(1, 1, "none");
  gloo.backend = "gloo";
  EXPECT_EQ(configErrorOf([&] { gloo.validateDevice(true, false); }).field(), "parallel.backend");
}

TEST(ParallelConfigResolve, PlanPerStrategy) {
  using A = MeshAxis;
  EXPECT_EQ(configOf(4, 1, "ddp").resolve(4, false).gradientAxes, std::vector<A>{A::kDpReplicate});
  EXPECT_EQ(configOf(1, 4, "fsdp").resolve(4, false).gradientAxes, std::vector<A>{A::kDpShard});
  EXPECT_EQ(configOf(2, 2, "hybrid").resolve(4, false).gradientAxes, (std::vector<A>{A::kDpReplicate, A::kDpShard}));
  EXPECT_TRUE(configOf(1, 1, "none").resolve(1, false).gradientAxes.empty());
  // Local updates: the strategy runs inside a replica, over dp_shard.
  EXPECT_EQ(configOf(2, 2, "ddp").resolve(4, true).gradientAxes, std::vector<A>{A::kDpShard});
  EXPECT_TRUE(configOf(2, 1, "none").resolve(2, true).gradientAxes.empty());
}

models::GptConfig tinyGpt() {
  models::GptConfig c;
  c.vocab_size = 32;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 16;
  c.seed = 3;
  return c;
}

// Rank r's batch of a 4-sequence global batch (the same on every rank).
Batch batchOf(int rank, int ranks) {
  torch::manual_seed(17);
  const at::Tensor tokens = torch::randint(0, 32, {4, 9}, torch::kLong);
  const int64_t per = 4 / ranks;
  Batch b;
  b.inputs = tokens.narrow(0, rank * per, per).narrow(1, 0, 8).contiguous();
  b.targets = tokens.narrow(0, rank * per, per).narrow(1, 1, 8).contiguous();
  b.tokens = b.inputs.numel();
  return b;
}

// The gradient norm of one process on the whole batch, over unique parameters.
double referenceGradNorm() {
  models::Gpt gpt(tinyGpt());
  gpt->loss(batchOf(0, 1).inputs, batchOf(0, 1).targets).backward();
  double sum = 0;
  for (const auto& p : gpt->parameters()) sum += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  return std::sqrt(sum);
}

// Hybrid on 4 ranks (2 replicas x 2 shards) of a tied GPT: names, data
// ranks, who reports, and gradNorm equal to one process's.
TESSERA_WORKER(parallelize_hybrid_plan_and_grad_norm) {
  const comm::CommPtr world = ctx.world();
  ParallelConfig config = configOf(2, 2, "hybrid");
  DeviceMesh mesh(world, config.mesh);
  models::Gpt gpt(tinyGpt());
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, /*localUpdates=*/false);
  TESSERA_CHECK(pm.dp->name() == "hybrid", "strategy " << pm.dp->name());
  std::set<std::string> names;
  for (const NamedComm& c : pm.traffic) names.insert(c.name);
  TESSERA_CHECK((names == std::set<std::string>{"dp_shard", "dp_replicate", "dp"}),
                "traffic names: " << names.size());
  TESSERA_CHECK(pm.dataRanks == 4 && pm.dataRank == world->rank(),
                "data rank " << pm.dataRank << " of " << pm.dataRanks);
  TESSERA_CHECK(pm.reportsMetrics == (world->rank() == 0), "only world rank 0 reports");

  const auto loss = pm.executor->forwardBackward({batchOf(pm.dataRank, pm.dataRanks)}, 0);
  TESSERA_CHECK(loss.has_value(), "every rank has the loss without pipelines");
  pm.dp->finishGradientSync();
  const double norm = pm.dp->gradNorm();
  const double expected = referenceGradNorm();
  TESSERA_CHECK(std::abs(norm - expected) <= 1e-5 * expected, "gradNorm " << norm << " vs one process " << expected);
}

TEST(Parallelize, HybridPlanTrafficAndLogicalGradNorm) {
  auto result = testing::runWorkers("parallelize_hybrid_plan_and_grad_norm", {.ranks = 4});
  ASSERT_TRUE(result.ok()) << result.report();
}

// DDP on 2 ranks of the same tied GPT: the tied tensor counts once, replicas do not add up.
TESSERA_WORKER(parallelize_ddp_grad_norm) {
  ParallelConfig config = configOf(2, 1, "ddp");
  DeviceMesh mesh(ctx.world(), config.mesh);
  models::Gpt gpt(tinyGpt());
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, false, "adamw", c10::Device(c10::kCPU));
  TESSERA_CHECK(pm.device.is_cpu(), "the device parallelize() was given is recorded");
  std::set<std::string> names;
  for (const NamedComm& c : pm.traffic) names.insert(c.name);
  TESSERA_CHECK((names == std::set<std::string>{"dp_replicate"}), "DDP talks on dp_replicate only");
  pm.executor->forwardBackward({batchOf(pm.dataRank, pm.dataRanks)}, 0);
  pm.dp->finishGradientSync();
  const double norm = pm.dp->gradNorm();
  const double expected = referenceGradNorm();
  TESSERA_CHECK(std::abs(norm - expected) <= 1e-5 * expected, "gradNorm " << norm << " vs one process " << expected);
}

TEST(Parallelize, DdpLogicalGradNorm) {
  auto result = testing::runWorkers("parallelize_ddp_grad_norm", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
