// End-to-end tests of `tessera-run --nnodes MIN:MAX` (elastic mode), run as a
// subprocess against a tessera store this test process hosts: the workers'
// environment (elastic.h's launcher contract), slots handed out by the store,
// restarts with new incarnations, eviction (exit 75) and --max-restarts
// bounding both, membership reports, the join secret, --host-store, the
// rendezvous flags (--rdzv-backend tessera|etcd, --rdzv-id, --rdzv-conf; the
// etcd ones against a real etcd, tests/harness/etcd_cluster.h), slot claims
// (a live --node-rank and a node beyond MAX refused at once, a dead node's
// slot taken over), the "elastic/dead/<member>" record written when a worker
// crashes, and bad flags. Expected values are written out from the contract,
// never read back from the launcher.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include "tessera/comm/etcd_store.h"
#include "tessera/comm/store_server.h"
#include "tests/harness/etcd_cluster.h"
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
    "TESSERA_JOIN_TOKEN_FILE", "TESSERA_RDZV_BACKEND", "TESSERA_RDZV_ENDPOINT", "TESSERA_RDZV_ID",
    "TESSERA_ETCD_USER", "TESSERA_ETCD_PASSWORD_FILE"};

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
          "MASTER_PORT=" + port, std::string("TESSERA_RDZV_BACKEND=tessera"),
          "TESSERA_RDZV_ENDPOINT=127.0.0.1:" + port, std::string("TESSERA_RDZV_ID="),
          std::string("TESSERA_ETCD_USER=<unset>"), std::string("TESSERA_ETCD_PASSWORD_FILE=<unset>")}) {
      EXPECT_TRUE(contains(r.output, p + line + "\n")) << "missing '" << p + line << "' in\n" << r.output;
    }
  }
  EXPECT_TRUE(contains(r.output, "all workers exited 0")) << r.output;
  auto store = client();
  EXPECT_EQ(store->add("elastic/incarnation/1", 0), 1) << "one start of slot 1 takes one incarnation";
  EXPECT_EQ(store->getString("elastic/launcher/nnodes"), "1:3") << "the first node records the job's MIN:MAX";
  EXPECT_FALSE(store->check({"elastic/launcher/slot/1/owner"})) << "a launcher that ends releases its slot";
  EXPECT_FALSE(store->check({"elastic/dead/1.0"})) << "workers that exit 0 are not dead";
}

// --rdzv-id keys every record: the launcher's own (incarnations, slot
// claims) live under "<id>/", and the workers are told the id.
TEST_F(ElasticLauncher, RunIdPrefixesEveryRecord) {
  const ProcessResult r = run({"--nnodes", "1:2", "--node-rank", "0", "--rdzv-id", "job-7.a"}, {"env"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] ENV TESSERA_RDZV_ID=job-7.a\n")) << r.output;
  auto store = client();
  EXPECT_EQ(store->add("job-7.a/elastic/incarnation/0", 0), 1);
  EXPECT_EQ(store->getString("job-7.a/elastic/launcher/nnodes"), "1:2");
  EXPECT_FALSE(store->check({"elastic/incarnation/0"})) << "a record outside the run id's prefix";
  EXPECT_FALSE(store->check({"elastic/launcher/nnodes"}));
  // Another run id on the same store is another job: a different MIN:MAX is fine there.
  const ProcessResult other = run({"--nnodes", "1:3", "--rdzv-id", "job8"}, {"env"});
  ASSERT_EQ(other.exitCode, 0) << other.output;
  EXPECT_EQ(store->getString("job8/elastic/launcher/nnodes"), "1:3");
}

TEST_F(ElasticLauncher, NodesOfOneJobMustAgreeOnMinMax) {
  ASSERT_EQ(run({"--nnodes", "1:2"}, {"env"}).exitCode, 0);
  const ProcessResult r = run({"--nnodes", "1:3"}, {"env"});
  EXPECT_EQ(r.exitCode, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "refused: --nnodes 1:3 differs from the job's 1:2")) << r.output;
  EXPECT_FALSE(contains(r.output, "ENV ")) << r.output;
}

TEST_F(ElasticLauncher, AdvertiseHostIsPassedOn) {
  const ProcessResult r = run({"--nnodes", "1:1", "--advertise-host", "10.1.2.3"}, {"env"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] ENV TESSERA_ADVERTISE_HOST=10.1.2.3\n")) << r.output;
}

// Started together, two nodes without --node-rank take different slots (the
// claims are compareSets); slots of nodes that ended are free again.
TEST_F(ElasticLauncher, NodesWithoutARankTakeFreeSlots) {
  Subprocess first(runArgs({"--nnodes", "1:2"}, {"sleep"}), {}, kForeignVars);
  Subprocess second(runArgs({"--nnodes", "1:2"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(first.waitForOutput("] ready", seconds(20))) << first.output();
  ASSERT_TRUE(second.waitForOutput("] ready", seconds(20))) << second.output();
  first.signal(SIGTERM);
  second.signal(SIGTERM);
  const ProcessResult a = first.wait(seconds(20));
  const ProcessResult b = second.wait(seconds(20));
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
  // Both have ended and released their slots: a third node takes slot 0 again.
  const ProcessResult c = run({"--nnodes", "1:2"}, {"env"});
  ASSERT_EQ(c.exitCode, 0) << c.output;
  EXPECT_EQ(valuesOf(c.output, "TESSERA_NODE_SLOT"), std::set<std::string>{"0"}) << c.output;
}

// MAX = 2 nodes alive: a third is refused at once (not after join_timeout),
// without starting workers; once one of them ends, its slot is free again.
TEST_F(ElasticLauncher, NodeBeyondMaxIsRefusedAtOnce) {
  Subprocess a(runArgs({"--nnodes", "1:2"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(a.waitForOutput("] ready", seconds(20))) << a.output();
  Subprocess b(runArgs({"--nnodes", "1:2"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(b.waitForOutput("] ready", seconds(20))) << b.output();
  const ProcessResult c = run({"--nnodes", "1:2"}, {"env"});
  EXPECT_EQ(c.exitCode, 1) << c.output;
  EXPECT_TRUE(contains(c.output, "refused: the job already has 2 live nodes, its maximum (--nnodes 1:2; slots 0, 1 "
                                 "are held by live tessera-runs"))
      << c.output;
  EXPECT_FALSE(contains(c.output, "ENV ")) << "started workers beyond MAX\n" << c.output;
  EXPECT_LT(c.seconds, 20) << "refused at once: a liveness watch (2.5 s), not a join timeout";

  const std::string slotOfA = *valuesOf(a.output(), "TESSERA_NODE_SLOT").begin();
  a.signal(SIGTERM);
  EXPECT_EQ(a.wait(seconds(20)).exitCode, 128 + SIGTERM);
  const ProcessResult d = run({"--nnodes", "1:2"}, {"env"});
  ASSERT_EQ(d.exitCode, 0) << d.output;
  EXPECT_EQ(valuesOf(d.output, "TESSERA_NODE_SLOT"), std::set<std::string>{slotOfA}) << d.output;
  b.signal(SIGTERM);
  EXPECT_EQ(b.wait(seconds(20)).exitCode, 128 + SIGTERM);
}

// A second tessera-run with the --node-rank of a live one is refused at once,
// naming the rank and the fix; once that node's launcher is killed (its
// liveness record stops), a new one with the same --node-rank takes over.
TEST_F(ElasticLauncher, LiveNodeRankIsRefusedAndADeadOneTakenOver) {
  Subprocess first(runArgs({"--nnodes", "1:3", "--node-rank", "1"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(first.waitForOutput("[node 1 rank 0] ready", seconds(20))) << first.output();
  const ProcessResult dup = run({"--nnodes", "1:3", "--node-rank", "1"}, {"env"});
  EXPECT_EQ(dup.exitCode, 1) << dup.output;
  EXPECT_TRUE(contains(dup.output, "refused: --node-rank 1 is taken: the tessera-run of node 1 is alive")) << dup.output;
  EXPECT_TRUE(contains(dup.output, "stop that tessera-run first")) << dup.output;
  EXPECT_FALSE(contains(dup.output, "ENV ")) << dup.output;
  EXPECT_LT(dup.seconds, 20) << dup.output;
  EXPECT_EQ(client()->add("elastic/incarnation/1", 0), 1) << "the refused launcher must not take an incarnation";

  // SIGKILL: no clean release; its workers die with it (PR_SET_PDEATHSIG).
  ::kill(first.pid(), SIGKILL);
  EXPECT_EQ(first.wait(seconds(20)).exitCode, 128 + SIGKILL);
  const ProcessResult again = run({"--nnodes", "1:3", "--node-rank", "1"}, {"env"});
  ASSERT_EQ(again.exitCode, 0) << again.output;
  EXPECT_TRUE(contains(again.output, "node 1: took over the slot from launcher")) << again.output;
  EXPECT_TRUE(contains(again.output, "[node 1 rank 0] ENV TESSERA_NODE_INCARNATION=1\n")) << again.output;
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

// Evictions (exit 75) restart the node too, and count against --max-restarts
// like failures, said apart in the log.
TEST_F(ElasticLauncher, MaxRestartsBoundsEvictionsToo) {
  const ProcessResult r = run({"--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "2"},
                              {"exit-codes", "75", "3"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "tessera-run: node 0 was dropped from the job; rejoining (restart 1 of 2)\n"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "tessera-run: restarting all workers (restart 2 of 2)\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "[node 0 rank 0] ENV TESSERA_NODE_INCARNATION=2\n")) << r.output;
  EXPECT_FALSE(contains(r.output, "job failed")) << r.output;

  // Each run below under its own run id: incarnations count from 0 again.
  const ProcessResult out =
      run({"--nnodes", "1:2", "--max-restarts", "1", "--rdzv-id", "b"}, {"exit-codes", "3", "75", "75"});
  EXPECT_EQ(out.exitCode, 1) << out.output;
  EXPECT_TRUE(contains(out.output, "restarting all workers (restart 1 of 1)")) << out.output;
  EXPECT_TRUE(contains(out.output, "was dropped from the job; no restart left: --max-restarts 1 used up (1 after "
                                   "failures, 0 after evictions); raise --max-restarts"))
      << out.output;
  EXPECT_FALSE(contains(out.output, "ENV TESSERA_NODE_INCARNATION=2\n")) << out.output;

  // Evictions alone exhaust it as well.
  const ProcessResult evicted =
      run({"--nnodes", "1:2", "--max-restarts", "1", "--rdzv-id", "c"}, {"exit-codes", "75", "75"});
  EXPECT_EQ(evicted.exitCode, 1) << evicted.output;
  EXPECT_TRUE(contains(evicted.output, "rejoining (restart 1 of 1)")) << evicted.output;
  EXPECT_TRUE(contains(evicted.output, "used up (0 after failures, 1 after evictions)")) << evicted.output;
}

// A worker that crashes (a non-zero exit or a signal the launcher did not
// send) marks its member dead in the store at once, before the node
// restarts; an eviction and a clean exit do not.
TEST_F(ElasticLauncher, CrashedWorkerIsMarkedDeadAtOnce) {
  const ProcessResult r = run({"--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "3"},
                              {"exit-codes", "3", "sig9", "75"});
  ASSERT_EQ(r.exitCode, 0) << r.output;
  auto store = client();
  ASSERT_TRUE(store->check({"elastic/dead/0.0"})) << r.output;
  EXPECT_EQ(store->getString("elastic/dead/0.0"), "node 0 rank 0 exited with code 3");
  ASSERT_TRUE(store->check({"elastic/dead/0.1"})) << r.output;
  EXPECT_EQ(store->getString("elastic/dead/0.1"), "node 0 rank 0 was killed by SIGKILL (signal 9) (not sent by "
                                                  "tessera-run: the out-of-memory killer? see dmesg)");
  EXPECT_FALSE(store->check({"elastic/dead/0.2"})) << "an evicted member is not dead\n" << r.output;
  EXPECT_FALSE(store->check({"elastic/dead/0.3"})) << "a member that exits 0 is not dead\n" << r.output;
  // Before the restart: the record comes first.
  const size_t marked = r.output.find("marked member 0.0 dead in the store");
  const size_t restarted = r.output.find("restarting all workers (restart 1 of 3)");
  ASSERT_NE(marked, std::string::npos) << r.output;
  ASSERT_NE(restarted, std::string::npos) << r.output;
  EXPECT_LT(marked, restarted) << r.output;
  // Stopping the node's other worker (SIGTERM, sent by the launcher) is not a second death.
  EXPECT_EQ(countOf(r.output, "marked member 0.0 dead"), 1u) << r.output;
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
  EXPECT_FALSE(store->check({"elastic/dead/0.0"})) << "workers stopped on our SIGTERM are not dead\n" << r.output;
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
    {"UnknownRdzvBackend",
     {"--nnodes", "1:2", "--rdzv-backend", "zookeeper", "--rdzv-endpoint", "h:1", "WORKER"},
     "--rdzv-backend must be tessera or etcd, got 'zookeeper'"},
    {"EtcdWithoutEndpoint", {"--nnodes", "1:2", "--rdzv-backend", "etcd", "WORKER"},
     "--rdzv-backend etcd needs --rdzv-endpoint listing the etcd members"},
    {"EtcdWithHostStore",
     {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379,e2:2379", "--host-store", "WORKER"},
     "with --rdzv-backend etcd the store is the etcd cluster, which runs on its own: drop --host-store"},
    {"EtcdWhenFixed", {"--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379", "WORKER"},
     "--rdzv-backend etcd works with --nnodes MIN:MAX (elastic) only"},
    {"TesseraWithAList", {"--nnodes", "1:2", "--rdzv-endpoint", "h:1,h:2", "WORKER"},
     "the tessera backend takes one host:port (a list is for --rdzv-backend etcd)"},
    {"EmptyEndpointEntry",
     {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379,,e3:2379", "WORKER"},
     "--rdzv-endpoint 'e1:2379,,e3:2379' has an empty entry"},
    {"EndpointWithoutPort", {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379,e2", "WORKER"},
     "--rdzv-endpoint 'e2' is not host:port"},
    {"RdzvIdWithSlash", {"--nnodes", "1:2", "--rdzv-endpoint", "h:1", "--rdzv-id", "a/b", "WORKER"},
     "--rdzv-id 'a/b' may hold letters, digits, '-', '_' and '.' only"},
    {"RdzvConfUnknownKey",
     {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379", "--rdzv-conf", "token=x", "WORKER"},
     "--rdzv-conf has unknown key 'token' (known: user, password_file)"},
    {"RdzvConfNotKeyValue",
     {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379", "--rdzv-conf", "root", "WORKER"},
     "--rdzv-conf entry 'root' is not key=value"},
    {"EtcdUserWithoutPassword",
     {"--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379", "--rdzv-conf", "user=root", "WORKER"},
     "etcd auth: user 'root' without a password"},
    {"EtcdConfWithTessera",
     {"--nnodes", "1:2", "--rdzv-endpoint", "h:1", "--rdzv-conf", "user=root,password_file=pw", "WORKER"},
     "--rdzv-conf user/password_file are etcd's"},
};

INSTANTIATE_TEST_SUITE_P(Cases, ElasticLauncherBadFlags, ::testing::ValuesIn(kBadElasticFlags),
                         [](const ::testing::TestParamInfo<BadElasticFlags>& info) { return info.param.name; });

// etcd's credentials may come from the environment instead of --rdzv-conf;
// half of them is a usage error all the same.
TEST(ElasticLauncherEtcdFlags, EnvironmentCredentialsAreCheckedToo) {
  const ProcessResult r = runProcess({kRun, "--nnodes", "1:2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "e1:2379",
                                      kWorker, "env"},
                                     seconds(20), {{"TESSERA_ETCD_USER", "root"}}, kForeignVars);
  EXPECT_EQ(r.exitCode, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "etcd auth: user 'root' without a password")) << r.output;
  // --help lists the rendezvous flags.
  const ProcessResult tessera =
      runProcess({kRun, "--nnodes", "1:2", "--rdzv-endpoint", "h:1", "--help"}, seconds(20),
                 {{"TESSERA_ETCD_USER", "root"}}, kForeignVars);
  EXPECT_EQ(tessera.exitCode, 0) << tessera.output;
  EXPECT_TRUE(contains(tessera.output, "--rdzv-backend")) << tessera.output;
  EXPECT_TRUE(contains(tessera.output, "--rdzv-conf")) << tessera.output;
}

// Against a real etcd (one member is enough here; the three-member cluster
// and its failures are tests/parallel/elastic_etcd_e2e_test.cc's).
class ElasticLauncherEtcd : public ::testing::Test {
 protected:
  void SetUp() override {
    TESSERA_REQUIRE_ETCD();
    char pattern[] = "/tmp/tessera-elastic-etcd-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    cluster_ = std::make_unique<EtcdCluster>(1);
  }
  void TearDown() override {
    cluster_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  std::vector<std::string> args(const std::vector<std::string>& flags, const std::vector<std::string>& command) const {
    std::vector<std::string> a = {kRun, "--rdzv-backend", "etcd", "--rdzv-endpoint", cluster_->endpointList(),
                                  "--rdzv-timeout", "10"};
    a.insert(a.end(), flags.begin(), flags.end());
    a.push_back(kWorker);
    a.insert(a.end(), command.begin(), command.end());
    return a;
  }

  comm::StorePtr etcd(const std::string& user = "", const std::string& password = "") const {
    comm::EtcdStoreOptions options;
    options.endpoints = cluster_->endpoints();
    options.user = user;
    options.password = password;
    options.outageTimeout = std::chrono::seconds(10);
    return comm::makeEtcdStore(options);
  }

  std::string dir_;
  std::unique_ptr<EtcdCluster> cluster_;
};

TEST_F(ElasticLauncherEtcd, WorkersGetTheEtcdContractAndRecordsLiveInEtcd) {
  const std::string passwordFile = dir_ + "/etcd.pw";
  std::ofstream(passwordFile) << "root-password\n";
  cluster_->enableAuth("root-password");
  const ProcessResult r = runProcess(
      args({"--nnodes", "1:2", "--node-rank", "1", "--rdzv-id", "run1", "--rdzv-conf",
            "user=root,password_file=" + passwordFile},
           {"env"}),
      seconds(40), {}, kForeignVars);
  ASSERT_EQ(r.exitCode, 0) << r.output;
  const std::string p = "[node 1 rank 0] ENV ";
  for (const std::string& line :
       {std::string("TESSERA_ELASTIC=1"), std::string("TESSERA_RDZV_BACKEND=etcd"),
        "TESSERA_RDZV_ENDPOINT=" + cluster_->endpointList(), std::string("TESSERA_RDZV_ID=run1"),
        std::string("TESSERA_ETCD_USER=root"), "TESSERA_ETCD_PASSWORD_FILE=" + passwordFile,
        std::string("TESSERA_STORE_ADDR=<unset>"), std::string("MASTER_ADDR=<unset>"),
        std::string("TESSERA_NODE_SLOT=1"), std::string("TESSERA_NODE_INCARNATION=0"), std::string("RANK=1")}) {
    EXPECT_TRUE(contains(r.output, p + line + "\n")) << "missing '" << p + line << "' in\n" << r.output;
  }
  EXPECT_TRUE(contains(r.output, "store etcd " + cluster_->endpointList() + " (run id run1)")) << r.output;
  auto store = etcd("root", "root-password");
  EXPECT_EQ(store->add("run1/elastic/incarnation/1", 0), 1);
  EXPECT_EQ(store->getString("run1/elastic/launcher/nnodes", seconds(5)), "1:2");
  EXPECT_FALSE(store->check({"run1/elastic/launcher/slot/1/owner"})) << "released at the end";

  // The credentials from the environment work the same.
  const ProcessResult fromEnv =
      runProcess(args({"--nnodes", "1:2", "--rdzv-id", "run1"}, {"env"}), seconds(40),
                 {{"TESSERA_ETCD_USER", "root"}, {"TESSERA_ETCD_PASSWORD_FILE", passwordFile}}, kForeignVars);
  ASSERT_EQ(fromEnv.exitCode, 0) << fromEnv.output;
  EXPECT_TRUE(contains(fromEnv.output, "ENV TESSERA_ETCD_USER=root\n")) << fromEnv.output;

  // A wrong password is refused before any worker starts.
  const std::string wrong = dir_ + "/wrong.pw";
  std::ofstream(wrong) << "not-it\n";
  const ProcessResult refused =
      runProcess(args({"--nnodes", "1:2", "--rdzv-conf", "user=root,password_file=" + wrong}, {"env"}), seconds(40),
                 {}, kForeignVars);
  EXPECT_EQ(refused.exitCode, 1) << refused.output;
  EXPECT_TRUE(contains(refused.output, "refused by etcd at " + cluster_->endpointList())) << refused.output;
  EXPECT_TRUE(contains(refused.output, "--rdzv-conf user=U,password_file=F")) << refused.output;
  EXPECT_FALSE(contains(refused.output, "ENV ")) << refused.output;
}

// With leases (etcd): a live --node-rank is refused at once; a launcher killed
// with SIGKILL leaves a record whose lease has not run out yet, but it stops
// moving, so the next launcher of that rank takes the slot over without
// waiting for the lease.
TEST_F(ElasticLauncherEtcd, LiveNodeRankIsRefusedAndADeadOneTakenOver) {
  Subprocess first(args({"--nnodes", "1:2", "--node-rank", "0"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(first.waitForOutput("[node 0 rank 0] ready", seconds(20))) << first.output();
  const ProcessResult dup = runProcess(args({"--nnodes", "1:2", "--node-rank", "0"}, {"env"}), seconds(40), {},
                                       kForeignVars);
  EXPECT_EQ(dup.exitCode, 1) << dup.output;
  EXPECT_TRUE(contains(dup.output, "refused: --node-rank 0 is taken: the tessera-run of node 0 is alive")) << dup.output;
  EXPECT_FALSE(contains(dup.output, "ENV ")) << dup.output;
  // Beyond MAX: slot 1 free, so a node without a rank is let in; a third is not.
  Subprocess second(args({"--nnodes", "1:2"}, {"sleep"}), {}, kForeignVars);
  ASSERT_TRUE(second.waitForOutput("[node 1 rank 0] ready", seconds(20))) << second.output();
  const ProcessResult third = runProcess(args({"--nnodes", "1:2"}, {"env"}), seconds(40), {}, kForeignVars);
  EXPECT_EQ(third.exitCode, 1) << third.output;
  EXPECT_TRUE(contains(third.output, "refused: the job already has 2 live nodes")) << third.output;

  ::kill(first.pid(), SIGKILL);
  EXPECT_EQ(first.wait(seconds(20)).exitCode, 128 + SIGKILL);
  const ProcessResult again = runProcess(args({"--nnodes", "1:2", "--node-rank", "0"}, {"env"}), seconds(40), {},
                                         kForeignVars);
  ASSERT_EQ(again.exitCode, 0) << again.output;
  EXPECT_TRUE(contains(again.output, "node 0: took over the slot from launcher")) << again.output;
  second.signal(SIGTERM);
  EXPECT_EQ(second.wait(seconds(20)).exitCode, 128 + SIGTERM);
}

}  // namespace
}  // namespace tessera::testing
