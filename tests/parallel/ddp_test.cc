// DDP tests. The layout and config checks run in-process over a single-rank
// communicator; everything else runs real Gloo (and, when available, MPI)
// processes. The reference for every multi-rank run is independent of DDP:
// each worker also trains a plain copy of the model on the whole global batch
// (N ranks x b rows) with no communication, and DDP's parameters must match it
// after k steps. Models are tiny (a few hundred parameters) so a run takes
// about a second.
#include <gtest/gtest.h>

#include <torch/nn.h>
#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/parallel/ddp.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/checks.h"

namespace tessera::parallel {
namespace {

using testing::expectPerCommSumsToTotal;

constexpr int64_t kIn = 8;
constexpr int64_t kOut = 4;
constexpr double kRelTolerance = 1e-5;

// (in 8) -> 16 -> 16 -> (out 4); six parameters, reverse order b3 w3 b2 w2 b1 w1.
torch::nn::Sequential makeModel(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(kIn, 16), torch::nn::Tanh(), torch::nn::Linear(16, 16),
                               torch::nn::Tanh(), torch::nn::Linear(16, kOut));
}

// The global batch of a step, identical on every rank: x (rows, 8), y (rows, 4).
std::pair<at::Tensor, at::Tensor> globalBatch(int step, int64_t rows) {
  torch::manual_seed(1000 + step);
  at::Tensor x = torch::randn({rows, kIn});
  at::Tensor y = torch::randn({rows, kOut});
  return {x, y};
}

std::unique_ptr<torch::optim::Optimizer> makeOptimizer(const std::string& kind, std::vector<at::Tensor> params) {
  if (kind == "sgd") return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
  TESSERA_CHECK_ARG(kind == "adamw", "unknown optimizer '" << kind << "'");
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
}

void expectClose(torch::nn::Module& actual, torch::nn::Module& expected, const std::string& what) {
  const auto a = actual.named_parameters();
  const auto e = expected.named_parameters();
  TESSERA_CHECK_EQ(a.size(), e.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = (a[i].value() - e[i].value()).norm().item<double>();
    const double scale = std::max(e[i].value().norm().item<double>(), 1e-12);
    TESSERA_CHECK(diff / scale <= kRelTolerance, what << ": parameter '" << a[i].key() << "' differs from the "
                                                      << "single-process reference by relative " << diff / scale);
  }
}

// Collective: every rank's parameters, gathered, must equal this rank's bit for bit.
void expectReplicasIdentical(torch::nn::Module& model, const comm::CommPtr& comm) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& p : model.parameters()) flat.push_back(p.detach().reshape({-1}));
  const at::Tensor mine = torch::cat(flat);
  at::Tensor all = torch::empty({comm->size() * mine.numel()});
  comm->allGather(mine, all);
  for (int r = 0; r < comm->size(); ++r) {
    testing::expectTensorsEqual(all.narrow(0, r * mine.numel(), mine.numel()), mine,
                                "rank " + std::to_string(r) + "'s parameters");
  }
}


// The mean-squared-error gradients of `model` on rows [begin, begin + rows)
// of (x, y), one tensor per parameter in registration order. No communication.
std::vector<at::Tensor> localGradients(torch::nn::Sequential& model, const at::Tensor& x, const at::Tensor& y,
                                       int64_t begin, int64_t rows) {
  model->zero_grad();
  torch::mse_loss(model->forward(x.narrow(0, begin, rows)), y.narrow(0, begin, rows)).backward();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : model->parameters()) grads.push_back(p.grad().clone());
  return grads;
}

// DDP with per-rank batch b over k steps vs one process with batch N*b.
// Args: optim (sgd|adamw), bucket_bytes, min_buckets, max_buckets.
TESSERA_WORKER(ddp_equivalence) {
  const comm::CommPtr comm = ctx.world();
  const int ranks = comm->size();
  const int rank = comm->rank();
  constexpr int64_t kRowsPerRank = 4;
  constexpr int kSteps = 5;

  torch::nn::Sequential reference = makeModel(1);
  torch::nn::Sequential model = makeModel(1 + rank);  // ranks > 0 start elsewhere: the broadcast must fix that
  DdpConfig config;
  config.bucketCapBytes = std::stoll(ctx.arg("bucket_bytes"));
  Ddp ddp(*model, comm, config);
  expectClose(*model, *reference, "after construction");
  const auto buckets = static_cast<int>(ddp.bucketParameterNames().size());
  TESSERA_CHECK_GE(buckets, std::stoi(ctx.arg("min_buckets")));
  TESSERA_CHECK_LE(buckets, std::stoi(ctx.arg("max_buckets")));

  auto optimizer = makeOptimizer(ctx.arg("optim"), model->parameters());
  auto referenceOptimizer = makeOptimizer(ctx.arg("optim"), reference->parameters());
  for (int step = 0; step < kSteps; ++step) {
    const auto [x, y] = globalBatch(step, ranks * kRowsPerRank);
    // This rank's slice of the global batch: rows [rank*b, (rank+1)*b).
    optimizer->zero_grad();
    torch::mse_loss(model->forward(x.narrow(0, rank * kRowsPerRank, kRowsPerRank)),
                    y.narrow(0, rank * kRowsPerRank, kRowsPerRank))
        .backward();
    ddp.finishGradientSync();
    optimizer->step();

    referenceOptimizer->zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    referenceOptimizer->step();
  }
  expectClose(*model, *reference, ctx.arg("optim") + " after " + std::to_string(kSteps) + " steps");
  expectReplicasIdentical(*model, comm);

  const DdpSyncStats total = ddp.totalStats();
  TESSERA_CHECK_EQ(total.steps, kSteps);
  TESSERA_CHECK_EQ(total.buckets, kSteps * buckets);
  // Every parameter is used, so the last gradient hook launches the last
  // bucket: nothing is left for finishGradientSync() to launch.
  TESSERA_CHECK_EQ(total.bucketsLaunchedInBackward, total.buckets);
  TESSERA_CHECK(total.commSeconds > 0, "communication time was not measured");
  TESSERA_CHECK(total.exposedSeconds >= 0 && total.exposedSeconds <= total.commSeconds,
                "exposed " << total.exposedSeconds << " s, communication " << total.commSeconds << " s");
  TESSERA_CHECK(total.hiddenFraction() >= 0 && total.hiddenFraction() <= 1, "fraction " << total.hiddenFraction());
  TESSERA_CHECK_EQ(ddp.lastStepStats().steps, 1);
  expectPerCommSumsToTotal(total);
  TESSERA_CHECK_EQ(total.bytesByComm.size(), 1u);
  TESSERA_CHECK_EQ(total.bytesByComm.count(comm->name()), 1u);
  std::printf("rank %d: %d buckets, comm %.6f s, exposed %.6f s, hidden fraction %.3f\n", rank, buckets,
              total.commSeconds, total.exposedSeconds, total.hiddenFraction());
}

// Two micro-batches per step, the first inside noSync(): equals one big batch,
// and the noSync backward sends nothing.
TESSERA_WORKER(ddp_no_sync) {
  const comm::CommPtr comm = ctx.world();
  const int ranks = comm->size();
  const int rank = comm->rank();
  constexpr int64_t kRowsPerMicro = 3;
  constexpr int kMicro = 2;
  constexpr int kSteps = 3;

  torch::nn::Sequential reference = makeModel(7);
  torch::nn::Sequential model = makeModel(7);
  DdpConfig config;
  config.bucketCapBytes = 300;
  Ddp ddp(*model, comm, config);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  torch::optim::SGD referenceOptimizer(reference->parameters(), torch::optim::SGDOptions(0.1));

  for (int step = 0; step < kSteps; ++step) {
    const auto [x, y] = globalBatch(step, kMicro * ranks * kRowsPerMicro);
    // Micro-batch m of rank r: rows [(m*N + r)*b, +b).
    auto microLoss = [&, &x = x, &y = y](int micro) {
      const int64_t start = (micro * ranks + rank) * kRowsPerMicro;
      return torch::mse_loss(model->forward(x.narrow(0, start, kRowsPerMicro)), y.narrow(0, start, kRowsPerMicro)) /
             kMicro;
    };
    optimizer.zero_grad();
    const uint64_t callsBefore = comm->stats().of(comm::OpKind::kAllReduce).calls;
    {
      auto noSync = ddp.noSync();
      microLoss(0).backward();
      ddp.finishGradientSync();  // inside noSync: does nothing
    }
    TESSERA_CHECK_EQ(comm->stats().of(comm::OpKind::kAllReduce).calls, callsBefore);
    microLoss(1).backward();
    ddp.finishGradientSync();
    optimizer.step();

    referenceOptimizer.zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    referenceOptimizer.step();
  }
  expectClose(*model, *reference, "noSync accumulation");
  expectReplicasIdentical(*model, comm);
  TESSERA_CHECK_EQ(ddp.totalStats().steps, kSteps);
}

// A trunk every rank uses, a branch only rank 0 uses, and a layer nobody uses.
struct BranchyImpl : torch::nn::Module {
  BranchyImpl()
      : trunk(register_module("trunk", torch::nn::Linear(kIn, kOut))),
        rankZeroOnly(register_module("rank_zero_only", torch::nn::Linear(kIn, kOut))),
        unused(register_module("unused", torch::nn::Linear(kIn, kOut))) {}
  at::Tensor forward(const at::Tensor& x, bool useBranch) {
    at::Tensor out = trunk(x);
    return useBranch ? out + rankZeroOnly(x) : out;
  }
  torch::nn::Linear trunk, rankZeroOnly, unused;
};
TORCH_MODULE(Branchy);

// Unused parameters never hang: with findUnusedParameters every step
// completes and replicas agree; without it every rank gets a clear error and
// the group stays usable.
TESSERA_WORKER(ddp_unused) {
  const comm::CommPtr comm = ctx.world();
  const int rank = comm->rank();
  torch::manual_seed(3);
  Branchy model;
  DdpConfig config;
  config.bucketCapBytes = std::stoll(ctx.arg("bucket_bytes"));
  config.findUnusedParameters = true;
  Ddp ddp(*model, comm, config);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  for (int step = 0; step < 3; ++step) {
    const auto [x, y] = globalBatch(step, 4);
    optimizer.zero_grad();
    torch::mse_loss(model->forward(x, /*useBranch=*/rank == 0), y).backward();
    ddp.finishGradientSync();
    testing::expectTensorsEqual(model->unused->weight.grad(), torch::zeros({kOut, kIn}), "unused layer's grad");
    TESSERA_CHECK(model->rankZeroOnly->weight.grad().abs().sum().item<double>() > 0,
                  "rank 0's branch gradient was not averaged into rank " << rank);
    // The unused layer's buckets can only launch at finish time.
    TESSERA_CHECK_LT(ddp.lastStepStats().bucketsLaunchedInBackward, ddp.lastStepStats().buckets);
    optimizer.step();
  }
  expectReplicasIdentical(*model, comm);

  Branchy strict;
  DdpConfig strictConfig;
  strictConfig.bucketCapBytes = config.bucketCapBytes;
  Ddp strictDdp(*strict, comm, strictConfig);
  torch::mse_loss(strict->forward(globalBatch(0, 4).first, false), globalBatch(0, 4).second).backward();
  bool threw = false;
  try {
    strictDdp.finishGradientSync();
  } catch (const InvalidArgument& error) {
    threw = std::string(error.what()).find("findUnusedParameters") != std::string::npos;
  }
  TESSERA_CHECK(threw, "an unused parameter without findUnusedParameters must throw InvalidArgument");
  comm->barrier();  // the group still works
}

// Two groups on 4 ranks: the first layer ("0.*") averaged over pairs of ranks
// {0, 1}, {2, 3} (a split of the world), everything else over the world. The
// first layer's gradient must be its pair's average (the gradient of the
// pair's combined rows), the rest the world's (the gradient of the global
// batch), and the traffic is reported per communicator.
TESSERA_WORKER(ddp_groups) {
  const comm::CommPtr world = ctx.world();
  const int rank = world->rank();
  constexpr int64_t kRows = 3;
  const comm::CommPtr pair = world->split(rank / 2, rank, "pair");
  auto firstLayer = [](const std::string& name) { return name.rfind("0.", 0) == 0; };

  torch::nn::Sequential reference = makeModel(4);
  torch::nn::Sequential model = makeModel(4);
  DdpConfig config;
  config.bucketCapBytes = 256;
  Ddp ddp(*model, std::vector<DdpGroup>{{pair, firstLayer}, {world, nullptr}}, config);
  for (const auto& bucket : ddp.bucketParameterNames()) {
    for (const std::string& name : bucket) {
      TESSERA_CHECK_EQ(firstLayer(name), firstLayer(bucket.front()));  // a bucket never mixes groups
    }
  }

  const auto [x, y] = globalBatch(0, world->size() * kRows);
  torch::mse_loss(model->forward(x.narrow(0, rank * kRows, kRows)), y.narrow(0, rank * kRows, kRows)).backward();
  ddp.finishGradientSync();
  const auto pairGrads = localGradients(reference, x, y, (rank / 2) * 2 * kRows, 2 * kRows);
  const auto worldGrads = localGradients(reference, x, y, 0, world->size() * kRows);
  const auto named = model->named_parameters();
  for (size_t i = 0; i < named.size(); ++i) {
    const at::Tensor& expected = firstLayer(named[i].key()) ? pairGrads[i] : worldGrads[i];
    testing::expectTensorsEqual(named[i].value().grad(), expected, "gradient of '" + named[i].key() + "'", 1e-6,
                                1e-5);
  }

  const DdpSyncStats stats = ddp.totalStats();
  expectPerCommSumsToTotal(stats);
  const int64_t firstLayerBytes = (kIn * 16 + 16) * 4;
  TESSERA_CHECK_EQ(stats.bytesByComm.at(pair->name()), firstLayerBytes);
  TESSERA_CHECK_EQ(stats.bytesByComm.at(world->name()), stats.bytes - firstLayerBytes);
  TESSERA_CHECK_EQ(stats.exposedSecondsByComm.size(), 2u);
}

testing::RunOptions options(int ranks, std::map<std::string, std::string> args, std::string backend = "gloo") {
  testing::RunOptions run;
  run.ranks = ranks;
  run.backend = std::move(backend);
  run.deadline = std::chrono::seconds(60);
  run.args = std::move(args);
  return run;
}

// 256-byte buckets: every parameter of the model lands in its own bucket.
const std::map<std::string, std::string> kSmallBuckets = {
    {"bucket_bytes", "256"}, {"min_buckets", "6"}, {"max_buckets", "6"}};
const std::map<std::string, std::string> kOneBucket = {
    {"bucket_bytes", std::to_string(25 * 1024 * 1024)}, {"min_buckets", "1"}, {"max_buckets", "1"}};

std::map<std::string, std::string> with(std::map<std::string, std::string> args, const std::string& optim) {
  args["optim"] = optim;
  return args;
}

TEST(DdpLayout, BucketsInReverseRegistrationOrder) {
  torch::nn::Sequential model = makeModel(1);
  DdpConfig config;
  config.bucketCapBytes = 300;  // b3+w3 = 272 bytes fit; b2 starts a new bucket
  Ddp ddp(*model, comm::makeSingleRankCommunicator(), config);
  const std::vector<std::vector<std::string>> expected = {
      {"4.bias", "4.weight"}, {"2.bias"}, {"2.weight"}, {"0.bias"}, {"0.weight"}};
  EXPECT_EQ(ddp.bucketParameterNames(), expected);
}

TEST(DdpLayout, RejectsBadConfigAndArguments) {
  torch::nn::Sequential model = makeModel(1);
  DdpConfig config;
  config.bucketCapBytes = 0;
  try {
    Ddp ddp(*model, comm::makeSingleRankCommunicator(), config);
    FAIL() << "bucketCapBytes = 0 was accepted";
  } catch (const ConfigError& error) {
    EXPECT_EQ(error.field(), "ddp.bucket_cap_bytes");
  }
  EXPECT_THROW(Ddp(*model, nullptr), InvalidArgument);
  EXPECT_THROW(Ddp({{"x", torch::zeros({2})}}, comm::makeSingleRankCommunicator()), InvalidArgument);
}

TEST(DdpLayout, GroupsSplitBucketsAndRejectBadSelections) {
  torch::nn::Sequential model = makeModel(1);
  const comm::CommPtr a = comm::makeSingleRankCommunicator("a");
  const comm::CommPtr b = comm::makeSingleRankCommunicator("b");
  auto middle = [](const std::string& name) { return name.rfind("2.", 0) == 0; };
  Ddp ddp(*model, std::vector<DdpGroup>{{a, middle}, {b, nullptr}});  // default cap: one bucket per group run
  const std::vector<std::vector<std::string>> expected = {
      {"4.bias", "4.weight"}, {"2.bias", "2.weight"}, {"0.bias", "0.weight"}};
  EXPECT_EQ(ddp.bucketParameterNames(), expected);
  ASSERT_EQ(ddp.groups().size(), 2u);

  // A name no group selects, a group that selects nothing, a null comm.
  torch::nn::Sequential other = makeModel(1);
  EXPECT_THROW(Ddp(*other, std::vector<DdpGroup>{{a, middle}}), InvalidArgument);
  EXPECT_THROW(Ddp(*other, std::vector<DdpGroup>{{b, nullptr}, {a, middle}}), InvalidArgument);
  EXPECT_THROW(Ddp(*other, std::vector<DdpGroup>{{nullptr, nullptr}}), InvalidArgument);
  EXPECT_THROW(Ddp(*other, std::vector<DdpGroup>{}), InvalidArgument);
}

TEST(DdpLayout, NoSyncAfterSyncedBackwardStartedIsRejected) {
  torch::nn::Sequential model = makeModel(1);
  Ddp ddp(*model, comm::makeSingleRankCommunicator());
  model->forward(torch::randn({2, kIn})).sum().backward();
  EXPECT_THROW({ auto guard = ddp.noSync(); }, InvalidArgument);
  ddp.finishGradientSync();
  EXPECT_NO_THROW({ auto guard = ddp.noSync(); });
}

TEST(Ddp, SgdMatchesSingleProcessSmallBuckets) {
  const auto result = testing::runWorkers("ddp_equivalence", options(2, with(kSmallBuckets, "sgd")));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, SgdMatchesSingleProcessOneBucket3Ranks) {
  const auto result = testing::runWorkers("ddp_equivalence", options(3, with(kOneBucket, "sgd")));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, AdamWMatchesSingleProcessSmallBuckets3Ranks) {
  const auto result = testing::runWorkers("ddp_equivalence", options(3, with(kSmallBuckets, "adamw")));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, AdamWMatchesSingleProcessOneBucket) {
  const auto result = testing::runWorkers("ddp_equivalence", options(2, with(kOneBucket, "adamw")));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, NoSyncAccumulationMatchesBigBatch) {
  const auto result = testing::runWorkers("ddp_no_sync", options(3, {}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, UnusedParametersDoNotHang) {
  const auto result = testing::runWorkers("ddp_unused", options(2, {{"bucket_bytes", "64"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, TwoGroupsReduceOverTheirOwnCommunicators) {
  const auto result = testing::runWorkers("ddp_groups", options(4, {}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Ddp, AdamWMatchesSingleProcessOnMpi) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "MPI not built or mpirun not on PATH";
  const auto result = testing::runWorkers("ddp_equivalence", options(2, with(kSmallBuckets, "adamw"), "mpi"));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
