// Mixture-of-experts GPTs inside pipeline stages: real stage processes
// through parallelize() and the executor, against one process running the
// whole MoE model.
//
// Capacity and the aux loss are per forward, so the reference runs each
// micro-batch of each data rank as its own forward (what pp = 1 with
// train.grad_accum = M computes) and averages. Each stage's MoE blocks must
// add aux_loss_weight * their aux loss to the objective: otherwise the
// routers of the non-last stages get the wrong gradient and the reported
// loss misses their term, and these comparisons fail. The capacity factor
// is small enough that tokens are dropped (checked on the reference).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>

#include "tessera/core/error.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/parallelize.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr int64_t kSeq = 8;  // smallGpt's block_size

models::GptConfig moeModelOf(const testing::WorkerContext& ctx) {
  models::GptConfig c = testing::smallGpt(/*tied=*/true);  // dropout 0.1: the masks must line up too
  c.n_layer = 4;
  c.use_moe = true;
  c.moe.num_experts = 4;
  c.moe.top_k = std::stoi(ctx.arg("top_k", "1"));
  c.moe.capacity_factor = 0.5;  // 16 tokens a micro-batch: C = 4 slots per expert, drops in every forward
  c.moe.aux_loss_weight = 0.1;  // large enough that a missing aux term is far above the tolerance
  return c;
}

// Data rank r's batch at `step`: the same on every rank that asks.
Batch batchOf(int64_t step, int dataRank, int64_t rows, int64_t vocab) {
  at::Generator g = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 * step + dataRank + 1));
  Batch b;
  const at::Tensor tokens = at::randint(0, vocab, {rows, kSeq + 1}, g, at::kLong);
  b.inputs = tokens.narrow(1, 0, kSeq).contiguous();
  b.targets = tokens.narrow(1, 1, kSeq).contiguous();
  b.tokens = rows * kSeq;
  return b;
}

optim::OptimizerConfig adamw() {
  optim::OptimizerConfig o;
  o.name = "adamw";
  o.weight_decay = 0.1;
  o.eps = 1e-4;  // see pipeline_test.cc: noise-level gradients must not move parameters by lr
  return o;
}

bool close(double a, double b) { return std::abs(a - b) <= 1e-5 * std::max(1.0, std::abs(b)); }

// Args: top_k, schedule, strategy ("none" or "fsdp" over dp_shard = ranks / 2),
// offload, steps. pp = 2, 4 micro-batches of 2 rows.
TESSERA_WORKER(pipeline_moe_matches_one_process) {
  const comm::CommPtr world = ctx.world();
  ParallelConfig config;
  config.mesh.pp = 2;
  config.strategy = ctx.arg("strategy", "none");
  if (config.strategy == "fsdp") config.mesh.dp_shard = world->size() / 2;
  config.pipeline.schedule = ctx.arg("schedule", "1f1b");
  config.pipeline.microbatches = 4;
  config.pipeline.offload = ctx.arg("offload", "none");
  const int M = config.pipeline.microbatches;
  const int64_t rows = 2 * M;
  const int steps = std::stoi(ctx.arg("steps", "2"));
  const models::GptConfig gptConfig = moeModelOf(ctx);

  DeviceMesh mesh(world, config.mesh);
  models::Gpt gpt(gptConfig, pipelinePart(gptConfig, config, mesh.coordinate(MeshAxis::kPp)));
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, /*localUpdates=*/false);
  TESSERA_CHECK(pm.stage && pm.stageNorm, "parallelize built no pipeline");
  auto optimizer = optim::makeOptimizer(adamw(), pm.dp->optimizerParameters(), 1e-2);

  models::Gpt whole(gptConfig);  // the reference: one process, every micro-batch its own forward
  auto reference = optim::makeOptimizer(adamw(), whole->parameters(), 1e-2);
  std::map<std::string, at::Tensor> referenceParams;
  for (const auto& item : whole->named_parameters()) referenceParams[item.key()] = item.value();
  const bool wholeTensors = config.strategy == "none";

  for (int step = 0; step < steps; ++step) {
    gpt->train();
    whole->train();
    const std::optional<double> loss =
        pm.executor->forwardBackward({batchOf(step, pm.dataRank, rows, gptConfig.vocab_size)}, step);
    pm.dp->finishGradientSync();
    const double stageNorm = pm.dp->gradNorm();
    pm.stageNorm->start(stageNorm * stageNorm);
    const double norm = std::sqrt(pm.stageNorm->finish());

    // Reference: data rank r's micro-batch m is global micro-batch r * M + m
    // (its dropout key), one forward each; the objective is their mean.
    const int forwards = pm.dataRanks * M;
    double wholeLoss = 0;
    for (int r = 0; r < pm.dataRanks; ++r) {
      const Batch b = batchOf(step, r, rows, gptConfig.vocab_size);
      for (int m = 0; m < M; ++m) {
        whole->setRandomKey(step, static_cast<int64_t>(r) * M + m);
        const at::Tensor l = whole->loss(b.inputs.narrow(0, 2 * m, 2), b.targets.narrow(0, 2 * m, 2));
        (l / forwards).backward();
        wholeLoss += l.item<double>() / forwards;
      }
    }
    int64_t dropped = 0;
    for (size_t i = 0; i < whole->blocks->size(); ++i) dropped += whole->blocks->at(i).moe->takeLoad().dropped;
    TESSERA_CHECK(dropped > 0, "step " << step << ": no token was dropped; lower the capacity factor");
    double sq = 0;
    for (const auto& p : whole->parameters()) sq += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    const double wholeNorm = std::sqrt(sq);

    TESSERA_CHECK(loss.has_value() == pm.executor->hasLoss(), "a loss on a rank without the last chunk");
    if (loss) {
      at::Tensor mean = at::tensor({*loss}, at::kDouble);
      if (pm.dataComm) pm.dataComm->allReduce(mean, comm::ReduceOp::kAvg);
      TESSERA_CHECK(close(mean.item<double>(), wholeLoss),
                    "step " << step << ": pipeline loss " << mean.item<double>() << " vs one process " << wholeLoss);
    }
    TESSERA_CHECK(close(norm, wholeNorm),
                  "step " << step << ": gradient norm over the stages " << norm << " vs one process " << wholeNorm);
    if (wholeTensors) {
      for (const auto& item : gpt->named_parameters()) {
        const at::Tensor& want = referenceParams.at(item.key()).grad();
        TESSERA_CHECK(item.value().grad().defined(), "step " << step << ": no gradient for " << item.key());
        const double scale = want.abs().max().item<double>();
        const double diff = (item.value().grad() - want).abs().max().item<double>();
        TESSERA_CHECK(diff <= 1e-5 * scale + 1e-8, "step " << step << ": gradient of " << item.key()
                                                            << " differs from one process's by " << diff
                                                            << " (largest element " << scale << ")");
      }
    }
    optimizer->step();
    optimizer->zeroGrad();
    reference->step();
    reference->zeroGrad();
  }

  // Evaluation: the whole batch in one forward, every stage's aux in the loss.
  gpt->eval();
  whole->eval();
  const Batch b = batchOf(steps, pm.dataRank, rows, gptConfig.vocab_size);
  const std::optional<double> evalLoss = pm.executor->evaluate(b);
  if (evalLoss) {
    torch::NoGradGuard noGrad;
    const double want = whole->loss(b.inputs, b.targets).item<double>();
    TESSERA_CHECK(close(*evalLoss, want), "evaluation loss " << *evalLoss << " vs one process " << want);
  }
}

void expectMatches(int ranks, std::map<std::string, std::string> args) {
  testing::RunOptions o;
  o.ranks = ranks;
  o.args = std::move(args);
  auto result = testing::runWorkers("pipeline_moe_matches_one_process", o);
  ASSERT_TRUE(result.ok()) << result.report();
}

// 2 stages of 2 MoE blocks each (1F1B, ZB-H1's split backward), and ZB-V's
// 4 chunks, where rank 0 holds chunk 0 (an aux to send on) and the loss.
TEST(PipelineMoe, OneFOneBTopOne) { expectMatches(2, {{"schedule", "1f1b"}, {"top_k", "1"}}); }
TEST(PipelineMoe, OneFOneBTopTwo) { expectMatches(2, {{"schedule", "1f1b"}, {"top_k", "2"}}); }
TEST(PipelineMoe, ZbH1TopOne) { expectMatches(2, {{"schedule", "zb_h1"}, {"top_k", "1"}}); }
TEST(PipelineMoe, ZbH1TopTwo) { expectMatches(2, {{"schedule", "zb_h1"}, {"top_k", "2"}}); }
TEST(PipelineMoe, ZbVTopTwo) { expectMatches(2, {{"schedule", "zb_v"}, {"top_k", "2"}}); }
TEST(PipelineMoe, ZbH1OffloadAll) { expectMatches(2, {{"schedule", "zb_h1"}, {"top_k", "2"}, {"offload", "all"}}); }
// FSDP inside each stage (its MoE units return the aux): loss and norm.
TEST(PipelineMoe, ZbH1TimesFsdp) { expectMatches(4, {{"schedule", "zb_h1"}, {"top_k", "2"}, {"strategy", "fsdp"}}); }

}  // namespace
}  // namespace tessera::parallel
