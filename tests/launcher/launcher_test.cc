// End-to-end tests of tessera-run, run as a subprocess on loopback: the
// variables each worker sees, failure and signal reports, signal forwarding,
// bad flags, restarts, two "nodes" on one machine, and allreduce_smoke.
// Every wait has a deadline (Subprocess), so a launcher bug fails, not hangs.
#include <gtest/gtest.h>
#include <signal.h>

#include <regex>

#include "tessera/comm/mpi.h"
#include "tests/launcher/subprocess.h"

namespace tessera::testing {
namespace {

using std::chrono::seconds;

const std::string kRun = TESSERA_RUN_PATH;
const std::string kWorker = LAUNCHER_TEST_WORKER_PATH;
const std::string kSmoke = ALLREDUCE_SMOKE_PATH;

const std::vector<std::string>& kForeignLaunchVars = testing::foreignLaunchVariables();

std::vector<std::string> runArgs(std::vector<std::string> flagsAndCommand) {
  flagsAndCommand.insert(flagsAndCommand.begin(), kRun);
  return flagsAndCommand;
}

ProcessResult tesseraRun(const std::vector<std::string>& flagsAndCommand, seconds timeout = seconds(60)) {
  return runProcess(runArgs(flagsAndCommand), timeout, {}, kForeignLaunchVars);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(TesseraRun, SetsTheLaunchVariablesOfEveryWorker) {
  const ProcessResult r =
      tesseraRun({"--nproc-per-node", "3", "--master-port", "0", kWorker, "env", "--worker-flag", "x"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  std::smatch port;
  ASSERT_TRUE(std::regex_search(r.output, port, std::regex("store tcp://127\\.0\\.0\\.1:([0-9]+) hosted here")))
      << r.output;
  EXPECT_TRUE(contains(r.output, "world size 3")) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string p = "[rank " + std::to_string(rank) + "] ";
    for (const std::string& line :
         {"ENV RANK=" + std::to_string(rank), std::string("ENV WORLD_SIZE=3"), "ENV LOCAL_RANK=" + std::to_string(rank),
          std::string("ENV LOCAL_WORLD_SIZE=3"), std::string("ENV GROUP_RANK=0"),
          std::string("ENV MASTER_ADDR=127.0.0.1"), "ENV MASTER_PORT=" + port[1].str(),
          std::string("ENV TESSERA_BACKEND=gloo"), std::string("ENV TESSERA_LAUNCHER=tessera-run"),
          std::string("ENV TESSERA_STORE_HOSTED=1"), std::string("ENV TESSERA_RESTART_COUNT=0"),
          std::string("ARGV env --worker-flag x")}) {
      EXPECT_TRUE(contains(r.output, p + line + "\n")) << "missing '" << p + line << "' in\n" << r.output;
    }
  }
}

TEST(TesseraRun, AcceptsUnderscoreFlagsAndDoubleDash) {
  const ProcessResult r = tesseraRun({"--nproc_per_node=2", "--master_port", "0", "--", kWorker, "env"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 1] ENV WORLD_SIZE=2")) << r.output;
}

TEST(TesseraRun, FailingWorkerStopsTheJobAndIsReported) {
  const ProcessResult r = tesseraRun({"--nproc-per-node", "3", "--master-port", "0", kWorker, "fail", "1", "3"});
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_LT(r.seconds, 20) << "the sleeping ranks were not stopped\n" << r.output;
  EXPECT_TRUE(contains(r.output, "rank 1 exited with code 3; stopping the other 2 workers")) << r.output;
  EXPECT_TRUE(contains(r.output, "last 20 lines of rank 1:")) << r.output;
  EXPECT_TRUE(contains(r.output, "  | line 30\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "  | about to fail\n")) << r.output;
  EXPECT_FALSE(contains(r.output, "  | line 5\n")) << "kept more than 20 lines\n" << r.output;
  EXPECT_TRUE(contains(r.output, "job failed after")) << r.output;
  EXPECT_FALSE(contains(r.output, "gave up sleeping")) << r.output;
}

TEST(TesseraRun, WorkerKilledByASignalIsNamed) {
  const ProcessResult r = tesseraRun({"--nproc-per-node", "2", "--master-port", "0", kWorker, "crash", "0"});
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 0 was killed by SIGSEGV (signal 11")) << r.output;
  EXPECT_TRUE(contains(r.output, "  | about to crash")) << r.output;
}

TEST(TesseraRun, BlamesTheRankThatDiedNotThePeersItBroke) {
  const ProcessResult r =
      tesseraRun({"--nproc-per-node", "3", "--master-port", "0", kWorker, "crash-in-collective", "1"});
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "tessera-run: rank 1 was killed by SIGSEGV")) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("job failed after [0-9.]+ s: rank 1 was killed by SIGSEGV")))
      << r.output;
}

TEST(TesseraRun, ForwardsSigtermToTheWorkers) {
  Subprocess run(runArgs({"--nproc-per-node", "2", "--master-port", "0", kWorker, "sleep"}), {}, kForeignLaunchVars);
  ASSERT_TRUE(run.waitForOutput("[rank 0] ready", seconds(20))) << run.output();
  ASSERT_TRUE(run.waitForOutput("[rank 1] ready", seconds(20))) << run.output();
  run.signal(SIGTERM);
  const ProcessResult r = run.wait(seconds(20));
  EXPECT_EQ(r.exitCode, 128 + SIGTERM) << r.output;
  EXPECT_TRUE(contains(r.output, "received SIGTERM; forwarding it to the workers")) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 0] got SIGTERM")) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 1] got SIGTERM")) << r.output;
}

TEST(TesseraRun, KillsWorkersThatIgnoreTheSignal) {
  Subprocess run(
      runArgs({"--nproc-per-node", "2", "--master-port", "0", "--grace-period", "0.5", kWorker, "ignore-term"}), {},
      kForeignLaunchVars);
  ASSERT_TRUE(run.waitForOutput("[rank 1] ready", seconds(20))) << run.output();
  ASSERT_TRUE(run.waitForOutput("[rank 0] ready", seconds(20))) << run.output();
  run.signal(SIGINT);
  const ProcessResult r = run.wait(seconds(20));
  EXPECT_EQ(r.exitCode, 128 + SIGINT) << r.output;
  EXPECT_TRUE(contains(r.output, "did not exit within 0.5 s of SIGINT; sending SIGKILL")) << r.output;
  EXPECT_FALSE(contains(r.output, "gave up sleeping")) << r.output;
}

struct BadFlags {
  std::string name;  // the test's name suffix
  std::vector<std::string> args;
  std::string expected;  // part of the error message
};

class TesseraRunBadFlags : public ::testing::TestWithParam<BadFlags> {};
// Short names in test listings (CTest shows what gtest prints for a parameter).
void PrintTo(const BadFlags& c, std::ostream* os) { *os << c.name; }

TEST_P(TesseraRunBadFlags, PrintUsageAndExitTwo) {
  std::vector<std::string> args = GetParam().args;
  for (auto& arg : args) {
    if (arg == "WORKER") arg = kWorker;
  }
  const ProcessResult r = tesseraRun(args, seconds(20));
  EXPECT_EQ(r.exitCode, 2) << r.output;
  EXPECT_TRUE(contains(r.output, GetParam().expected)) << r.output;
  EXPECT_TRUE(contains(r.output, "Usage: tessera-run [flags] PROGRAM [ARGS...]")) << r.output;
}

// "WORKER" stands for launcher_test_worker: an existing program, so only the flag is wrong.
const BadFlags kBadFlags[] = {
    {"NoArguments", {}, "missing the program to run"},
    {"NoProgram", {"--nproc-per-node", "2"}, "missing the program to run"},
    {"ZeroWorkers", {"--nproc-per-node", "0", "WORKER"}, "--nproc-per-node must be >= 1, got 0"},
    {"NonNumericWorkers", {"--nproc-per-node", "abc", "WORKER"}, "nproc-per-node"},
    {"EndpointWithoutPort", {"--rdzv-endpoint", "nohost", "WORKER"}, "--rdzv-endpoint 'nohost' is not host:port"},
    {"EndpointPortTooLarge", {"--rdzv-endpoint", "h:99999", "WORKER"}, "not a number in 0..65535"},
    {"NodeRankTooLarge", {"--nnodes", "2", "--node-rank", "2", "WORKER"}, "--node-rank 2 is out of range"},
    {"AnyPortWithTwoNodes", {"--nnodes", "2", "--master-port", "0", "WORKER"}, "works with --nnodes 1 only"},
    {"UnknownBackend", {"--backend", "nccl", "WORKER"}, "--backend must be gloo or mpi"},
    {"EndpointAndMasterPort", {"--rdzv-endpoint", "h:1", "--master-port", "2", "WORKER"}, "excludes"},
    {"UnknownFlag", {"--bogus", "WORKER"}, "unknown flag '--bogus'"},
    {"MissingProgram", {"/nonexistent/program"}, "program '/nonexistent/program' not found"},
};

INSTANTIATE_TEST_SUITE_P(Cases, TesseraRunBadFlags, ::testing::ValuesIn(kBadFlags),
                         [](const ::testing::TestParamInfo<BadFlags>& info) { return info.param.name; });

TEST(TesseraRun, PortInUseIsReportedWithTheFix) {
  const std::string port = std::to_string(pickFreePort());
  Subprocess first(runArgs({"--master-port", port, kWorker, "sleep"}), {}, kForeignLaunchVars);
  ASSERT_TRUE(first.waitForOutput("[rank 0] ready", seconds(20))) << first.output();
  const ProcessResult r = tesseraRun({"--master-port", port, kWorker, "env"}, seconds(20));
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "cannot host the TCP store on 127.0.0.1:" + port)) << r.output;
  EXPECT_TRUE(contains(r.output, "--master-port")) << r.output;
  first.signal(SIGTERM);
  EXPECT_EQ(first.wait(seconds(20)).exitCode, 128 + SIGTERM);
}

TEST(TesseraRun, HelpExitsZero) {
  const ProcessResult r = tesseraRun({"--help"}, seconds(20));
  EXPECT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "--nproc-per-node")) << r.output;
}

TEST(TesseraRun, InitSeesTheLaunchAndRendezvouses) {
  const ProcessResult r = tesseraRun({"--nproc-per-node", "3", "--master-port", "0", kWorker, "init"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string line = "[rank " + std::to_string(rank) + "] INIT rank=" + std::to_string(rank) +
                             " size=3 local=" + std::to_string(rank) +
                             "/3 node=0 backend=gloo by=tessera-run restart=0 sum=3\n";
    EXPECT_TRUE(contains(r.output, line)) << "missing " << line << "in\n" << r.output;
  }
}

TEST(TesseraRun, RestartsAllWorkersAfterAFailure) {
  const ProcessResult r =
      tesseraRun({"--nproc-per-node", "2", "--master-port", "0", "--max-restarts", "1", kWorker, "flaky"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 0 exited with code 3")) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all workers (restart 1 of 1)")) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "[rank 0] INIT rank=0 size=2 local=0/2 node=0 backend=gloo by=tessera-run "
                       "restart=1 sum=1"))
      << r.output;
}

// Two tessera-run processes on one machine play two nodes of 2 workers each.
std::vector<std::string> nodeArgs(int nodeRank, int port, std::vector<std::string> command) {
  std::vector<std::string> args =
      runArgs({"--nnodes", "2", "--node-rank", std::to_string(nodeRank), "--nproc-per-node", "2", "--rdzv-endpoint",
               "127.0.0.1:" + std::to_string(port), "--rdzv-timeout", "20"});
  args.insert(args.end(), command.begin(), command.end());
  return args;
}

TEST(TesseraRun, TwoNodesFormOneWorld) {
  const int port = pickFreePort();
  Subprocess node0(nodeArgs(0, port, {kWorker, "init"}), {}, kForeignLaunchVars);
  Subprocess node1(nodeArgs(1, port, {kWorker, "init"}), {}, kForeignLaunchVars);
  const ProcessResult r1 = node1.wait(seconds(60));
  const ProcessResult r0 = node0.wait(seconds(60));
  ASSERT_EQ(r0.exitCode, 0) << r0.output << "\n--- node 1 ---\n" << r1.output;
  ASSERT_EQ(r1.exitCode, 0) << r1.output << "\n--- node 0 ---\n" << r0.output;
  EXPECT_TRUE(contains(r0.output, "[rank 1] INIT rank=1 size=4 local=1/2 node=0 backend=gloo")) << r0.output;
  EXPECT_TRUE(contains(r1.output, "[rank 3] INIT rank=3 size=4 local=1/2 node=1 backend=gloo")) << r1.output;
  EXPECT_TRUE(contains(r1.output, "sum=6")) << r1.output;
}

TEST(TesseraRun, FailureOnOneNodeStopsTheOther) {
  const int port = pickFreePort();
  Subprocess node0(nodeArgs(0, port, {kWorker, "fail", "3", "5"}), {}, kForeignLaunchVars);
  Subprocess node1(nodeArgs(1, port, {kWorker, "fail", "3", "5"}), {}, kForeignLaunchVars);
  const ProcessResult r1 = node1.wait(seconds(40));
  const ProcessResult r0 = node0.wait(seconds(40));
  EXPECT_EQ(r1.exitCode, 1) << r1.output;
  EXPECT_EQ(r0.exitCode, 1) << r0.output;
  EXPECT_TRUE(contains(r1.output, "rank 3 exited with code 5")) << r1.output;
  EXPECT_TRUE(contains(r0.output, "node 1: rank 3 exited with code 5")) << r0.output;
  EXPECT_LT(r0.seconds, 25) << r0.output;
}

TEST(TesseraRun, AllreduceSmokeOnFourRanks) {
  const ProcessResult r = tesseraRun({"--nproc-per-node", "4", "--master-port", "0", kSmoke}, seconds(120));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 0] all-reduce of rank+1 over 4 ranks = 10 (expected 10): ok")) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 0] comm stats: {")) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 0] allreduce_smoke: OK")) << r.output;
  EXPECT_TRUE(contains(r.output, "all workers exited 0")) << r.output;
}

TEST(AllreduceSmoke, RunsAloneAsAWorldOfOne) {
  const ProcessResult r = runProcess({kSmoke}, seconds(60), {}, kForeignLaunchVars);
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "launched by single")) << r.output;
  EXPECT_TRUE(contains(r.output, "allreduce_smoke: OK")) << r.output;
}

TEST(TesseraRun, MpiBackendRunsMpirun) {
  if (!comm::mpiBackendBuilt()) {
    const ProcessResult r = tesseraRun({"--backend", "mpi", "--nproc-per-node", "2", kSmoke}, seconds(20));
    EXPECT_EQ(r.exitCode, 1) << r.output;
    EXPECT_TRUE(contains(r.output, "built without MPI") || contains(r.output, "mpirun, which is not on PATH"))
        << r.output;
    GTEST_SKIP() << "tessera was built without MPI; checked the error message only";
  }
  const ProcessResult r = tesseraRun({"--backend", "mpi", "--nproc-per-node", "2", kSmoke}, seconds(120));
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "backend mpi: running ")) << r.output;
  EXPECT_TRUE(contains(r.output, "--oversubscribe")) << r.output;
  EXPECT_TRUE(contains(r.output, "backend mpi")) << r.output;
  EXPECT_TRUE(contains(r.output, "allreduce_smoke: OK")) << r.output;
}

}  // namespace
}  // namespace tessera::testing
