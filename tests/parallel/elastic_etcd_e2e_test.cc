// Elastic training on etcd, end to end: a real 3-member etcd cluster on
// loopback ports (tests/harness/etcd_cluster.h; skipped with a message where
// the etcd binary is missing) as the job's store, and one
// `tessera-run --nnodes MIN:MAX --rdzv-backend etcd` per node running a tiny
// DiLoCo + int8 GPT through tessera-train. What is checked comes from the
// nodes' metrics files (as in elastic_e2e_test.cc: after every outer step all
// members hold bit-identical parameters, no committed outer step is skipped
// or repeated) and from the launchers' output:
//   - a worker killed with SIGKILL is marked dead by its launcher, restarted
//     as a new incarnation, and recovers from a peer (default suite);
//   - killing the etcd leader mid-training does not stop training;
//   - with 2 of 3 members down the job pauses, saying it lost quorum, and goes
//     on when a member returns within elastic.store_outage_timeout_s;
//     otherwise it stops with an error.
// The last three take one to two minutes together: labelled "long".
// Also the [elastic] store keys and the workers' environment as the worker
// side reads them (ElasticConfig::validate, ElasticIdentity), no etcd needed.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launcher/train_config.h"
#include "tessera/core/config.h"
#include "tessera/parallel/elastic.h"
#include "tests/harness/etcd_cluster.h"
#include "tests/launcher/subprocess.h"
#include "tests/parallel/elastic_metrics.h"

namespace {

using tessera::testing::EtcdCluster;
using tessera::testing::Subprocess;
using Json = nlohmann::json;
using tessera::testing::eventsOf;
using tessera::testing::readLines;
using std::chrono::seconds;
namespace fs = std::filesystem;

double unixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// outer step -> param hash; a step seen twice (a restarted node's earlier
// life) must agree.
std::map<int64_t, std::string> hashesOf(const std::string& metricsPath) {
  std::map<int64_t, std::string> hashes;
  for (const auto& e : eventsOf(metricsPath, "outer_step")) {
    const int64_t k = e["outer_step"].get<int64_t>();
    if (e.contains("loss")) {
      EXPECT_TRUE(e["loss"].is_number() && std::isfinite(e["loss"].get<double>()))
          << "bad loss at outer step " << k << " in " << metricsPath;
    }
    const std::string hash = e["param_hash"].get<std::string>();
    auto [it, inserted] = hashes.emplace(k, hash);
    if (!inserted) EXPECT_EQ(it->second, hash) << "outer step " << k << " committed twice with different parameters";
  }
  return hashes;
}

// Outer steps both committed (after `after`) hold equal parameters; returns how many were compared.
int expectSame(const std::map<int64_t, std::string>& a, const std::map<int64_t, std::string>& b, int64_t after = -1) {
  int compared = 0;
  for (const auto& [k, hash] : a) {
    if (k <= after) continue;
    const auto it = b.find(k);
    if (it == b.end()) continue;
    EXPECT_EQ(hash, it->second) << "parameters differ after outer step " << k;
    ++compared;
  }
  return compared;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The worker processes tessera-run started (its direct children).
std::vector<pid_t> childrenOf(pid_t pid) {
  std::vector<pid_t> out;
  for (const auto& task : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    std::ifstream in(task.path() / "children");
    pid_t child;
    while (in >> child) out.push_back(child);
  }
  return out;
}

// One elastic job on an etcd cluster: one tessera-run per node, each running
// tessera-train on a tiny DiLoCo GPT.
class EtcdJob {
 public:
  EtcdJob(const std::string& name, EtcdCluster& cluster) : cluster_(cluster) {
    runId_ = name + "-" + std::to_string(::getpid());
    dir_ = fs::temp_directory_path() / ("tessera-elastic-etcd-" + runId_);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~EtcdJob() {
    nodes_.clear();
    if (!::testing::Test::HasFailure()) fs::remove_all(dir_);
  }

  // Starts node `slot`'s tessera-run; `launcher` and `train` are extra flags
  // for each (train: "--set" pairs).
  Subprocess& launch(int slot, const std::vector<std::string>& launcher = {},
                     const std::vector<std::string>& train = {}) {
    std::vector<std::string> argv = {TESSERA_RUN_PATH,  "--nnodes",        std::to_string(minNodes) + ":4",
                                     "--node-rank",     std::to_string(slot), "--rdzv-backend",
                                     "etcd",            "--rdzv-endpoint", cluster_.endpointList(),
                                     "--rdzv-id",       runId_,            "--rdzv-timeout",
                                     rdzvTimeout,       "--grace-period",  "5"};
    argv.insert(argv.end(), launcher.begin(), launcher.end());
    const std::vector<std::string> base = {TESSERA_TRAIN_PATH,
                                           "--config",
                                           std::string(TESSERA_SOURCE_DIR) + "/examples/configs/gpt-elastic.toml",
                                           "--metrics",
                                           metrics(slot),
                                           "--set", "model.n_layer=1", "--set", "model.d_model=32",
                                           "--set", "data.batch_size=8", "--set", "train.steps=" + std::to_string(steps),
                                           "--set", "train.log_every=5", "--set", "optim.warmup_steps=2",
                                           "--set", "diloco.inner_steps=5",
                                           "--set", "elastic.heartbeat_interval_s=0.25",
                                           "--set", "elastic.heartbeat_timeout_s=2.0",
                                           "--set", "elastic.wait_timeout_s=20.0",
                                           "--set", "elastic.collective_timeout_s=10.0",
                                           "--set", "elastic.start_grace_s=3.0",
                                           "--set", "train.threads=1"};
    argv.insert(argv.end(), base.begin(), base.end());
    argv.insert(argv.end(), train.begin(), train.end());
    std::vector<std::string> unset = tessera::testing::foreignLaunchVariables();
    for (const char* name : {"TESSERA_ELASTIC", "TESSERA_STORE_ADDR", "TESSERA_RDZV_BACKEND", "TESSERA_RDZV_ENDPOINT",
                             "TESSERA_RDZV_ID", "TESSERA_ETCD_USER", "TESSERA_ETCD_PASSWORD_FILE",
                             "TESSERA_JOIN_TOKEN", "TESSERA_JOIN_TOKEN_FILE", "TESSERA_FAULT_PLAN"}) {
      unset.push_back(name);
    }
    nodes_.push_back(std::make_unique<Subprocess>(argv, std::map<std::string, std::string>{{"OMP_NUM_THREADS", "1"}},
                                                  unset));
    return *nodes_.back();
  }

  std::string metrics(int slot) const { return (dir_ / ("node" + std::to_string(slot) + ".jsonl")).string(); }

  // Blocks until node `slot`'s metrics show an outer_step event with step >=
  // step. Reads every node's output meanwhile (a full pipe would stall it).
  bool waitForStep(int slot, int64_t step, seconds timeout) const {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      for (const auto& e : eventsOf(metrics(slot), "outer_step")) {
        if (e["step"].get<int64_t>() >= step) return true;
      }
      for (const auto& node : nodes_) node->waitForOutput("\x01", std::chrono::milliseconds(50));
    }
    return false;
  }

  int steps = 40;
  int minNodes = 2;
  std::string rdzvTimeout = "30";  // tessera-run's bound on its own store calls

 private:
  EtcdCluster& cluster_;
  std::string runId_;
  fs::path dir_;
  std::vector<std::unique_ptr<Subprocess>> nodes_;
};

// The elastic kill/restart test on etcd, through tessera-run: node 1's worker
// is killed; its launcher marks member 1.0 dead in etcd at once, restarts the
// node as incarnation 1, which recovers the state from node 0 and is then
// bit-identical to it. Node 0 (below min_nodes = 2 meanwhile) waits for it.
TEST(ElasticEtcdEndToEnd, KilledWorkerIsMarkedDeadRestartedAndRecovers) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  EtcdJob job("kill", cluster);
  Subprocess& n0 = job.launch(0);
  Subprocess& n1 = job.launch(1, {"--max-restarts", "1"});
  ASSERT_TRUE(job.waitForStep(1, 5, seconds(120))) << n1.output();
  const std::vector<pid_t> workers = childrenOf(n1.pid());
  ASSERT_EQ(workers.size(), 1u) << n1.output();
  ::kill(workers[0], SIGKILL);
  const auto r0 = n0.wait(seconds(180));
  const auto r1 = n1.wait(seconds(60));
  ASSERT_EQ(r0.exitCode, 0) << r0.output;
  ASSERT_EQ(r1.exitCode, 0) << r1.output;
  EXPECT_TRUE(contains(r1.output, "marked member 1.0 dead in the store")) << r1.output;
  EXPECT_TRUE(contains(r1.output, "restarting all workers (restart 1 of 1)")) << r1.output;
  EXPECT_TRUE(contains(r1.output, "node 1 incarnation 1: starting")) << r1.output;

  const auto recovered = eventsOf(job.metrics(1), "recovered");
  ASSERT_EQ(recovered.size(), 1u) << r1.output;
  EXPECT_EQ(recovered[0]["from"], "0.0");
  EXPECT_GT(recovered[0]["bytes"].get<int64_t>(), 10000);
  bool dropped = false;
  for (const auto& m : eventsOf(job.metrics(0), "membership")) {
    for (const auto& d : m["dropped"]) dropped |= d == "1.0";
  }
  EXPECT_TRUE(dropped) << "node 0 must report 1.0 dropped\n" << r0.output;
  const auto h0 = hashesOf(job.metrics(0));
  EXPECT_EQ(h0.size(), 8u) << "outer steps 1..8 (40 steps, H = 5), none lost";
  EXPECT_GE(expectSame(hashesOf(job.metrics(1)), h0, recovered[0]["outer_step"].get<int64_t>()), 1)
      << "the rejoined node must take part in later outer steps";
}

// etcd elects a new leader within about a second; the store's calls fail
// over to the other members meanwhile. Training goes on with every outer
// step committed once and the nodes bit-identical.
TEST(LongElasticEtcdEndToEnd, KillingTheEtcdLeaderDoesNotStopTraining) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  EtcdJob job("leader", cluster);
  Subprocess& n0 = job.launch(0);
  Subprocess& n1 = job.launch(1);
  ASSERT_TRUE(job.waitForStep(0, 10, seconds(120))) << n0.output();
  const int leader = cluster.leader();
  ASSERT_GE(leader, 0);
  cluster.kill(leader);
  const auto r0 = n0.wait(seconds(180));
  const auto r1 = n1.wait(seconds(60));
  ASSERT_EQ(r0.exitCode, 0) << r0.output;
  ASSERT_EQ(r1.exitCode, 0) << r1.output;
  EXPECT_GE(cluster.leader(), 0) << "the two members left elect a leader";
  EXPECT_NE(cluster.leader(), leader);
  const auto h0 = hashesOf(job.metrics(0));
  EXPECT_EQ(h0.size(), 8u) << r0.output;
  EXPECT_EQ(expectSame(h0, hashesOf(job.metrics(1))), 8);
  EXPECT_TRUE(eventsOf(job.metrics(0), "recovered").empty() && eventsOf(job.metrics(1), "recovered").empty())
      << "nobody was dropped";
}

// The two members that are not `keep`.
std::vector<int> othersThan(int keep) {
  std::vector<int> out;
  for (int m = 0; m < 3; ++m) {
    if (m != keep) out.push_back(m);
  }
  return out;
}

// 2 of 3 members down: no quorum, so nothing can be committed; the job pauses
// and its launchers say so, naming the lost quorum. A member back within
// elastic.store_outage_timeout_s (60 s here): the job goes on, nothing lost.
TEST(LongElasticEtcdEndToEnd, LostQuorumPausesTheJobUntilAMemberReturns) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  EtcdJob job("quorum", cluster);
  const std::vector<std::string> outage = {"--set", "elastic.store_outage_timeout_s=60"};
  Subprocess& n0 = job.launch(0, {}, outage);
  Subprocess& n1 = job.launch(1, {}, outage);
  ASSERT_TRUE(job.waitForStep(0, 10, seconds(120))) << n0.output();
  const int leader = cluster.leader();
  ASSERT_GE(leader, 0);
  const int survivor = (leader + 1) % 3;
  const double lostAt = unixNow();
  for (int m : othersThan(survivor)) cluster.kill(m);
  EXPECT_TRUE(n0.waitForOutput("quorum", seconds(20))) << "the pause must name the lost quorum\n" << n0.output();
  std::this_thread::sleep_for(seconds(4));
  const int back = othersThan(survivor).front();
  const double backAt = unixNow();
  cluster.restart(back);
  EXPECT_TRUE(cluster.waitHealthy(survivor, std::chrono::seconds(30))) << cluster.logTail(survivor);
  const auto r0 = n0.wait(seconds(180));
  const auto r1 = n1.wait(seconds(60));
  ASSERT_EQ(r0.exitCode, 0) << r0.output;
  ASSERT_EQ(r1.exitCode, 0) << r1.output;
  // Paused: no outer step was committed while a majority was gone (a second
  // of slack for an event written just after its commit).
  for (const auto& e : eventsOf(job.metrics(0), "outer_step")) {
    const double t = e["time_s"].get<double>();
    EXPECT_FALSE(t > lostAt + 1.0 && t < backAt) << "outer step " << e["outer_step"] << " committed without quorum";
  }
  const auto h0 = hashesOf(job.metrics(0));
  EXPECT_EQ(h0.size(), 8u) << r0.output;
  EXPECT_EQ(expectSame(h0, hashesOf(job.metrics(1))), 8);
}

// Quorum lost for longer than elastic.store_outage_timeout_s (4 s here): the
// job stops with an error (non-zero exits, the lost quorum named) instead of
// waiting forever.
TEST(LongElasticEtcdEndToEnd, LostQuorumBeyondTheBoundStopsTheJob) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  EtcdJob job("stop", cluster);
  job.steps = 400;
  const std::vector<std::string> outage = {"--set", "elastic.store_outage_timeout_s=4", "--set",
                                           "elastic.wait_timeout_s=5"};
  job.rdzvTimeout = "4";
  Subprocess& n0 = job.launch(0, {}, outage);
  Subprocess& n1 = job.launch(1, {}, outage);
  ASSERT_TRUE(job.waitForStep(0, 10, seconds(120))) << n0.output();
  const int leader = cluster.leader();
  ASSERT_GE(leader, 0);
  for (int m : othersThan((leader + 1) % 3)) cluster.kill(m);
  // Bounded by store_outage_timeout_s: the decision or vote loop stops once
  // its store calls have failed for that long (each call itself rides out
  // the same bound inside the etcd client): about 10-25 s here; the wait is
  // generous for a loaded machine.
  const auto r0 = n0.wait(seconds(240));
  const auto r1 = n1.wait(seconds(120));
  EXPECT_FALSE(r0.timedOut) << "the job must stop on its own\n" << r0.output;
  EXPECT_EQ(r0.exitCode, 1) << r0.output;
  EXPECT_EQ(r1.exitCode, 1) << r1.output;
  EXPECT_TRUE(contains(r0.output, "quorum")) << r0.output;
  EXPECT_TRUE(contains(r0.output, "job failed")) << r0.output;
  EXPECT_TRUE(contains(r0.output, "store_outage_timeout_s")) << "the error names the key that bounds the outage\n"
                                                            << r0.output;
}

// The worker side of the contract, without etcd: the [elastic] store keys'
// checks, and the environment winning over them.
class EnvVars {
 public:
  explicit EnvVars(const std::map<std::string, std::string>& vars) {
    for (const char* name : {"TESSERA_NODE_SLOT", "TESSERA_NODE_INCARNATION", "TESSERA_NNODES", "TESSERA_STORE_ADDR",
                             "TESSERA_RDZV_BACKEND", "TESSERA_RDZV_ENDPOINT", "TESSERA_RDZV_ID", "TESSERA_ETCD_USER",
                             "TESSERA_ETCD_PASSWORD_FILE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}) {
      if (const char* old = std::getenv(name)) saved_[name] = old;
      ::unsetenv(name);
      names_.push_back(name);
    }
    for (const auto& [name, value] : vars) ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~EnvVars() {
    for (const auto& name : names_) ::unsetenv(name.c_str());
    for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
  }

 private:
  std::vector<std::string> names_;
  std::map<std::string, std::string> saved_;
};

std::string configErrorField(const tessera::parallel::ElasticConfig& config) {
  try {
    config.validate("elastic.");
  } catch (const tessera::ConfigError& e) {
    return e.field();
  }
  return "";
}

TEST(ElasticRendezvousConfig, StoreKeysAreChecked) {
  using tessera::parallel::ElasticConfig;
  ElasticConfig ok;
  ok.rdzv_backend = "etcd";
  ok.rdzv_endpoint = "e1:2379,e2:2379,e3:2379";
  ok.rdzv_id = "job-1.a";
  ok.store_outage_timeout_s = 5;
  EXPECT_EQ(configErrorField(ok), "");
  ElasticConfig c = ok;
  c.rdzv_backend = "consul";
  EXPECT_EQ(configErrorField(c), "elastic.rdzv_backend");
  c = ok;
  c.rdzv_endpoint = "e1:2379,,e3:2379";
  EXPECT_EQ(configErrorField(c), "elastic.rdzv_endpoint");
  c = ok;
  c.rdzv_endpoint = "e1";
  EXPECT_EQ(configErrorField(c), "elastic.rdzv_endpoint");
  c = ok;
  c.rdzv_backend = "tessera";  // one host:port only
  EXPECT_EQ(configErrorField(c), "elastic.rdzv_endpoint");
  c = ok;
  c.rdzv_id = "a/b";
  EXPECT_EQ(configErrorField(c), "elastic.rdzv_id");
  c = ok;
  c.store_outage_timeout_s = 0;
  EXPECT_EQ(configErrorField(c), "elastic.store_outage_timeout_s");
}

// The keys as tessera-train reads them from the [elastic] section.
TEST(ElasticRendezvousConfig, TomlKeys) {
  const std::string config = std::string(TESSERA_SOURCE_DIR) + "/examples/configs/gpt-elastic.toml";
  const auto job = tessera::launcher::loadTrainJobConfig(
      config, {"elastic.rdzv_backend=\"etcd\"", "elastic.rdzv_endpoint=\"e1:2379,e2:2379,e3:2379\"",
               "elastic.rdzv_id=\"job7\"", "elastic.store_outage_timeout_s=45"});
  EXPECT_EQ(job.elastic.rdzv_backend, "etcd");
  EXPECT_EQ(job.elastic.rdzv_endpoint, "e1:2379,e2:2379,e3:2379");
  EXPECT_EQ(job.elastic.rdzv_id, "job7");
  EXPECT_EQ(job.elastic.store_outage_timeout_s, 45.0);
  const auto defaults = tessera::launcher::loadTrainJobConfig(config);
  EXPECT_EQ(defaults.elastic.rdzv_backend, "tessera");
  EXPECT_EQ(defaults.elastic.store_outage_timeout_s, 60.0);
  try {
    tessera::launcher::loadTrainJobConfig(config, {"elastic.store_outage_timeout_s=-1"});
    ADD_FAILURE() << "a negative outage bound must be refused";
  } catch (const tessera::ConfigError& e) {
    EXPECT_EQ(e.field(), "elastic.store_outage_timeout_s");
  }
}

TEST(ElasticRendezvousConfig, LauncherEnvironmentWinsOverTheConfig) {
  using tessera::parallel::ElasticConfig;
  using tessera::parallel::ElasticIdentity;
  ElasticConfig config;
  config.rdzv_backend = "etcd";
  config.rdzv_endpoint = "c1:2379,c2:2379";
  config.rdzv_id = "from-config";
  {
    // tessera-run's etcd contract: the environment names the store.
    EnvVars env({{"TESSERA_NODE_SLOT", "2"},
                 {"TESSERA_RDZV_BACKEND", "etcd"},
                 {"TESSERA_RDZV_ENDPOINT", "e1:2379,e2:2379,e3:2379"},
                 {"TESSERA_RDZV_ID", "job7"},
                 {"TESSERA_ETCD_USER", "root"},
                 {"TESSERA_ETCD_PASSWORD_FILE", "/run/pw"}});
    const ElasticIdentity id = ElasticIdentity::fromEnv().resolved(config);
    EXPECT_EQ(id.backend, "etcd");
    EXPECT_EQ(id.endpoints, (std::vector<std::string>{"e1:2379", "e2:2379", "e3:2379"}));
    EXPECT_EQ(id.runId, "job7");
    EXPECT_EQ(id.etcdUser, "root");
    EXPECT_EQ(id.etcdPasswordFile, "/run/pw");
    EXPECT_EQ(id.slot, 2);
  }
  {
    // tessera-run's tessera contract overrides a config that names etcd.
    EnvVars env({{"TESSERA_NODE_SLOT", "0"},
                 {"TESSERA_RDZV_BACKEND", "tessera"},
                 {"TESSERA_RDZV_ENDPOINT", "store:29400"},
                 {"TESSERA_STORE_ADDR", "store:29400"},
                 {"TESSERA_RDZV_ID", ""}});
    const ElasticIdentity id = ElasticIdentity::fromEnv().resolved(config);
    EXPECT_EQ(id.backend, "tessera");
    EXPECT_EQ(id.endpoints, std::vector<std::string>{"store:29400"});
    EXPECT_EQ(id.storeAddress, "store:29400");
    EXPECT_EQ(id.runId, "from-config") << "an empty TESSERA_RDZV_ID leaves the config's";
  }
  {
    // tessera-train without tessera-run: the config names the store.
    EnvVars env(std::map<std::string, std::string>{{"TESSERA_NODE_SLOT", "1"}});
    const ElasticIdentity id = ElasticIdentity::fromEnv().resolved(config);
    EXPECT_EQ(id.backend, "etcd");
    EXPECT_EQ(id.endpoints, (std::vector<std::string>{"c1:2379", "c2:2379"}));
    EXPECT_EQ(id.runId, "from-config");
    // ... and with neither, the error names the key and the launcher.
    try {
      ElasticIdentity::fromEnv().resolved(ElasticConfig{});
      ADD_FAILURE() << "no store anywhere must be an error";
    } catch (const tessera::ConfigError& e) {
      EXPECT_EQ(e.field(), "elastic.rdzv_endpoint");
      EXPECT_TRUE(contains(e.what(), "tessera-run --nnodes MIN:MAX")) << e.what();
    }
  }
  {
    // Launchers from before TESSERA_RDZV_*: TESSERA_STORE_ADDR alone is a tessera store.
    EnvVars env({{"TESSERA_NODE_SLOT", "0"}, {"TESSERA_STORE_ADDR", "old:29400"}});
    const ElasticIdentity id = ElasticIdentity::fromEnv().resolved(ElasticConfig{});
    EXPECT_EQ(id.backend, "tessera");
    EXPECT_EQ(id.endpoints, std::vector<std::string>{"old:29400"});
  }
  {
    EnvVars env({{"TESSERA_NODE_SLOT", "0"}, {"TESSERA_RDZV_BACKEND", "zk"}});
    EXPECT_THROW(ElasticIdentity::fromEnv(), tessera::InvalidArgument);
  }
}

}  // namespace
