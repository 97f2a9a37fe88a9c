// Streaming DiLoCo, DeMo and MT-DAO in elastic jobs, end to end in real
// processes: a standalone tessera-store and one tessera-train per node (the
// environment tessera-run --nnodes MIN:MAX gives it), a tiny GPT, and one
// node killed with SIGKILL mid-run and started again as a new incarnation.
// From the nodes' metrics files:
//   - the survivor commits every sync of the run exactly once, numbered from
//     the optimizer's step counter (none lost while the node was away, none
//     applied twice across the retry and the rejoin), and finishes;
//   - the restarted node receives the state from the survivor over the
//     network ("recovered") and then holds what the survivor holds: the same
//     parameters after every sync (DeMo: every step; MT-DAO: every sync here,
//     all states sync together) or, for streaming DiLoCo -- whose fragments
//     differ between their syncs -- the same theta_g ("outer_hash" in the
//     metrics lines) at every logged step.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/launcher/subprocess.h"
#include "tests/parallel/elastic_metrics.h"

namespace {

using tessera::testing::Subprocess;
using Json = nlohmann::json;
using tessera::testing::eventsOf;
using tessera::testing::readLines;
namespace fs = std::filesystem;

// One optimizer's run: its overrides and how its syncs follow the steps.
struct Case {
  std::string name;
  std::vector<std::string> sets;  // --set arguments
  int steps = 0;
  int syncEvery = 1;    // trainer steps between syncs
  int killAfter = 0;    // the node is killed once it logged a sync at or after this step
  bool outerHash = false;  // compare theta_g ("outer_hash") instead of the parameters
  int stepsPerIndex = 1;   // sync index = step / this (the optimizer headers' numbering)
};

Case streamingDiloco() {
  // H = 4, two fragments (n_layer = 1: block 0 and the rest), tau = 1, mixing
  // 0.5, int8: a fragment sync every 2 steps, numbered step / 2.
  return Case{"streaming_diloco",
              {"optim.name=diloco", "diloco.inner_steps=4", "diloco.fragments=2", "diloco.delay=1",
               "diloco.mixing=0.5", "train.log_every=2"},
              24, 2, 8, true, 2};
}

Case demo() {
  return Case{"demo", {"optim.name=demo", "demo.compression_topk=8", "demo.compression_chunk=16",
                       "train.log_every=5"},
              20, 1, 6, false, 1};
}

Case mtDao() {
  return Case{"mt_dao", {"optim.name=mt-dao", "mt_dao.sync_params=4", "mt_dao.sync_momenta=[4]",
                         "mt_dao.sync_second=4", "train.log_every=4"},
              24, 4, 8, false, 1};
}

class ElasticOptimizerJob {
 public:
  explicit ElasticOptimizerJob(const std::string& name) {
    dir_ = fs::temp_directory_path() / ("tessera-elastic-opt-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    port_ = tessera::testing::pickFreePort();
    store_ = std::make_unique<Subprocess>(std::vector<std::string>{TESSERA_STORE_PATH, "--host", "127.0.0.1", "--port",
                                                                   std::to_string(port_)});
    EXPECT_TRUE(store_->waitForOutput("listening on", std::chrono::seconds(20))) << store_->output();
  }
  ~ElasticOptimizerJob() {
    nodes_.clear();
    store_.reset();
    if (!::testing::Test::HasFailure()) fs::remove_all(dir_);
  }

  Subprocess& start(const Case& c, int slot, int incarnation) {
    std::vector<std::string> argv = {TESSERA_TRAIN_PATH,
                                     "--config",
                                     std::string(TESSERA_SOURCE_DIR) + "/examples/configs/gpt-elastic.toml",
                                     "--metrics",
                                     metrics(slot)};
    std::vector<std::string> sets = {"model.n_layer=1", "model.d_model=32", "data.batch_size=8",
                                     "train.steps=" + std::to_string(c.steps), "optim.warmup_steps=2",
                                     "elastic.heartbeat_interval_s=0.25", "elastic.heartbeat_timeout_s=2.0",
                                     "elastic.wait_timeout_s=20.0", "elastic.collective_timeout_s=10.0",
                                     "elastic.start_grace_s=3.0", "train.threads=1"};
    sets.insert(sets.end(), c.sets.begin(), c.sets.end());
    for (const std::string& s : sets) {
      argv.push_back("--set");
      argv.push_back(s);
    }
    const std::map<std::string, std::string> env = {
        {"TESSERA_ELASTIC", "1"},
        {"TESSERA_STORE_ADDR", "127.0.0.1:" + std::to_string(port_)},
        {"TESSERA_ADVERTISE_HOST", "127.0.0.1"},
        {"TESSERA_NODE_SLOT", std::to_string(slot)},
        {"TESSERA_NODE_INCARNATION", std::to_string(incarnation)},
        {"TESSERA_NNODES", "2:4"},
        {"LOCAL_RANK", "0"},
        {"LOCAL_WORLD_SIZE", "1"},
        {"OMP_NUM_THREADS", "1"},
    };
    std::vector<std::string> unset = tessera::testing::foreignLaunchVariables();
    unset.push_back("TESSERA_FAULT_PLAN");
    nodes_.push_back(std::make_unique<Subprocess>(argv, env, unset));
    return *nodes_.back();
  }

  std::string metrics(int slot) const { return (dir_ / ("node" + std::to_string(slot) + ".jsonl")).string(); }

  // Blocks until node `slot`'s metrics show an outer_step event with step >= step.
  bool waitForStep(int slot, int64_t step, std::chrono::seconds timeout) const {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      for (const auto& e : eventsOf(readLines(metrics(slot)), "outer_step")) {
        if (e["step"].get<int64_t>() >= step) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

 private:
  fs::path dir_;
  int port_ = 0;
  std::unique_ptr<Subprocess> store_;
  std::vector<std::unique_ptr<Subprocess>> nodes_;
};

// step -> what two nodes must agree on after it: theta_g's hash in the
// metrics lines, or the parameters' hash in the outer_step events.
std::map<int64_t, std::string> agreedByStep(const std::vector<Json>& lines, bool outerHash) {
  std::map<int64_t, std::string> out;
  for (const auto& j : lines) {
    if (outerHash && !j.contains("event") && j.contains("outer_hash")) {
      out[j["step"].get<int64_t>()] = j["outer_hash"].get<std::string>();
    }
    if (!outerHash && j.contains("event") && j["event"] == "outer_step") {
      out[j["step"].get<int64_t>()] = j["param_hash"].get<std::string>();
    }
  }
  return out;
}

class ElasticOptimizersEndToEnd : public ::testing::TestWithParam<Case> {};

// Two nodes; node 1 is killed with SIGKILL after a few syncs and started
// again. Node 0 alone is below min_nodes = 2, so it waits for the restarted
// node, admits it at the next sync and serves it the state.
TEST_P(ElasticOptimizersEndToEnd, KilledNodeRestartsRecoversAndMatchesItsPeer) {
  const Case c = GetParam();
  ElasticOptimizerJob job(c.name);
  Subprocess& n0 = job.start(c, 0, 0);
  Subprocess& n1 = job.start(c, 1, 0);
  ASSERT_TRUE(job.waitForStep(1, c.killAfter, std::chrono::seconds(120))) << n1.output();
  ::kill(-n1.pid(), SIGKILL);
  Subprocess& again = job.start(c, 1, 1);
  const auto r0 = n0.wait(std::chrono::seconds(180));
  const auto r1 = again.wait(std::chrono::seconds(60));
  ASSERT_EQ(r0.exitCode, 0) << r0.output;
  ASSERT_EQ(r1.exitCode, 0) << r1.output;

  const std::vector<Json> lines0 = readLines(job.metrics(0));
  const std::vector<Json> lines1 = readLines(job.metrics(1));
  // The survivor: every sync of the run once, in order, numbered from the step.
  std::vector<int64_t> syncs, expected;
  for (const auto& e : eventsOf(lines0, "outer_step")) {
    const int64_t step = e["step"].get<int64_t>();
    EXPECT_EQ(e["outer_step"].get<int64_t>(), step / c.stepsPerIndex)
        << "the sync index follows the optimizer's step counter";
    EXPECT_FALSE(e["loss"].is_null()) << "NaN loss at step " << step;
    syncs.push_back(step);
  }
  for (int64_t step = c.syncEvery; step <= c.steps; step += c.syncEvery) expected.push_back(step);
  EXPECT_EQ(syncs, expected) << "every sync committed once on the survivor, none lost or repeated";

  const auto recovered = eventsOf(lines1, "recovered");
  ASSERT_EQ(recovered.size(), 1u) << r1.output;
  EXPECT_EQ(recovered[0]["from"], "0.0");
  EXPECT_GT(recovered[0]["bytes"].get<int64_t>(), 10000);
  const int64_t joinedAt = recovered[0]["step"].get<int64_t>();
  EXPECT_EQ(joinedAt % c.syncEvery, 0) << "the state is the one right after a sync";

  const auto agreed0 = agreedByStep(lines0, c.outerHash);
  const auto agreed1 = agreedByStep(lines1, c.outerHash);
  int compared = 0;
  int afterASync = 0;
  for (const auto& [step, hash] : agreed1) {
    if (step <= joinedAt) continue;  // the killed incarnation's lines
    const auto it = agreed0.find(step);
    ASSERT_TRUE(it != agreed0.end()) << "step " << step << " missing on the survivor";
    EXPECT_EQ(hash, it->second) << c.name << ": the restarted node differs from its peer after step " << step;
    ++compared;
    if (step >= joinedAt + c.syncEvery) ++afterASync;
  }
  EXPECT_GE(afterASync, 1) << "the restarted node must be compared after a sync it took part in";
  // It took part: its syncs ran with both nodes.
  int together = 0;
  for (const auto& e : eventsOf(lines1, "outer_step")) {
    if (e["step"].get<int64_t>() > joinedAt) together += e["members"] == 2 ? 1 : 0;
  }
  EXPECT_GE(together, 1);
  EXPECT_GE(compared, afterASync);
}

// Optimizers that synchronize every gradient over a fixed group have no
// elastic form: the node stops before training with a ConfigError (exit 2)
// naming the key.
TEST(ElasticOptimizersConfig, AnotherOptimizerIsAConfigErrorNamingTheKey) {
  ElasticOptimizerJob job("adamw");
  Case c = demo();
  c.name = "adamw";
  c.sets = {"optim.name=adamw", "elastic.start_grace_s=0.1"};
  Subprocess& node = job.start(c, 0, 0);
  const auto r = node.wait(std::chrono::seconds(60));
  EXPECT_EQ(r.exitCode, 2) << r.output;
  EXPECT_NE(r.output.find("optim.name"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"adamw\""), std::string::npos) << r.output;
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ElasticOptimizersEndToEnd, ::testing::Values(streamingDiloco(), demo(), mtDao()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
