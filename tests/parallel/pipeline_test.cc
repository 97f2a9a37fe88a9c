// Pipeline parallelism end to end: real stage processes running every
// schedule through parallelize() and the executor, against one process
// training the whole model on the same data.
//
// Each rank also trains the whole model itself (the reference, computed
// independently: GptImpl::loss over the concatenation of every data rank's
// batch, one backward, AdamW), so every comparison is local.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>

#include "tessera/core/error.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/parallelize.h"
#include "tessera/parallel/pipeline/executor.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

models::GptConfig modelOf(const testing::WorkerContext& ctx) {
  models::GptConfig c;
  c.vocab_size = 64;
  c.block_size = 16;
  c.n_layer = std::stoi(ctx.arg("layers", "4"));
  c.n_head = 4;
  c.d_model = 32;
  c.positions = ctx.arg("positions", "learned");
  c.tie_weights = ctx.arg("tied", "1") == "1";
  c.seed = 77;
  return c;
}

// Data rank r's batch at `step`: the same on every rank that asks.
Batch batchOf(int64_t step, int dataRank, int64_t rows) {
  at::Generator g = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 * step + dataRank + 1));
  Batch b;
  const at::Tensor tokens = at::randint(0, 64, {rows, 17}, g, at::kLong);
  b.inputs = tokens.narrow(1, 0, 16).contiguous();
  b.targets = tokens.narrow(1, 1, 16).contiguous();
  b.tokens = rows * 16;
  return b;
}

// AdamW as published. eps is large next to float noise on purpose: with
// eps = 1e-8 an element whose gradient is at noise level moves by ~lr in a
// direction the noise picks, and the two runs' parameters would part by lr
// after one step although every gradient agrees to 1e-6.
optim::OptimizerConfig adamw() {
  optim::OptimizerConfig o;
  o.name = "adamw";
  o.weight_decay = 0.1;
  o.eps = 1e-4;
  return o;
}

// Args: pp, tp, dp (dp_replicate for ddp, dp_shard for fsdp), strategy,
// schedule, microbatches, virtual, steps.
TESSERA_WORKER(pipeline_matches_one_process) {
  const comm::CommPtr world = ctx.world();
  ParallelConfig config;
  config.mesh.pp = std::stoi(ctx.arg("pp", "2"));
  config.mesh.tp = std::stoi(ctx.arg("tp", "1"));
  config.strategy = ctx.arg("strategy", "none");
  const int dp = std::stoi(ctx.arg("dp", "1"));
  if (config.strategy == "fsdp") {
    config.mesh.dp_shard = dp;
  } else {
    config.mesh.dp_replicate = dp;
  }
  config.pipeline.schedule = ctx.arg("schedule", "1f1b");
  config.pipeline.microbatches = std::stoi(ctx.arg("microbatches", "4"));
  config.pipeline.virtual_stages = std::stoi(ctx.arg("virtual", "2"));
  config.pipeline.auto_profile_steps = 1;
  config.pipeline.offload = ctx.arg("offload", "none");
  const int steps = std::stoi(ctx.arg("steps", "3"));
  const int64_t rows = 2 * config.pipeline.microbatches;
  const models::GptConfig gptConfig = modelOf(ctx);

  DeviceMesh mesh(world, config.mesh);
  models::Gpt gpt(gptConfig, pipelinePart(gptConfig, config, mesh.coordinate(MeshAxis::kPp)));
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, /*localUpdates=*/false);
  TESSERA_CHECK(pm.stage && pm.stageNorm, "parallelize built no pipeline for pp = " << config.mesh.pp);
  auto optimizer = optim::makeOptimizer(adamw(), pm.dp->optimizerParameters(), 1e-2);

  models::Gpt whole(gptConfig);  // the reference: one process, every data rank's rows at once
  auto reference = optim::makeOptimizer(adamw(), whole->parameters(), 1e-2);

  // Whole parameters (none / DDP without tp) are compared tensor by tensor;
  // sharded ones (tp, FSDP) through the losses and the norm.
  const bool wholeTensors = config.mesh.tp == 1 && config.strategy != "fsdp";
  std::map<std::string, at::Tensor> referenceParams;
  for (const auto& item : whole->named_parameters()) referenceParams[item.key()] = item.value();
  double largest = 0;
  for (int step = 0; step < steps; ++step) {
    const std::optional<double> loss =
        pm.executor->forwardBackward({batchOf(step, pm.dataRank, rows)}, step);
    pm.dp->finishGradientSync();
    const double stageNorm = pm.dp->gradNorm();
    pm.stageNorm->start(stageNorm * stageNorm);
    const double norm = std::sqrt(pm.stageNorm->finish());

    std::vector<at::Tensor> inputs, targets;
    for (int r = 0; r < pm.dataRanks; ++r) {
      const Batch b = batchOf(step, r, rows);
      inputs.push_back(b.inputs);
      targets.push_back(b.targets);
    }
    const at::Tensor wholeLoss = whole->loss(at::cat(inputs), at::cat(targets));
    wholeLoss.backward();
    double sq = 0;
    for (const auto& p : whole->parameters()) sq += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    const double wholeNorm = std::sqrt(sq);

    TESSERA_CHECK(loss.has_value() == pm.executor->hasLoss(), "a loss on a rank without the last chunk");
    if (loss) {
      // The data ranks' mean, as the Trainer reports it.
      at::Tensor mean = at::tensor({*loss}, at::kDouble);
      if (pm.dataComm) pm.dataComm->allReduce(mean, comm::ReduceOp::kAvg);
      const double want = wholeLoss.item<double>();
      TESSERA_CHECK(std::abs(mean.item<double>() - want) <= 1e-5 * std::max(1.0, std::abs(want)),
                    "step " << step << ": pipeline loss " << mean.item<double>() << " vs one process " << want);
    }
    TESSERA_CHECK(std::abs(norm - wholeNorm) <= 1e-5 * std::max(1.0, wholeNorm),
                  "step " << step << ": gradient norm over the stages " << norm << " vs one process " << wholeNorm);
    if (wholeTensors) {
      // Every held gradient (the tied copy's after the embedding group's sum) is one process's.
      for (const auto& item : gpt->named_parameters()) {
        const at::Tensor& want = referenceParams.at(item.key()).grad();
        const double scale = want.abs().max().item<double>();
        const double diff = (item.value().grad() - want).abs().max().item<double>();
        largest = std::max(largest, diff / std::max(scale, 1e-12));
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
  if (wholeTensors) std::printf("largest relative gradient difference %.2e\n", largest);
}

// Offload "all" against none on the same stage processes: bitwise the same
// gradients, fewer saved activation bytes resident at the peak.
TESSERA_WORKER(pipeline_offload_lowers_resident_activations) {
  const comm::CommPtr world = ctx.world();
  models::GptConfig gptConfig = modelOf(ctx);
  gptConfig.n_layer = 4;
  std::map<std::string, std::map<std::string, at::Tensor>> grads;  // offload -> name -> gradient
  std::map<std::string, int64_t> peak;
  for (const std::string offload : {"none", "all"}) {
    ParallelConfig config;
    config.mesh.pp = 2;
    config.strategy = "none";
    // GPipe keeps every micro-batch's activations from its F to its B on every
    // stage: the most to offload (under 1F1B the last stage holds one at a time).
    config.pipeline.schedule = "gpipe";
    config.pipeline.microbatches = 8;
    config.pipeline.offload = offload;
    config.pipeline.measure_activations = true;
    DeviceMesh mesh(world, config.mesh);
    models::Gpt gpt(gptConfig, pipelinePart(gptConfig, config, mesh.coordinate(MeshAxis::kPp)));
    auto model = makeTrainable(gpt);
    ParallelModel pm = parallelize(*model, mesh, config, false);
    auto* executor = dynamic_cast<pipeline::PipelineExecutor*>(pm.executor.get());
    TESSERA_CHECK(executor != nullptr, "no pipeline executor");
    // Each offload's copies finish before the next action: the peak no longer
    // depends on the copy thread getting a core (this machine's 2 are shared).
    executor->setSynchronousOffload(true);
    executor->forwardBackward({batchOf(0, 0, 64)}, 0);  // 8 rows a micro-batch: saved tensors above minBytes
    pm.dp->finishGradientSync();
    peak[offload] = executor->peakActivationBytes();
    for (const auto& item : gpt->named_parameters()) grads[offload][item.key()] = item.value().grad().clone();
  }
  for (const auto& [name, grad] : grads["none"]) {
    TESSERA_CHECK(at::equal(grad, grads["all"].at(name)), name << ": the gradient differs with offload");
  }
  // How much lower with the copies overlapped depends on the copy thread keeping
  // up (tessera-bench pipeline --offload none,all measures it).
  TESSERA_CHECK(peak["none"] > 0 && peak["all"] < peak["none"],
                "rank " << world->rank() << ": peak resident activation bytes " << peak["all"] << " with offload vs "
                        << peak["none"] << " without");
  std::printf("rank %d: peak resident activation bytes %lld -> %lld with offload\n", world->rank(),
              static_cast<long long>(peak["none"]), static_cast<long long>(peak["all"]));
}

testing::RunOptions runOf(int ranks, std::map<std::string, std::string> args) {
  testing::RunOptions o;
  o.ranks = ranks;
  o.args = std::move(args);
  return o;
}

void expectMatches(int ranks, std::map<std::string, std::string> args) {
  auto result = testing::runWorkers("pipeline_matches_one_process", runOf(ranks, std::move(args)));
  ASSERT_TRUE(result.ok()) << result.report();
}

// Every schedule on 2 stages (tied embeddings: the embedding group), 3 AdamW steps.
TEST(Pipeline, GpipeTwoStages) { expectMatches(2, {{"schedule", "gpipe"}}); }
TEST(Pipeline, OneFOneBTwoStages) { expectMatches(2, {{"schedule", "1f1b"}}); }
TEST(Pipeline, InterleavedTwoStages) { expectMatches(2, {{"schedule", "interleaved_1f1b"}, {"virtual", "2"}}); }
TEST(Pipeline, ZbH1TwoStages) { expectMatches(2, {{"schedule", "zb_h1"}}); }
TEST(Pipeline, ZbH2TwoStages) { expectMatches(2, {{"schedule", "zb_h2"}}); }
TEST(Pipeline, ZbVTwoStagesOneRankHoldsBothEnds) { expectMatches(2, {{"schedule", "zb_v"}}); }
TEST(Pipeline, AutoTwoStagesSwitchesAfterProfiling) { expectMatches(2, {{"schedule", "auto"}}); }
TEST(Pipeline, UntiedOneFOneB) { expectMatches(2, {{"schedule", "1f1b"}, {"tied", "0"}}); }

// Four stages.
TEST(Pipeline, OneFOneBFourStages) { expectMatches(4, {{"schedule", "1f1b"}, {"pp", "4"}}); }
TEST(Pipeline, ZbVFourStages) { expectMatches(4, {{"schedule", "zb_v"}, {"pp", "4"}, {"layers", "8"}}); }

// Composition: TP inside each stage, DDP and FSDP across stage replicas.
TEST(Pipeline, TensorTimesPipeline) { expectMatches(4, {{"schedule", "1f1b"}, {"tp", "2"}}); }
TEST(Pipeline, PipelineTimesDdp) { expectMatches(4, {{"schedule", "zb_h1"}, {"strategy", "ddp"}, {"dp", "2"}}); }
TEST(Pipeline, PipelineTimesFsdp) { expectMatches(4, {{"schedule", "zb_h1"}, {"strategy", "fsdp"}, {"dp", "2"}}); }

// Activation offload: the gradients of the unpipelined model over AdamW steps,
// and fewer resident activations at the same gradients.
TEST(Pipeline, OffloadAllMatchesOneProcess) { expectMatches(2, {{"schedule", "zb_h1"}, {"offload", "all"}}); }
TEST(Pipeline, OffloadLowersResidentActivations) {
  auto result = testing::runWorkers("pipeline_offload_lowers_resident_activations", runOf(2, {}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Pipeline, OneFOneBOverMpi) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "mpirun not available";
  testing::RunOptions o = runOf(2, {{"schedule", "1f1b"}});
  o.backend = "mpi";
  auto result = testing::runWorkers("pipeline_matches_one_process", o);
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
