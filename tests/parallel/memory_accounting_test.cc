// measureMemory() on a small GPT after one training step: the storage bytes
// per category against what each configuration must allocate (worked out
// from dtypes below, independently of the measuring code), plus FSDP's held
// shards over 2 processes against FullyShardedDataParallel's own accounting.
//
// Why exact equality is the right tolerance here: every parameter, gradient
// and optimizer tensor of these configurations is its own allocation of
// exactly numel * element size bytes (no caching allocator on CPU, no
// padding outside FSDP's flat shards), so any difference is a counting bug
// (a missed tensor, a double-counted alias) rather than noise.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/memory_accounting.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

int64_t numelOf(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const at::Tensor& t : tensors) n += t.numel();
  return n;
}

// One training step of `model` (untied: every parameter is its own tensor).
MemoryReport measureAfterOneStep(const optim::OptimizerConfig& config, models::Gpt& model) {
  auto optimizer = optim::makeOptimizer(config, model->parameters(), 1e-2);
  torch::manual_seed(1);
  const at::Tensor idx = torch::randint(0, 29, {2, 8}, torch::kLong);
  const at::Tensor targets = torch::randint(0, 29, {2, 8}, torch::kLong);
  model->loss(idx, targets).backward();
  optimizer->step();  // the gradients stay held until the next zeroGrad/backward
  return measureMemory(*model, *optimizer);
}

TEST(MemoryAccounting, Fp32AdamWIsSixteenBytesPerParameter) {
  models::Gpt model(testing::smallGpt(/*tied=*/false));
  const int64_t P = numelOf(model->parameters());
  const MemoryReport r = measureAfterOneStep(optim::OptimizerConfig{}, model);
  std::printf("fp32 AdamW: %s\n", r.toString().c_str());
  EXPECT_EQ(r.logicalParameters, P);
  EXPECT_EQ(r.bytes.weights, 4 * P);         // float32
  EXPECT_EQ(r.bytes.gradients, 4 * P);       // float32 .grad
  EXPECT_EQ(r.bytes.optimizerState, 8 * P);  // m, v float32
  EXPECT_EQ(r.bytes.masterWeights, 0);
  EXPECT_EQ(r.bytes.scales, 0);
  EXPECT_DOUBLE_EQ(r.perParameter(r.bytes.total() - r.bytes.buffers), 16.0);
}

TEST(MemoryAccounting, Fp8StatesAreThreeBytesPerParameterPlusScales) {
  for (const std::string master : {"fp32", "fp16"}) {
    models::Gpt model(testing::smallGpt(/*tied=*/false));
    const auto params = model->parameters();
    const int64_t P = numelOf(params);
    optim::OptimizerConfig config;
    config.states = "fp8";
    config.master = master;
    const MemoryReport r = measureAfterOneStep(config, model);
    std::printf("fp8 states, %s master: %s\n", master.c_str(), r.toString().c_str());
    EXPECT_EQ(r.bytes.weights, 4 * P);
    EXPECT_EQ(r.bytes.gradients, 4 * P);
    EXPECT_EQ(r.bytes.optimizerState, 3 * P);  // E4M3 codes (1) + FP16 v (2)
    EXPECT_EQ(r.bytes.masterWeights, master == "fp16" ? 2 * P : 0);
    EXPECT_EQ(r.bytes.scales, 2 * 4 * static_cast<int64_t>(params.size()));  // two float32 {1} per tensor
  }
}

// The optimizer's state aliases its live tensors and a parameter reached
// twice (a tied head) is one storage: each counts once.
TEST(MemoryAccounting, AliasesCountOnce) {
  models::Gpt model(testing::smallGpt(/*tied=*/true));
  std::vector<at::Tensor> distinct;
  for (const at::Tensor& p : model->parameters()) {
    bool seen = false;
    for (const at::Tensor& q : distinct) seen = seen || q.is_same(p);
    if (!seen) distinct.push_back(p);
  }
  auto optimizer = optim::makeOptimizer(optim::OptimizerConfig{}, distinct, 1e-2);
  for (const at::Tensor& p : distinct) p.mutable_grad() = torch::ones_like(p);
  optimizer->step();
  const int64_t P = numelOf(distinct);
  const MemoryReport r = measureMemory(*model, *optimizer);
  EXPECT_EQ(r.logicalParameters, P);
  EXPECT_EQ(r.bytes.weights, 4 * P);
  EXPECT_EQ(r.bytes.optimizerState, 8 * P);
}

// FSDP over 2 ranks: the module's parameters are empty between steps; the
// shards are what is held. Measured weights equal FSDP's own held bytes.
TESSERA_WORKER(memory_fsdp) {
  const comm::CommPtr world = ctx.world();
  models::Gpt model(testing::smallGpt(/*tied=*/false));
  const int64_t P = numelOf(model->parameters());
  Fsdp fsdp(*model, world);
  const std::vector<at::Tensor> shards = fsdp.shards();
  auto optimizer = optim::makeOptimizer(optim::OptimizerConfig{}, shards, 1e-2);
  torch::manual_seed(1 + world->rank());
  fsdp.beforeForward();
  model->loss(torch::randint(0, 29, {2, 8}, torch::kLong), torch::randint(0, 29, {2, 8}, torch::kLong)).backward();
  fsdp.finishGradientSync();
  optimizer->step();
  MemoryOptions options;
  options.optimizerParameters = shards;
  options.logicalParameters = P;
  const MemoryReport r = measureMemory(*model, *optimizer, options);
  std::printf("rank %d fsdp fp32 AdamW: %s\n", world->rank(), r.toString().c_str());
  const int64_t shardBytes = numelOf(shards) * 4;
  TESSERA_CHECK_EQ(r.bytes.weights, fsdp.heldParameterBytes());
  TESSERA_CHECK_EQ(r.bytes.weights, shardBytes);
  TESSERA_CHECK_EQ(r.bytes.gradients, shardBytes);
  TESSERA_CHECK_EQ(r.bytes.optimizerState, 2 * shardBytes);
  // Half of P per rank, plus at most one padding element per unit and rank.
  TESSERA_CHECK(numelOf(shards) * 2 >= P && numelOf(shards) * 2 <= P + 2 * static_cast<int64_t>(shards.size()),
                "shards hold " << numelOf(shards) << " of " << P << " elements");
  // Without the count the module alone has nothing to divide by.
  bool threw = false;
  try {
    measureMemory(*model, *optimizer);
  } catch (const InvalidArgument&) {
    threw = true;
  }
  TESSERA_CHECK(threw, "measureMemory on an empty FSDP module did not ask for logicalParameters");
}

TEST(MemoryAccounting, FsdpMeasuresHeldShards) {
  testing::RunOptions options;
  options.ranks = 2;
  const auto result = testing::runWorkers("memory_fsdp", options);
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

}  // namespace
}  // namespace tessera::parallel
