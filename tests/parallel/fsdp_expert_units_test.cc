// FSDP with each MoE block's experts as a nested unit of their own
// (FsdpExpertUnits). Real Gloo processes, 2 ranks, the small MoE GPT with
// dropout and capacity drops. The reference is independent of FSDP: one
// process runs each rank's batch as its own forward (capacity and the aux
// loss are per forward; each with that rank's random key) and averages the
// losses; FSDP's gradients, all-gathered back to whole tensors by name, must
// match it and FSDP without expert units, loss and every gradient at every
// step, with SGD steps in between.
#include <gtest/gtest.h>

#include <torch/nn.h>
#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/fixtures.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr double kTolerance = 1e-5;
constexpr int64_t kRows = 2;
constexpr int kSteps = 2;
constexpr double kLr = 0.5;  // large, so a wrong gradient moves step 2 visibly

models::GptConfig moeGpt() {
  models::GptConfig config = testing::smallGpt(/*tied=*/true);
  config.use_moe = true;
  config.moe.num_experts = 4;
  config.moe.top_k = 2;
  config.moe.capacity_factor = 1.0;  // per forward: tokens are dropped
  config.moe.aux_loss_weight = 0.1;  // large enough that a lost aux gradient shows
  return config;
}

bool isExpert(const std::string& name) { return name.find(".moe.experts.") != std::string::npos; }

// Tokens and targets of a step, identical on every rank: (ranks * kRows, 8) each.
std::pair<at::Tensor, at::Tensor> tokenBatch(int step, int ranks) {
  torch::manual_seed(3000 + step);
  at::Tensor idx = torch::randint(0, 29, {ranks * kRows, 8}, torch::kLong);
  at::Tensor targets = torch::randint(0, 29, {ranks * kRows, 8}, torch::kLong);
  return {idx, targets};
}

// How the test sees FSDP's units: their prefixes in spec order (experts
// after their block) and each unit's shard comm, the root last.
struct UnitView {
  std::vector<std::string> prefixes;
  std::vector<comm::CommPtr> comms;  // per unit, then the root's
};

// name -> whole gradient: each unit's shard gradient all-gathered over its
// shard comm (collective), cut at the boundaries of the parameters the unit
// holds -- those of `reference` (same names and shapes) whose LAST matching
// prefix is the unit's (the root: none), in registration order, a tied
// tensor once under its first name.
std::map<std::string, at::Tensor> gatheredGradients(Fsdp& fsdp, torch::nn::Module& reference, const UnitView& view) {
  std::vector<std::vector<std::pair<std::string, std::vector<int64_t>>>> members(view.prefixes.size() + 1);
  std::set<const void*> seen;
  for (const auto& item : reference.named_parameters()) {
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
    size_t unit = view.prefixes.size();
    for (size_t u = 0; u < view.prefixes.size(); ++u) {
      if (item.key().rfind(view.prefixes[u] + ".", 0) == 0) unit = u;
    }
    members[unit].emplace_back(item.key(), item.value().sizes().vec());
  }
  const std::vector<at::Tensor> shards = fsdp.shards();
  const auto layout = fsdp.layout();
  TESSERA_CHECK_EQ(shards.size(), members.size());
  std::map<std::string, at::Tensor> out;
  for (size_t u = 0; u < shards.size(); ++u) {
    const comm::CommPtr& comm = view.comms[u];
    const at::Tensor shard = shards[u].grad().defined() ? shards[u].grad() : torch::zeros_like(shards[u]);
    at::Tensor full = torch::empty({shard.numel() * comm->size()});
    comm->allGather(shard.contiguous(), full);
    int64_t offset = 0;
    for (const auto& [name, shape] : members[u]) {
      int64_t numel = 1;
      for (int64_t d : shape) numel *= d;
      out[name] = full.narrow(0, offset, numel).view(shape).clone();
      offset += numel;
    }
    TESSERA_CHECK_EQ(offset, layout[u].numel);
  }
  return out;
}

void expectGradientsClose(const std::map<std::string, at::Tensor>& actual,
                          const std::map<std::string, at::Tensor>& expected, const std::string& what) {
  TESSERA_CHECK_EQ(actual.size(), expected.size());
  for (const auto& [name, grad] : expected) {
    const auto it = actual.find(name);
    TESSERA_CHECK(it != actual.end(), what << ": no gradient for '" << name << "'");
    const double diff = (it->second - grad).abs().max().item<double>();
    const double scale = std::max(grad.abs().max().item<double>(), 1e-3);
    TESSERA_CHECK(diff <= kTolerance * scale,
                  what << ": '" << name << "' differs by " << diff << " (largest |grad| " << scale << ")");
  }
}

// The reference's gradients by name (zeros where none), the tied head once.
std::map<std::string, at::Tensor> referenceGradients(torch::nn::Module& reference) {
  std::map<std::string, at::Tensor> out;
  std::set<const void*> seen;
  for (const auto& item : reference.named_parameters()) {
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
    const at::Tensor& grad = item.value().grad();
    out[item.key()] = grad.defined() ? grad.clone() : torch::zeros_like(item.value());
  }
  return out;
}

// FSDP over the world, without expert units ("none") or with them: "shared"
// (the experts' shard comm is the world, as the blocks'), "scaled" (the same,
// gradientScale 1/2) or "replicated" (experts whole on every rank: a
// single-rank shard comm, replicated over the world). Against the
// single-process reference (expert gradients scaled alike; its SGD step
// uses them) and, each step, FSDP without expert units run beside it.
TESSERA_WORKER(fsdp_expert_units) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  const std::string variant = ctx.arg("variant");
  const models::GptConfig config = moeGpt();

  FsdpExpertUnits experts;
  experts.shardComm = world;
  double scale = 1.0;
  if (variant == "scaled") {
    scale = 0.5;
    experts.gradientScale = scale;
  } else if (variant == "replicated") {
    experts.shardComm = comm::makeSingleRankCommunicator("experts");
    experts.replicateComm = world;
  } else {
    TESSERA_CHECK_EQ(variant, "shared");
  }

  models::Gpt model(config);
  Fsdp fsdp(*model, world, nullptr, &experts);
  models::Gpt plainModel(config);  // FSDP without expert units
  Fsdp plain(*plainModel, world);
  models::Gpt reference(config);

  UnitView view, plainView;
  for (int64_t b = 0; b < config.n_layer; ++b) {
    const std::string block = "blocks." + std::to_string(b);
    view.prefixes.insert(view.prefixes.end(), {block, block + ".moe.experts"});
    view.comms.insert(view.comms.end(), {world, experts.shardComm});
    plainView.prefixes.push_back(block);
    plainView.comms.push_back(world);
  }
  view.comms.push_back(world);
  plainView.comms.push_back(world);
  const auto layout = fsdp.layout();
  TESSERA_CHECK_EQ(layout.size(), 2u * config.n_layer + 1);
  for (size_t u = 0; u < view.prefixes.size(); ++u) TESSERA_CHECK_EQ(layout[u].name, view.prefixes[u]);

  torch::optim::SGD optimizer(fsdp.shards(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD plainOptimizer(plain.shards(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD referenceOptimizer(reference->parameters(), torch::optim::SGDOptions(kLr));
  // The plain FSDP steps on unscaled expert gradients: with a scale, one step.
  const int steps = scale == 1.0 ? kSteps : 1;
  for (int step = 0; step < steps; ++step) {
    const std::string when = " at step " + std::to_string(step);
    const auto [idx, targets] = tokenBatch(step, n);
    const at::Tensor myIdx = idx.narrow(0, rank * kRows, kRows);
    const at::Tensor myTargets = targets.narrow(0, rank * kRows, kRows);

    optimizer.zero_grad();
    model->setRandomKey(step, rank);
    fsdp.beforeForward();
    const at::Tensor loss = model->loss(myIdx, myTargets);
    loss.backward();
    fsdp.finishGradientSync();

    plainOptimizer.zero_grad();
    plainModel->setRandomKey(step, rank);
    plain.beforeForward();
    const at::Tensor plainLoss = plainModel->loss(myIdx, myTargets);
    plainLoss.backward();
    plain.finishGradientSync();

    referenceOptimizer.zero_grad();
    double meanLoss = 0;
    double rankLoss = 0;
    for (int r = 0; r < n; ++r) {
      reference->setRandomKey(step, r);
      const at::Tensor l = reference->loss(idx.narrow(0, r * kRows, kRows), targets.narrow(0, r * kRows, kRows));
      (l / n).backward();
      meanLoss += l.item<double>() / n;
      if (r == rank) rankLoss = l.item<double>();
    }
    for (const auto& item : reference->named_parameters()) {
      if (isExpert(item.key()) && item.value().grad().defined()) item.value().mutable_grad().mul_(scale);
    }

    at::Tensor losses = torch::full({1}, loss.item<double>() / n, torch::kDouble);
    world->allReduce(losses, comm::ReduceOp::kSum);
    TESSERA_CHECK(std::abs(loss.item<double>() - rankLoss) <= kTolerance * std::abs(rankLoss),
                  "loss" << when << ": " << loss.item<double>() << " vs " << rankLoss);
    TESSERA_CHECK(std::abs(losses.item<double>() - meanLoss) <= kTolerance * std::abs(meanLoss),
                  "mean loss" << when << ": " << losses.item<double>() << " vs " << meanLoss);
    TESSERA_CHECK(std::abs(loss.item<double>() - plainLoss.item<double>()) <= kTolerance * std::abs(rankLoss),
                  "loss vs FSDP without expert units" << when);

    const auto grads = gatheredGradients(fsdp, *reference, view);
    auto plainGrads = gatheredGradients(plain, *reference, plainView);
    expectGradientsClose(grads, referenceGradients(*reference), "gradient vs single process" + when);
    for (auto& [name, grad] : plainGrads) {
      if (isExpert(name)) grad.mul_(scale);
    }
    expectGradientsClose(grads, plainGrads, "gradient vs FSDP without expert units" + when);
    // The experts did receive a gradient (capacity drops aside, every expert sees tokens).
    double expertSquares = 0;
    for (const auto& [name, grad] : grads) {
      if (isExpert(name)) expertSquares += grad.pow(2).sum().item<double>();
    }
    TESSERA_CHECK(expertSquares > 0, "no expert gradient" << when);

    optimizer.step();
    plainOptimizer.step();
    referenceOptimizer.step();
  }
}

testing::RunOptions options(const std::string& variant) {
  testing::RunOptions run;
  run.ranks = 2;
  run.deadline = std::chrono::seconds(90);
  run.args = {{"variant", variant}};
  return run;
}

TEST(FsdpExpertUnits, SharedCommMatchesSingleProcessAndPlainFsdp) {
  const auto result = testing::runWorkers("fsdp_expert_units", options("shared"));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(FsdpExpertUnits, GradientScaleMultipliesOnlyTheExperts) {
  const auto result = testing::runWorkers("fsdp_expert_units", options("scaled"));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(FsdpExpertUnits, ReplicatedExpertsAverageOverTheirReplicateComm) {
  const auto result = testing::runWorkers("fsdp_expert_units", options("replicated"));
  ASSERT_TRUE(result.ok()) << result.report();
}

// One rank: the units' order and names, the experts' parameters taken out of
// their block, and the runners removed by the destructor.
TEST(FsdpExpertUnits, NestedUnitsTakeTheExpertsOutOfTheirBlock) {
  const models::GptConfig config = moeGpt();
  models::Gpt model(config);
  models::Gpt reference(config);
  FsdpExpertUnits experts;
  {
    Fsdp fsdp(*model, comm::makeSingleRankCommunicator(), nullptr, &experts);
    const auto layout = fsdp.layout();
    ASSERT_EQ(layout.size(), 5u);
    int64_t blockNumel = 0, expertNumel = 0;
    for (const auto& item : reference->named_parameters()) {
      if (item.key().rfind("blocks.0.moe.experts.", 0) == 0) expertNumel += item.value().numel();
      else if (item.key().rfind("blocks.0.", 0) == 0) blockNumel += item.value().numel();
    }
    EXPECT_EQ(layout[0].name, "blocks.0");
    EXPECT_EQ(layout[0].numel, blockNumel);
    EXPECT_EQ(layout[1].name, "blocks.0.moe.experts");
    EXPECT_EQ(layout[1].numel, expertNumel);
    EXPECT_EQ(layout[2].name, "blocks.1");
    EXPECT_EQ(layout[3].name, "blocks.1.moe.experts");
    EXPECT_EQ(layout[4].name, "<root>");
    fsdp.unshard();
    const at::Tensor idx = torch::randint(0, 29, {2, 8}, torch::kLong);
    model->eval();
    reference->eval();
    torch::NoGradGuard noGrad;
    testing::expectTensorsEqual(model->forward(idx), reference->forward(idx), "unsharded logits", 1e-6, 1e-5);
  }
  // The wrapper is gone: the model runs without its runners (parameters as
  // the destructor left them after unshard(): the full values).
  const at::Tensor idx = torch::randint(0, 29, {2, 8}, torch::kLong);
  torch::NoGradGuard noGrad;
  testing::expectTensorsEqual(model->forward(idx), reference->forward(idx), "after the wrapper", 1e-6, 1e-5);
}

}  // namespace
}  // namespace tessera::parallel
