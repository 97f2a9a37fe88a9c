// The gradient norm over logical parameters with experts (logical_norm.h).
// Real Gloo processes, 4 ranks, two layouts of the small MoE GPT:
//   fsdp: ep = 2 x dp_shard = 2, FSDP with expert units (dense shards over
//         all 4 ranks, expert shards over dp_shard, experts split over ep);
//   tp:   ep = 2 x tp = 2, no data-parallel strategy (whole parameters), the
//         experts' Linears split over tp (TED), the experts over ep.
// Each rank sets every gradient it holds to the parameter's value, so the
// logical norm must equal the norm of the whole model's values, computed
// independently on a full single-process model (same seed: a part's values
// are the whole model's).
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/logical_norm.h"
#include "tessera/parallel/tensor_parallel.h"
#include "tessera/parallel/tp_regions.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr double kTolerance = 1e-9;  // double sums of the same float values

models::GptConfig moeGpt() {
  models::GptConfig config = testing::smallGpt(/*tied=*/true);
  config.use_moe = true;
  config.moe.num_experts = 4;
  return config;
}

// The norm of the whole model's values, each tensor once.
double wholeModelNorm() {
  models::Gpt whole(moeGpt());
  double squares = 0;
  std::set<const void*> seen;
  for (const auto& item : whole->named_parameters()) {
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
    squares += item.value().to(at::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(squares);
}

// Keeps the experts of ep coordinate `ep` (of 2) in every block.
void keepExpertsOf(models::GptImpl& gpt, int ep) {
  const int64_t local = gpt.config().moe.num_experts / 2;
  for (size_t b = 0; b < gpt.blocks->size(); ++b) gpt.blocks->at(b).moe->keepExperts(ep * local, (ep + 1) * local);
}

// Every gradient the strategy holds := the value it holds (FSDP's padding stays 0).
void gradientsAreValues(DataParallel& dp) {
  for (at::Tensor& p : dp.optimizerParameters()) p.mutable_grad() = p.detach().clone();
}

void expectNear(double actual, double expected, const std::string& what) {
  TESSERA_CHECK(std::abs(actual - expected) <= kTolerance * expected, what << ": " << actual << " vs " << expected);
}

TESSERA_WORKER(logical_norm) {
  const comm::CommPtr world = ctx.world();
  const int rank = world->rank();
  TESSERA_CHECK_EQ(world->size(), 4);
  const double expected = wholeModelNorm();
  models::Gpt model(moeGpt());

  if (ctx.arg("layout") == "fsdp") {
    const int ep = rank % 2, shard = rank / 2;
    const comm::CommPtr epComm = world->split(shard, ep, "ep");
    const comm::CommPtr dpShard = world->split(ep, shard, "dp_shard");  // the ranks holding the same experts
    keepExpertsOf(*model, ep);
    FsdpExpertUnits experts{dpShard, nullptr, 0.5};
    // Dense units over dp_shard x ep (the world), experts over dp_shard.
    auto dp = withLogicalNorm(makeFsdpDataParallel(*model, world, nullptr, &experts), {}, nullptr, epComm, world,
                              dpShard);
    gradientsAreValues(*dp);
    expectNear(dp->gradNorm(), expected, "FSDP x ep logical norm");

    // Without the ep sum, the other ep rank's experts are missing: the test can fail.
    models::Gpt other(moeGpt());
    keepExpertsOf(*other, ep);
    auto noEp = withLogicalNorm(makeFsdpDataParallel(*other, world, nullptr, &experts), {}, nullptr, nullptr, world,
                                dpShard);
    gradientsAreValues(*noEp);
    const double partial = noEp->gradNorm();
    TESSERA_CHECK(partial < expected * (1 - 1e-6), "the norm without ep should miss experts: " << partial);
    // Expert shards that differ over ep with no expert shard comm: refused.
    bool refused = false;
    try {
      withLogicalNorm(std::move(noEp), {}, nullptr, epComm, world, nullptr);
    } catch (const InvalidArgument&) {
      refused = true;
    }
    TESSERA_CHECK(refused, "withLogicalNorm accepted sharded dense parameters and ep without an expert shard comm");
    return;
  }
  TESSERA_CHECK_EQ(ctx.arg("layout"), "tp");
  const int tp = rank % 2, ep = rank / 2;
  const comm::CommPtr tpComm = world->split(ep, tp, "tp");
  const comm::CommPtr epComm = world->split(tp, ep, "ep");
  model->applyTensorParallel(makeTensorParallelGroup(tpComm), /*sequenceParallel=*/false);
  keepExpertsOf(*model, ep);
  const std::set<std::string> tpSharded = tensorParallelParameters(*model);
  bool expertSplit = false;
  for (const std::string& name : tpSharded) expertSplit |= name.find(".moe.experts.") != std::string::npos;
  TESSERA_CHECK(expertSplit, "TED should split the experts' Linears over tp");
  auto dp = withLogicalNorm(makeNoDataParallel(*model), tpSharded, tpComm, epComm, nullptr, nullptr);
  gradientsAreValues(*dp);
  expectNear(dp->gradNorm(), expected, "tp x ep logical norm");
}

testing::RunOptions options(const std::string& layout) {
  testing::RunOptions run;
  run.ranks = 4;
  run.deadline = std::chrono::seconds(90);
  run.args = {{"layout", layout}};
  return run;
}

TEST(LogicalNorm, FsdpWithExpertUnitsUnderEpCountsEachParameterOnce) {
  const auto result = testing::runWorkers("logical_norm", options("fsdp"));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(LogicalNorm, WholeParametersUnderTpAndEpCountEachParameterOnce) {
  const auto result = testing::runWorkers("logical_norm", options("tp"));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
