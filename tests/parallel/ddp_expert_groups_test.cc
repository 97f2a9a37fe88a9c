// DDP groups with a gradient scale (DdpGroup::gradientScale), the expert
// group of expert parallelism. Real Gloo processes; the reference is
// computed by hand from each rank's local gradients, which every worker
// recomputes on a plain copy of the model without communication.
#include <gtest/gtest.h>

#include <torch/nn.h>

#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/parallel/ddp.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr int64_t kIn = 5;
constexpr int64_t kRows = 3;

// "0.*" plays the experts, "2.*" the dense parameters.
torch::nn::Sequential makeModel() {
  torch::manual_seed(17);
  return torch::nn::Sequential(torch::nn::Linear(kIn, 7), torch::nn::Tanh(), torch::nn::Linear(7, 2));
}

bool isExpert(const std::string& name) { return name.rfind("0.", 0) == 0; }

// Rows [rank * kRows, (rank + 1) * kRows) of the step's global batch.
std::pair<at::Tensor, at::Tensor> rankBatch(int rank, int ranks) {
  torch::manual_seed(99);
  const at::Tensor x = torch::randn({ranks * kRows, kIn});
  const at::Tensor y = torch::randn({ranks * kRows, 2});
  return {x.narrow(0, rank * kRows, kRows), y.narrow(0, rank * kRows, kRows)};
}

// name -> gradient of a fresh model on rank `rank`'s rows alone.
std::map<std::string, at::Tensor> localGradients(int rank, int ranks) {
  torch::nn::Sequential model = makeModel();
  const auto [x, y] = rankBatch(rank, ranks);
  torch::mse_loss(model->forward(x), y).backward();
  std::map<std::string, at::Tensor> out;
  for (const auto& item : model->named_parameters()) out[item.key()] = item.value().grad().clone();
  return out;
}

// 2 ranks as ep = 2 with one replica per expert: the "experts" are averaged
// over their holders (a single-rank comm: this rank) and scaled by 1/ep, the
// dense parameters averaged over the world. Expected, by hand:
//   expert: g_rank / 2  (the sum over the one holder divided by N = 2)
//   dense:  (g_0 + g_1) / 2, bit-identical to a one-group DDP over the world.
TESSERA_WORKER(ddp_scaled_groups) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  TESSERA_CHECK_EQ(n, 2);
  const comm::CommPtr holders = comm::makeSingleRankCommunicator("holders");
  const double scale = 1.0 / n;

  torch::nn::Sequential model = makeModel();
  std::vector<DdpGroup> groups;
  groups.push_back(DdpGroup{holders, isExpert, scale});
  groups.push_back(DdpGroup{world, nullptr});  // gradientScale defaults to 1
  DistributedDataParallel ddp(*model, std::move(groups));
  torch::nn::Sequential plain = makeModel();
  DistributedDataParallel oneGroup(*plain, world);

  const auto [x, y] = rankBatch(rank, n);
  torch::mse_loss(model->forward(x), y).backward();
  ddp.finishGradientSync();
  torch::mse_loss(plain->forward(x), y).backward();
  oneGroup.finishGradientSync();

  std::vector<std::map<std::string, at::Tensor>> local;
  for (int r = 0; r < n; ++r) local.push_back(localGradients(r, n));
  const auto plainParams = plain->named_parameters();
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    const at::Tensor& grad = item.value().grad();
    if (isExpert(name)) {
      testing::expectTensorsEqual(grad, local[rank].at(name) * scale, "expert '" + name + "'", 1e-7, 1e-6);
    } else {
      testing::expectTensorsEqual(grad, (local[0].at(name) + local[1].at(name)) / 2, "dense '" + name + "'", 1e-7,
                                  1e-6);
      // Unscaled groups stay the exact average.
      testing::expectTensorsEqual(grad, plainParams[name].grad(), "dense '" + name + "' vs one group");
    }
  }
  const DdpSyncStats stats = ddp.lastStepStats();
  TESSERA_CHECK_EQ(stats.bytesByComm.count("holders"), 1u);
}

TEST(DdpExpertGroups, ScaledGroupIsTheSumOverHoldersDividedByN) {
  testing::RunOptions run;
  run.ranks = 2;
  run.deadline = std::chrono::seconds(60);
  const auto result = testing::runWorkers("ddp_scaled_groups", run);
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(DdpExpertGroups, RejectsANonPositiveScale) {
  torch::nn::Sequential model = makeModel();
  for (double bad : {0.0, -0.5, std::nan("")}) {
    std::vector<DdpGroup> groups{DdpGroup{comm::makeSingleRankCommunicator(), nullptr, bad}};
    try {
      DistributedDataParallel ddp(*model, std::move(groups));
      ADD_FAILURE() << "gradientScale " << bad << " accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("gradientScale"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace tessera::parallel
