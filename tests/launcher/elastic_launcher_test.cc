// End-to-end tests of `tessera-run --nnodes MIN:MAX` (elastic mode), run as a
// subprocess against a tessera store this test process hosts: the workers'
// environment (elastic.h's launcher contract), slots handed out by the store,
// restarts with new incarnations, eviction (exit 75), membership reports,
// the join secret, --host-store, and bad flags. Expected values are written
// out from the contract, never read back from the launcher.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include "tessera/comm/store_server.h"
#include "tests/launcher/subprocess.h"

namespace tessera::testing {
namespace {

using std::chrono::seconds;

const std::string kRun = TESSERA_RUN_PATH;
const std::string kWorker = ELASTIC_TEST_WORKER_PATH;
const std::string kSecret = "elastic-test-secret";

// Variables the test process may have inherited that would change what the
// launcher or its workers see.
const std::vector<std::string> kForeignVars = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TESSERA_BACKEND", "TESSERA_LAUNCHER", "TESSERA_STORE_HOSTED", "TESSERA_RESTART_COUNT", "SLURM_PROCID",
    "SLURM_NTASKS", "OMP_NUM_THREADS", "TESSERA_ELASTIC", "TESSERA_NNODES", "TESSERA_NODE_SLOT",
    "TESSERA_STORE_ADDR", "TESSERA_NODE_INCARNATION", "TESSERA_ADVERTISE_HOST", "TESSERA_JOIN_TOKEN",
    "TESSERA_JOIN_TOKEN_FILE"};

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

size_t countOf(const std::string& text, const std::string& part) {
  size_t count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + part.size())) ++count;
  return count;
}

// The values a worker printed for one variable, e.g. all "TESSERA_NODE_SLOT" values.
std::set<std::string> valuesOf(const std::string& output, const std::string& name) {
  std::set<std::string> values;
  const std::regex line("ENV " + name + "=([^\n]*)\n");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), line); it != std::sregex_iterator(); ++it) {
    values.insert((*it)[1].str());
  }
  return values;
}

class ElasticLauncher : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/tessera-elastic-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    tokenFile_ = dir_ + "/token";
    std::ofstream(tokenFile_) << kSecret << "\n";
    comm::StoreServerOptions options;
    options.host = "127.0.0.1";
    options.port = 0;
    options.secret = kSecret;
    server_ = std::make_unique<comm::StoreServer>(options);
    port_ = server_->port();
    endpoint_ = "127.0.0.1:" + std::to_string(port_);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  comm::StorePtr client() {
    comm::StoreClientOptions options;
    options.host = "127.0.0.1";
    options.port = port_;
    options.secret = kSecret;
    options.timeout = std::chrono::seconds(10);
    return comm::makeStoreClient(options);
  }

  // tessera-run pointed at this test's store with the right secret, then `flags`, then the worker and `command`.
  std::vector<std::string> runArgs(const std::vector<std::string>& flags, const std::vector<std::string>& command,
                                   const std::string& tokenFile = "") const {
    std::vector<std::string> args = {kRun, "--rdzv-endpoint", endpoint_, "--rdzv-timeout", "10", "--join-token-file",
                                     tokenFile.empty() ? tokenFile_ : tokenFile};
    args.insert(args.end(), flags.begin(), flags.end());
    args.push_back(kWorker);
    args.insert(args.end(), command.begin(), command.end());
    return args;
  }

  ProcessResult run(const std::vector<std::string>& flags, const std::vector<std::string>& command) const {
    return runProcess(runArgs(flags, command), seconds(40), {}, kForeignVars);
  }

  std::string dir_;
  std::string tokenFile_;
  std::unique_ptr<comm::StoreServer> server_;
  uint16_t port_ = 0;
  std::string endpoint_;
};

TEST_F(ElasticLauncher, WorkersGetTheElasticContract) {
  const ProcessResult r = run({"--nnodes", "1:3", "--nproc-per-node", "2", "--node-rank", "1"}, {"env"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const std::string port = std::to_string(port_);
  for (int local = 0; local < 2; ++local) {
    const std::string p = "[node 1 rank " + std::to_string(local) + "] ENV ";
    // Slot 1 of at most 3 nodes with 2 workers each: ranks 2 and 3 of 6.
    for (const std::string& line :
         {std::string("TESSERA_ELASTIC=1"), "TESSERA_STORE_ADDR=127.0.0.1:" + port, std::string("TESSERA_NODE_SLOT=1"),
          std::string("TESSERA_NODE_INCARNATION=0"), std::string("TESSERA_NNODES=1:3"),
          std::string("TESSERA_ADVERTISE_HOST=127.0.0.1"), "TESSERA_JOIN_TOKEN_FILE=" + tokenFile_,
          "RANK=" + std::to_string(2 + local), std::string("WORLD_SIZE=6"), "LOCAL_RANK=" + std::to_string(local),
          std::string("LOCAL_WORLD_SIZE=2"), std::string("GROUP_RANK=1"), std::string("MASTER_ADDR=127.0.0.1"),
          "MASTER_PORT=" + port}) {
      EXPECT_TRUE(contains(r.output, p + line + "\n")) << "missing '" << p + line << "' in\n" << r.output;
    }
  }
  EXPECT_TRUE(contains(r.output, "all workers exited 0")) << r.output;
  auto store = client();
  EXPECT_EQ(store->add("elastic/incarnation/1", 0), 1) << "one start of slot 1 takes one incarnation";
  EXPECT_FALSE(store->check({"elastic/next_slot"})) << "--node-rank must not take a slot from the store";
}

TEST_F(ElasticLauncher, AdvertiseHostIsPassedOn) {
  const ProcessResult r = run({"--nnodes", "1:1", "--advertise-host", "10.1.2.3"}, {"env"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] ENV TESSERA_ADVERTISE_HOST=10.1.2.3\n")) << r.output;
}

TEST_F(ElasticLauncher, NodesWithoutARankTakeSlotsFromTheStore) {
  Subprocess first(runArgs({"--nnodes", "1:2"}, {"env"}), {}, kForeignVars);
  Subprocess second(runArgs({"--nnodes", "1:2"}, {"env"}), {}, kForeignVars);
  const ProcessResult a = first.wait(seconds(40));
  const ProcessResult b = second.wait(seconds(40));
  ASSERT_EQ(a.exitCode, 0) << a.output;
  ASSERT_EQ(b.exitCode, 0) << b.output;
  const std::set<std::string> slotA = valuesOf(a.output, "TESSERA_NODE_SLOT");
  const std::set<std::string> slotB = valuesOf(b.output, "TESSERA_NODE_SLOT");
  ASSERT_EQ(slotA.size(), 1u) << a.output;
  ASSERT_EQ(slotB.size(), 1u) << b.output;
  std::set<std::string> both = slotA;
  both.insert(slotB.begin(), slotB.end());
  EXPECT_EQ(both, (std::set<std::string>{"0", "1"})) << a.output << "\n---\n" << b.output;
  // One worker per node: RANK = slot, GROUP_RANK = slot.
  EXPECT_EQ(valuesOf(a.output, "RANK"), slotA) << a.output;
  EXPECT_EQ(valuesOf(b.output, "GROUP_RANK"), slotB) << b.output;
  EXPECT_EQ(client()->add("elastic/next_slot", 0), 2);

  // A third node finds no slot left under MAX = 2.
  const ProcessResult c = run({"--nnodes", "1:2"}, {"env"});
  EXPECT_EQ(c.exitCode, 1) << c.output;
  EXPECT_TRUE(contains(c.output, "no free node slot")) << c.output;
  EXPECT_TRUE(contains(c.output, "--nnodes 1:2")) << c.output;
  EXPECT_FALSE(contains(c.output, "ENV ")) << "started workers without a slot\n" << c.output;
}

TEST_F(ElasticLauncher, RestartsAFailedNodeWithANewIncarnation) {
  const ProcessResult r =
      run({"--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "2"}, {"fail-until", "2", "3"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "node 0 rank 0 exited with code 3; stopping the other 1 worker")) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all workers (restart 1 of 2)")) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all workers (restart 2 of 2)")) << r.output;
  // Rank 0 prints before failing; rank 1 may be stopped before it prints, except in the last incarnation.
  for (int incarnation = 0; incarnation < 3; ++incarnation) {
    EXPECT_TRUE(
        contains(r.output, "[node 0 rank 0] ENV TESSERA_NODE_INCARNATION=" + std::to_string(incarnation) + "\n"))
        << r.output;
  }
  EXPECT_TRUE(contains(r.output, "[node 0 rank 1] ENV TESSERA_NODE_INCARNATION=2\n")) << r.output;
  EXPECT_FALSE(contains(r.output, "ENV TESSERA_NODE_INCARNATION=3\n")) << r.output;
  EXPECT_EQ(countOf(r.output, "[node 0 rank 0] failing with code 3"), 2u) << r.output;
  EXPECT_TRUE(contains(r.output, "all workers exited 0")) << r.output;
  EXPECT_EQ(client()->add("elastic/incarnation/0", 0), 3);
}

TEST_F(ElasticLauncher, GivesUpAfterMaxRestarts) {
  const ProcessResult r = run({"--nnodes", "1:2", "--max-restarts", "1"}, {"fail-until", "5", "4"});
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all workers (restart 1 of 1)")) << r.output;
  EXPECT_TRUE(contains(r.output, "ENV TESSERA_NODE_INCARNATION=1\n")) << r.output;
  EXPECT_FALSE(contains(r.output, "ENV TESSERA_NODE_INCARNATION=2\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "job failed after")) << r.output;
  EXPECT_TRUE(contains(r.output, "node 0 rank 0 exited with code 4")) << r.output;
}

TEST_F(ElasticLauncher, EvictedNodeRejoinsWithoutUsingARestart) {
  // Exit code 75 (parallel::kExitEvicted): dropped from the job, must rejoin.
  const ProcessResult r = run({"--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "0"},
                              {"fail-until", "2", "75"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_EQ(countOf(r.output, "tessera-run: node 0 was dropped from the job; rejoining\n"), 2u) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] ENV TESSERA_NODE_INCARNATION=2\n")) << r.output;
  EXPECT_FALSE(contains(r.output, "job failed")) << r.output;
}

TEST_F(ElasticLauncher, ReportsMembershipChangesAndForwardsSigterm) {
  Subprocess node(runArgs({"--nnodes", "1:3"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(node.waitForOutput("[node 0 rank 0] ready", seconds(20))) << node.output();
  auto store = client();
  // The record as elastic.h's Membership::toJson writes it.
  store->setString("elastic/membership",
                   R"({"epoch":3,"outer_step":7,"attempt":0,"members":["0.0","1.2"],)"
                   R"("joiners":[{"member":"1.2","source":"0.0"}],"pending":[],"dropped":["2.1"],"join_cursor":3})");
  const std::string first = "tessera-run: membership epoch 3 at outer step 7: nodes [0.0, 1.2]; joined [1.2]; "
                            "dropped [2.1]\n";
  ASSERT_TRUE(node.waitForOutput(first, seconds(10))) << node.output();
  store->setString("elastic/membership",
                   R"({"epoch":4,"outer_step":9,"attempt":1,"members":["0.0"],"joiners":[],"pending":[],)"
                   R"("dropped":["1.2"],"join_cursor":3,"stop":"below min_nodes"})");
  const std::string second = "tessera-run: membership epoch 4 at outer step 9: nodes [0.0]; joined []; "
                             "dropped [1.2]; the job stops: below min_nodes\n";
  ASSERT_TRUE(node.waitForOutput(second, seconds(10))) << node.output();
  node.signal(SIGTERM);
  const ProcessResult r = node.wait(seconds(20));
  EXPECT_EQ(r.exitCode, 128 + SIGTERM) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] got SIGTERM")) << r.output;
  EXPECT_TRUE(contains(r.output, "tessera-run: stopped after")) << r.output;
  EXPECT_EQ(countOf(r.output, first), 1u) << "one line per change\n" << r.output;
  EXPECT_EQ(countOf(r.output, second), 1u) << r.output;
}

TEST_F(ElasticLauncher, WrongJoinTokenIsRefused) {
  const std::string wrongToken = dir_ + "/wrong-token";
  std::ofstream(wrongToken) << "not-the-secret\n";
  const ProcessResult r = runProcess(runArgs({"--nnodes", "1:2"}, {"env"}, wrongToken), seconds(30), {}, kForeignVars);
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "refused by the store at " + endpoint_ + ": wrong join token")) << r.output;
  EXPECT_FALSE(contains(r.output, "ENV ")) << r.output;
  EXPECT_GE(server_->stats().authFailures, 1u);
}

TEST_F(ElasticLauncher, HostStoreServesTheOtherNodes) {
  const std::string endpoint = "127.0.0.1:" + std::to_string(pickFreePort());
  const auto args = [&](const std::vector<std::string>& extra, const std::string& mode) {
    std::vector<std::string> a = {kRun, "--nnodes", "1:2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "10"};
    a.insert(a.end(), extra.begin(), extra.end());
    a.insert(a.end(), {kWorker, mode});
    return a;
  };
  // The secret from the environment this time.
  const std::map<std::string, std::string> secretEnv = {{"TESSERA_JOIN_TOKEN", "hosted-secret"}};
  std::vector<std::string> unset = kForeignVars;
  unset.erase(std::find(unset.begin(), unset.end(), "TESSERA_JOIN_TOKEN"));
  Subprocess host(args({"--host-store"}, "sleep"), secretEnv, unset);
  ASSERT_TRUE(host.waitForOutput("[node 0 rank 0] ready", seconds(20))) << host.output();
  EXPECT_TRUE(contains(host.output(), "hosted here")) << host.output();
  const ProcessResult joiner = runProcess(args({}, "env"), seconds(30), secretEnv, unset);
  EXPECT_EQ(joiner.exitCode, 0) << joiner.output;
  EXPECT_TRUE(contains(joiner.output, "[node 1 rank 0] ENV TESSERA_NODE_SLOT=1\n")) << joiner.output;
  EXPECT_TRUE(contains(joiner.output, "[node 1 rank 0] ENV TESSERA_STORE_ADDR=" + endpoint + "\n")) << joiner.output;
  host.signal(SIGTERM);
  EXPECT_EQ(host.wait(seconds(20)).exitCode, 128 + SIGTERM);
}

struct BadElasticFlags {
  std::string name;
  std::vector<std::string> args;  // "WORKER" stands for elastic_test_worker
  std::string expected;           // part of the error message
};

class ElasticLauncherBadFlags : public ::testing::TestWithParam<BadElasticFlags> {};
void PrintTo(const BadElasticFlags& c, std::ostream* os) { *os << c.name; }

TEST_P(ElasticLauncherBadFlags, PrintUsageAndExitTwo) {
  std::vector<std::string> args = {kRun};
  for (const auto& arg : GetParam().args) args.push_back(arg == "WORKER" ? kWorker : arg);
  const ProcessResult r = runProcess(args, seconds(20), {}, kForeignVars);
  EXPECT_EQ(r.exitCode, 2) << r.output;
  EXPECT_TRUE(contains(r.output, GetParam().expected)) << r.output;
  EXPECT_TRUE(contains(r.output, "Usage: tessera-run [flags] PROGRAM [ARGS...]")) << r.output;
}

const BadElasticFlags kBadElasticFlags[] = {
    {"MinAboveMax", {"--nnodes", "2:1", "--rdzv-endpoint", "h:1", "WORKER"}, "--nnodes 2:1: MIN must be <= MAX"},
    {"MinBelowOne", {"--nnodes", "0:2", "--rdzv-endpoint", "h:1", "WORKER"}, "--nnodes 0:2: MIN must be >= 1"},
    {"SlotNotBelowMax",
     {"--nnodes", "1:2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "WORKER"},
     "--node-rank 2 is out of range for --nnodes 1:2"},
    {"NotANumber", {"--nnodes", "1:x", "WORKER"}, "--nnodes '1:x' is not a number"},
    {"TwoColons", {"--nnodes", "1:2:3", "WORKER"}, "--nnodes '1:2:3' has more than one ':'"},
    {"HostStoreWhenFixed", {"--host-store", "WORKER"}, "--host-store works with --nnodes MIN:MAX (elastic) only"},
    {"ElasticWithMpi", {"--nnodes", "1:2", "--backend", "mpi", "WORKER"}, "works with --backend gloo only"},
    {"ElasticAnyPort", {"--nnodes", "1:2", "--rdzv-endpoint", "h:0", "WORKER"}, "does not work with --nnodes MIN:MAX"},
};

INSTANTIATE_TEST_SUITE_P(Cases, ElasticLauncherBadFlags, ::testing::ValuesIn(kBadElasticFlags),
                         [](const ::testing::TestParamInfo<BadElasticFlags>& info) { return info.param.name; });

}  // namespace
}  // namespace tessera::testing
