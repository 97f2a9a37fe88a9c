// Tests of launch detection (detectLaunch, a pure function of env maps: one
// test per launcher's conventions and per bad variable) and of tessera::init()
// in-process: single rank, rank 0 hosting the store, an unreachable store.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/launcher/init.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"
#include "tests/launcher/subprocess.h"

namespace tessera::launcher {
namespace {

// The message of the InvalidArgument detectLaunch throws for env, or "" if none.
std::string launchError(const EnvMap& env, const std::string& backend = "auto", bool mpiBuilt = true) {
  try {
    detectLaunch(env, backend, mpiBuilt);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(DetectLaunch, NoVariablesIsASingleProcess) {
  const LaunchInfo info = detectLaunch({}, "auto", true);
  EXPECT_EQ(info.launchedBy, "single");
  EXPECT_EQ(info.backend, "single");
  EXPECT_EQ(info.rank, 0);
  EXPECT_EQ(info.worldSize, 1);
  EXPECT_EQ(info.localWorldSize, 1);
  EXPECT_EQ(info.masterPort, 0);
}

TEST(DetectLaunch, TorchrunStyleEnvironment) {
  const LaunchInfo info = detectLaunch({{"RANK", "6"},
                                        {"WORLD_SIZE", "8"},
                                        {"LOCAL_RANK", "2"},
                                        {"LOCAL_WORLD_SIZE", "4"},
                                        {"GROUP_RANK", "1"},
                                        {"MASTER_ADDR", "10.0.0.1"},
                                        {"MASTER_PORT", "29400"}},
                                       "auto", true);
  EXPECT_EQ(info.launchedBy, "env");
  EXPECT_EQ(info.backend, "gloo");
  EXPECT_EQ(info.rank, 6);
  EXPECT_EQ(info.worldSize, 8);
  EXPECT_EQ(info.localRank, 2);
  EXPECT_EQ(info.localWorldSize, 4);
  EXPECT_EQ(info.nodeRank, 1);
  EXPECT_EQ(info.masterAddr, "10.0.0.1");
  EXPECT_EQ(info.masterPort, 29400);
  EXPECT_FALSE(info.storeHostedByLauncher);
  EXPECT_TRUE(info.multiNode());
}

TEST(DetectLaunch, MinimalEnvironmentDefaultsToOneNodeOnLoopback) {
  const LaunchInfo info = detectLaunch({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1234"}}, "auto", true);
  EXPECT_EQ(info.localRank, 1);
  EXPECT_EQ(info.localWorldSize, 2);
  EXPECT_EQ(info.nodeRank, 0);
  EXPECT_EQ(info.masterAddr, "127.0.0.1");
}

TEST(DetectLaunch, TorchElasticAgentStoreCountsAsHosted) {
  const LaunchInfo info = detectLaunch(
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1234"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}}, "auto",
      true);
  EXPECT_TRUE(info.storeHostedByLauncher);
}

TEST(DetectLaunch, TesseraRunWinsOverSlurmAndMpirunVariables) {
  // `srun tessera-run ...` leaves SLURM_* in every worker's environment.
  const LaunchInfo info = detectLaunch({{"TESSERA_LAUNCHER", "tessera-run"},
                                        {"TESSERA_STORE_HOSTED", "1"},
                                        {"TESSERA_RESTART_COUNT", "2"},
                                        {"TESSERA_BACKEND", "gloo"},
                                        {"RANK", "3"},
                                        {"WORLD_SIZE", "4"},
                                        {"LOCAL_RANK", "1"},
                                        {"LOCAL_WORLD_SIZE", "2"},
                                        {"GROUP_RANK", "1"},
                                        {"MASTER_ADDR", "node0"},
                                        {"MASTER_PORT", "29500"},
                                        {"SLURM_PROCID", "0"},
                                        {"SLURM_NTASKS", "1"},
                                        {"OMPI_COMM_WORLD_SIZE", "1"},
                                        {"OMPI_COMM_WORLD_RANK", "0"}},
                                       "auto", true);
  EXPECT_EQ(info.launchedBy, "tessera-run");
  EXPECT_EQ(info.backend, "gloo");
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.nodeRank, 1);
  EXPECT_TRUE(info.storeHostedByLauncher);
  EXPECT_EQ(info.restartCount, 2);
  EXPECT_EQ(info.masterAddr, "node0");
}

const EnvMap kMpirun = {{"OMPI_COMM_WORLD_RANK", "5"},
                        {"OMPI_COMM_WORLD_SIZE", "8"},
                        {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                        {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}};

TEST(DetectLaunch, MpirunChoosesMpiWhenBuilt) {
  const LaunchInfo info = detectLaunch(kMpirun, "auto", true);
  EXPECT_EQ(info.launchedBy, "mpirun");
  EXPECT_EQ(info.backend, "mpi");
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.worldSize, 8);
  EXPECT_EQ(info.localRank, 1);
  EXPECT_EQ(info.localWorldSize, 4);
  EXPECT_EQ(info.nodeRank, 1);
  EXPECT_EQ(info.masterPort, 0);  // MPI needs no store
}

TEST(DetectLaunch, MpirunWithoutMpiFallsBackToGlooAndNeedsAStore) {
  EXPECT_NE(launchError(kMpirun, "auto", /*mpiBuilt=*/false).find("MASTER_PORT is not set"), std::string::npos);
  EnvMap env = kMpirun;
  env["MASTER_ADDR"] = "10.0.0.1";
  env["MASTER_PORT"] = "29500";
  EXPECT_EQ(detectLaunch(env, "auto", false).backend, "gloo");
}

TEST(DetectLaunch, ExplicitBackendWinsOverTesseraBackendVariable) {
  EnvMap env = kMpirun;
  env["TESSERA_BACKEND"] = "mpi";
  env["MASTER_PORT"] = "29500";
  env["MASTER_ADDR"] = "10.0.0.1";
  EXPECT_EQ(detectLaunch(env, "gloo", true).backend, "gloo");
  env["TESSERA_BACKEND"] = "gloo";
  EXPECT_EQ(detectLaunch(env, "auto", true).backend, "gloo");
}

TEST(DetectLaunch, SlurmWithCompressedTasksPerNode) {
  const LaunchInfo info = detectLaunch({{"SLURM_PROCID", "5"},
                                        {"SLURM_NTASKS", "8"},
                                        {"SLURM_LOCALID", "1"},
                                        {"SLURM_NODEID", "1"},
                                        {"SLURM_TASKS_PER_NODE", "4(x2)"},
                                        {"SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"},
                                        {"SLURM_JOB_ID", "123456"}},
                                       "auto", true);
  EXPECT_EQ(info.launchedBy, "slurm");
  EXPECT_EQ(info.backend, "gloo");
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.worldSize, 8);
  EXPECT_EQ(info.localRank, 1);
  EXPECT_EQ(info.localWorldSize, 4);
  EXPECT_EQ(info.nodeRank, 1);
  EXPECT_EQ(info.masterAddr, "10.1.2.3");
  EXPECT_EQ(info.masterPort, 10000 + 123456 % 20000);  // derived from the job id
}

TEST(DetectLaunch, SlurmPrefersNtasksPerNodeAndMasterVariables) {
  const LaunchInfo info = detectLaunch({{"SLURM_PROCID", "2"},
                                        {"SLURM_NTASKS", "4"},
                                        {"SLURM_LOCALID", "0"},
                                        {"SLURM_NODEID", "1"},
                                        {"SLURM_NTASKS_PER_NODE", "2"},
                                        {"SLURM_TASKS_PER_NODE", "garbage"},
                                        {"MASTER_ADDR", "head"},
                                        {"MASTER_PORT", "4000"},
                                        {"SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"}},
                                       "auto", true);
  EXPECT_EQ(info.localWorldSize, 2);
  EXPECT_EQ(info.masterAddr, "head");
  EXPECT_EQ(info.masterPort, 4000);
}

TEST(SlurmTasksPerNode, ExpandsRepeats) {
  EXPECT_EQ(parseSlurmTasksPerNode("4", 0), 4);
  EXPECT_EQ(parseSlurmTasksPerNode("2(x3),1", 0), 2);
  EXPECT_EQ(parseSlurmTasksPerNode("2(x3),1", 2), 2);
  EXPECT_EQ(parseSlurmTasksPerNode("2(x3),1", 3), 1);
  for (const char* bad : {"", "x", "2(x", "2(3)", "2(x0)", "0"}) {
    EXPECT_THROW(parseSlurmTasksPerNode(bad, 0), InvalidArgument) << bad;
  }
  EXPECT_THROW(parseSlurmTasksPerNode("2(x3),1", 4), InvalidArgument);
}

TEST(DetectLaunch, BadVariablesNameTheVariableAndTheFix) {
  std::string error = launchError({{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"MASTER_PORT", "1"}});
  EXPECT_NE(error.find("RANK=4 is out of range for WORLD_SIZE=4"), std::string::npos) << error;
  EXPECT_NE(error.find("[0, 4)"), std::string::npos) << error;

  error = launchError({{"RANK", "abc"}, {"WORLD_SIZE", "4"}});
  EXPECT_NE(error.find("RANK='abc' is not an integer"), std::string::npos) << error;
  error = launchError({{"RANK", "1"}, {"WORLD_SIZE", "4x"}});
  EXPECT_NE(error.find("WORLD_SIZE='4x'"), std::string::npos) << error;

  error = launchError({{"RANK", "0"}, {"WORLD_SIZE", "2"}});
  EXPECT_NE(error.find("MASTER_PORT is not set"), std::string::npos) << error;
  EXPECT_NE(error.find("tessera-run"), std::string::npos) << error;

  error = launchError({{"RANK", "0"}});
  EXPECT_NE(error.find("WORLD_SIZE is not set"), std::string::npos) << error;
  error = launchError({{"WORLD_SIZE", "2"}});
  EXPECT_NE(error.find("RANK is not set"), std::string::npos) << error;

  error = launchError({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}});
  EXPECT_NE(error.find("MASTER_PORT=70000"), std::string::npos) << error;

  error = launchError({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_PORT", "1"}});
  EXPECT_NE(error.find("MASTER_ADDR is not set"), std::string::npos) << error;

  error = launchError({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "3"}, {"LOCAL_WORLD_SIZE", "2"}});
  EXPECT_NE(error.find("LOCAL_RANK=3"), std::string::npos) << error;

  error = launchError({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "8"}});
  EXPECT_NE(error.find("SLURM_PROCID=9"), std::string::npos) << error;
}

TEST(DetectLaunch, BadBackendChoices) {
  std::string error = launchError({{"TESSERA_BACKEND", "ucc"}});
  EXPECT_NE(error.find("TESSERA_BACKEND='ucc'"), std::string::npos) << error;
  error = launchError({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1"}, {"TESSERA_BACKEND", "mpi"}});
  EXPECT_NE(error.find("backend mpi needs processes started by mpirun"), std::string::npos) << error;
  EXPECT_NE(launchError({}, "ucc").find("not one of auto, gloo, mpi"), std::string::npos);
}

TEST(DetectLaunch, DescribeNamesEverything) {
  const LaunchInfo info = detectLaunch({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1234"}}, "auto", true);
  EXPECT_EQ(info.describe(),
            "rank 1/2 (local 1/2, node 0), backend gloo, store 127.0.0.1:1234 hosted by rank 0, launched by env");
}

TEST(InitOptions, ValidateNamesTheField) {
  InitOptions options;
  options.backend = "ucc";
  try {
    options.validate();
    FAIL() << "validate() accepted backend 'ucc'";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "backend");
  }
  options = InitOptions{};
  options.timeout = comm::Timeout(0);
  EXPECT_THROW(options.validate(), ConfigError);
  options = InitOptions{};
  options.storeTimeout = std::chrono::milliseconds(-1);
  EXPECT_THROW(options.validate(), ConfigError);
  options = InitOptions{};
  options.device = "gpu";
  EXPECT_EQ(testing::configErrorOf([&] { options.validate(); }).field(), "device");
}

TEST(Init, SingleProcessGetsAWorldOfOne) {
  DistributedContext ctx = init({}, EnvMap{});
  EXPECT_EQ(ctx.info.launchedBy, "single");
  ASSERT_NE(ctx.world, nullptr);
  ASSERT_NE(ctx.store, nullptr);
  EXPECT_EQ(ctx.world->size(), 1);
  EXPECT_EQ(ctx.world->backend(), "single");
  at::Tensor t = at::full({3}, 2.0);
  ctx.world->allReduce(t, comm::ReduceOp::kSum);
  EXPECT_TRUE(at::equal(t, at::full({3}, 2.0)));
  ctx.store->setString("k", "v");
  EXPECT_EQ(ctx.store->getString("k"), "v");
}

TEST(Init, RankZeroHostsTheStoreWithoutALauncher) {
  const EnvMap env = {{"RANK", "0"},
                      {"WORLD_SIZE", "1"},
                      {"TESSERA_BACKEND", "gloo"},
                      {"MASTER_PORT", std::to_string(testing::pickFreePort())}};
  DistributedContext ctx = init({}, env);
  EXPECT_EQ(ctx.world->backend(), "gloo");
  at::Tensor t = at::full({2}, 3.0);
  ctx.world->allReduce(t);
  EXPECT_TRUE(at::equal(t, at::full({2}, 3.0)));
}

TEST(Init, UnreachableStoreThrowsStoreError) {
  InitOptions options;
  options.storeTimeout = std::chrono::milliseconds(500);
  const EnvMap env = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", std::to_string(testing::pickFreePort())}};
  EXPECT_THROW(init(options, env), StoreError);
}

TEST(Init, BadOptionsThrowBeforeAnythingElse) {
  InitOptions options;
  options.backend = "tcp";
  EXPECT_THROW(init(options, EnvMap{}), ConfigError);
}

// A CUDA device picks NCCL for a world of more than one, whatever tessera-run
// exported for its own store; a world of 1 needs no backend. Explicit NCCL
// meets through the store like Gloo.
TEST(DetectLaunch, CudaDevicePicksNccl) {
  EXPECT_EQ(detectLaunch({}, "auto", true, /*cuda=*/true).backend, "single");
  const EnvMap two = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1234"}, {"TESSERA_BACKEND", "gloo"}};
  EXPECT_EQ(detectLaunch(two, "auto", true, /*cuda=*/true).backend, "nccl");
  EXPECT_EQ(detectLaunch(two, "auto", true, /*cuda=*/false).backend, "gloo");  // the CPU: as before
  EXPECT_EQ(detectLaunch(two, "nccl", true).backend, "nccl");
  EXPECT_EQ(detectLaunch({}, "nccl", true).backend, "nccl");  // explicit: an NCCL world of 1
  const std::string noPort = launchError({{"RANK", "1"}, {"WORLD_SIZE", "2"}}, "nccl");
  EXPECT_NE(noPort.find("MASTER_PORT is not set, but a NCCL world of 2"), std::string::npos) << noPort;
  EXPECT_NE(launchError({}, "ucc").find("auto, gloo, mpi, nccl"), std::string::npos);
}

// On this machine (CPU-only libtorch) a CUDA device is a ConfigError naming
// the key the caller gave; NCCL on the CPU names the backend's key.
TEST(Init, DeviceAndBackendErrorsNameTheCallersKeys) {
  InitOptions options;
  options.deviceKey = "train.device";
  options.backendKey = "parallel.backend";
  options.device = "cuda:x";
  EXPECT_EQ(testing::configErrorOf([&] { init(options, EnvMap{}); }).field(), "train.device");
  options.device = "cpu";
  options.backend = "nccl";
  const ConfigError cpuNccl = testing::configErrorOf([&] { init(options, EnvMap{}); });
  EXPECT_EQ(cpuNccl.field(), "parallel.backend");
  EXPECT_NE(std::string(cpuNccl.what()).find("set train.device = \"cuda\""), std::string::npos) << cpuNccl.what();
  if (at::hasCUDA() && torch::cuda::device_count() > 0) GTEST_SKIP() << "CUDA is available here";
  options.backend = "auto";
  options.device = "cuda";
  const ConfigError noCuda = testing::configErrorOf([&] { init(options, EnvMap{}); });
  EXPECT_EQ(noCuda.field(), "train.device");
  EXPECT_NE(std::string(noCuda.what()).find("CUDA"), std::string::npos) << noCuda.what();
}

TEST(Init, ExplicitCpuDeviceIsTheDefault) {
  InitOptions options;
  options.device = "cpu";
  DistributedContext ctx = init(options, EnvMap{});
  EXPECT_TRUE(ctx.device.is_cpu());
  EXPECT_EQ(ctx.hostWorld, nullptr);
  EXPECT_EQ(ctx.host(), ctx.world);
}

// Every rank runs init() over a torchrun-style environment without a
// launcher-hosted store: rank 0 hosts it, the others connect.
TESSERA_WORKER(init_rank0_hosts_store) {
  const EnvMap env = {{"RANK", std::to_string(ctx.rank)},
                      {"WORLD_SIZE", std::to_string(ctx.size)},
                      {"MASTER_ADDR", "127.0.0.1"},
                      {"MASTER_PORT", ctx.arg("port")}};
  InitOptions options;
  options.timeout = std::chrono::seconds(30);
  options.storeTimeout = std::chrono::seconds(30);
  DistributedContext dist = init(options, env);
  TESSERA_CHECK_EQ(dist.info.launchedBy, std::string("env"));
  at::Tensor t = at::full({4}, static_cast<double>(dist.rank() + 1));
  dist.world->allReduce(t);
  const double expected = dist.worldSize() * (dist.worldSize() + 1) / 2.0;
  TESSERA_CHECK(at::equal(t, at::full({4}, expected)), "sum " << t << " != " << expected);
  dist.world->barrier();
}

TEST(Init, EnvironmentLaunchWithRankZeroHostingTheStore) {
  testing::RunOptions run;
  run.ranks = 3;
  run.deadline = std::chrono::seconds(60);
  run.args["port"] = std::to_string(testing::pickFreePort());
  const testing::RunResult result = testing::runWorkers("init_rank0_hosts_store", run);
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::launcher
