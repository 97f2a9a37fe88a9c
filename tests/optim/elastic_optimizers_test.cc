// The elastic variants of streaming DiLoCo, DeMo and MT-DAO
// (optim/elastic_collective.h, ElasticMesh::collectiveAcrossNodes) in one
// process: each node is a thread with its own ElasticMesh and Gloo groups,
// talking through a real tessera store over loopback (as
// tests/parallel/elastic_test.cc). Checked against the fixed-communicator
// optimizers, which have their own tests against the published formulas:
//   - with the same members, the elastic optimizer takes exactly the steps
//     (parameters and state, bit for bit) of the same optimizer on a fixed
//     Gloo group -- also when a sync's first attempt fails and is retried (the
//     body must be retry-safe), and after a member leaves, where the mean
//     must divide by the survivors: the reference is then the fixed optimizer
//     re-created on a group of the survivors with the same state;
//   - the sync indices are the ones the optimizers' step counters give, and
//     each sync ran on a group of the members at that moment;
//   - a joiner admitted at a sync that restores its source's state and
//     parameters (what live recovery sends) holds, from then on, what its
//     peers hold: theta_g (DiLoCo: the parameters of streaming fragments
//     differ between syncs), the parameters (DeMo: every step; MT-DAO: at
//     parameter syncs).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/fault.h"
#include "tessera/comm/store_group.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/optim/demo.h"
#include "tessera/optim/diloco.h"
#include "tessera/optim/mt_dao.h"
#include "tessera/parallel/elastic.h"

namespace tessera::optim {
namespace {

using Params = std::vector<at::Tensor>;
using parallel::ElasticConfig;
using parallel::ElasticIdentity;
using parallel::ElasticMesh;

enum class Kind { kStreaming, kStreamingDelayInt8, kDemo, kMtDao };

std::string kindName(Kind kind) {
  switch (kind) {
    case Kind::kStreaming: return "StreamingDiloco";
    case Kind::kStreamingDelayInt8: return "StreamingDilocoDelayMixingInt8";
    case Kind::kDemo: return "Demo";
    case Kind::kMtDao: return "MtDao";
  }
  return "?";
}

bool isDiloco(Kind kind) { return kind == Kind::kStreaming || kind == Kind::kStreamingDelayInt8; }

// --- The optimizers under test ---------------------------------------------

// Four tensors (1-D and 2-D, as DeMo needs) in four layer groups: two fragments.
const std::vector<std::vector<int64_t>> kShapes = {{8, 12}, {12}, {6, 8}, {6}};

at::Tensor seededRandn(at::IntArrayRef shape, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

// The same on every node: elastic founders start identical (one seed).
Params initialParams() {
  Params params;
  for (size_t i = 0; i < kShapes.size(); ++i) params.push_back(seededRandn(kShapes[i], 1000 + i).mul_(0.5));
  return params;
}

Params cloneAll(const Params& tensors) {
  Params out;
  for (const at::Tensor& t : tensors) out.push_back(t.defined() ? t.detach().clone() : at::Tensor());
  return out;
}

void copyInto(Params& target, const Params& source) {
  for (size_t i = 0; i < target.size(); ++i) target[i].copy_(source[i]);
}

// Node `node`'s gradient at `step`: its own data.
void setGradients(Params& params, int node, int64_t step) {
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = seededRandn(kShapes[i], 100000 * (node + 1) + 100 * step + i);
  }
}

DilocoConfig dilocoConfig(Kind kind) {
  DilocoConfig c;
  c.inner_steps = 4;
  c.fragments = 2;  // fragment syncs at every second step
  c.outer_lr = 0.7;
  c.outer_momentum = 0.9;
  c.nesterov = true;
  if (kind == Kind::kStreamingDelayInt8) {
    c.delay = 1;
    c.mixing = 0.5;
    c.compression = "int8";
  }
  return c;
}

DemoConfig demoConfig() {
  DemoConfig c;
  c.compression_decay = 0.9;
  c.compression_topk = 4;
  c.compression_chunk = 4;
  c.weight_decay = 0.01;
  return c;
}

// Momenta and v sync at other intervals than the parameters, so that some
// syncs carry momenta only.
MtDaoConfig mtDaoConfig() {
  MtDaoConfig c;
  c.betas = {0.9, 0.99};
  c.nus = {0.5, 0.3};
  c.beta2 = 0.999;
  c.weight_decay = 0.01;
  c.sync_params = 4;
  c.sync_momenta = {2, 3};
  c.sync_second = 6;
  return c;
}

constexpr double kLr = 0.01;

std::unique_ptr<Optimizer> innerAdamW(const Params& params) {
  OptimizerConfig inner;
  inner.name = "adamw";
  return makeOptimizer(inner, params, kLr);
}

std::unique_ptr<Optimizer> makeFixed(Kind kind, const Params& params, comm::CommPtr group) {
  if (isDiloco(kind)) return makeDiloco(dilocoConfig(kind), innerAdamW(params), params, group, {0, 1, 2, 3});
  if (kind == Kind::kDemo) return makeDemo(demoConfig(), params, group, kLr);
  return makeMtDao(mtDaoConfig(), params, group, kLr);
}

std::unique_ptr<Optimizer> makeElastic(Kind kind, const Params& params, ElasticCollective collective) {
  if (isDiloco(kind)) {
    return makeElasticDiloco(dilocoConfig(kind), innerAdamW(params), params, std::move(collective), {0, 1, 2, 3});
  }
  if (kind == Kind::kDemo) return makeElasticDemo(demoConfig(), params, std::move(collective), kLr);
  return makeElasticMtDao(mtDaoConfig(), params, std::move(collective), kLr);
}

// The syncs the optimizers' schedules put in steps [first, last] (1-based
// step counts), numbered as the headers say: streaming DiLoCo t / (H/P) at
// multiples of H/P; DeMo every step; MT-DAO T where anything is due.
std::vector<int64_t> expectedSyncs(Kind kind, int64_t first, int64_t last) {
  std::vector<int64_t> out;
  const MtDaoConfig m = mtDaoConfig();
  for (int64_t t = first; t <= last; ++t) {
    if (isDiloco(kind) && t % 2 == 0) out.push_back(t / 2);
    if (kind == Kind::kDemo) out.push_back(t);
    const bool anyDue =
        t % m.sync_params == 0 || t % m.sync_momenta[0] == 0 || t % m.sync_momenta[1] == 0 || t % m.sync_second == 0;
    if (kind == Kind::kMtDao && anyDue) out.push_back(t);
  }
  return out;
}

// What equal nodes must agree on after step t: DiLoCo's theta_g (always);
// DeMo's parameters (always); MT-DAO's parameters after a parameter sync.
std::optional<Params> agreedAfter(Kind kind, const Optimizer& optimizer, const Params& params, int64_t t) {
  if (isDiloco(kind)) return cloneAll(optimizer.state().perParameter.at("diloco/outer"));
  if (kind == Kind::kDemo) return cloneAll(params);
  if (t % mtDaoConfig().sync_params == 0) return cloneAll(params);
  return std::nullopt;
}

void expectSameTensors(const Params& a, const Params& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].defined(), b[i].defined()) << what << " tensor " << i;
    if (a[i].defined()) {
      EXPECT_TRUE(at::equal(a[i], b[i])) << what << " tensor " << i << " differs";
    }
  }
}

// A snapshot waiting for its sync (delay > 0) is saved averaged by the
// fixed DiLoCo, still local by the elastic one (diloco.h): only whether one
// waits must agree there.
void expectSameState(const OptimizerState& fixed, const OptimizerState& elastic, const std::string& what) {
  ASSERT_EQ(fixed.perParameter.size(), elastic.perParameter.size()) << what;
  for (const auto& [kind, tensors] : fixed.perParameter) {
    ASSERT_TRUE(elastic.perParameter.count(kind)) << what << ": elastic state lacks " << kind;
    if (kind == "diloco/pending_delta") {
      for (size_t i = 0; i < tensors.size(); ++i) {
        EXPECT_EQ(tensors[i].defined(), elastic.perParameter.at(kind)[i].defined()) << what << " " << kind << " " << i;
      }
      continue;
    }
    expectSameTensors(tensors, elastic.perParameter.at(kind), what + " state '" + kind + "'");
  }
  EXPECT_EQ(fixed.scalars, elastic.scalars) << what;
}

OptimizerState cloneState(const OptimizerState& s) {
  OptimizerState out = s;
  for (auto& [kind, tensors] : out.perParameter) tensors = cloneAll(tensors);
  for (auto& [kind, tensors] : out.perParameterAux) tensors = cloneAll(tensors);
  return out;
}

// --- The elastic side --------------------------------------------------------

struct SyncLog {
  std::vector<int64_t> indices;  // committed syncs, in order
  std::vector<int> sizes;        // the group each committed body ran on
  std::vector<int> attempts;
};

// The mesh's collective, recording what the optimizer asked for.
ElasticCollective recordingCollective(ElasticMesh& mesh, SyncLog& log) {
  return [&mesh, &log](int64_t index, const ElasticGroupBody& body) {
    int size = 0;
    mesh.collectiveAcrossNodes(index, [&](comm::Communicator& group) {
      size = group.size();
      body(group);
    });
    log.indices.push_back(index);
    log.sizes.push_back(size);
    log.attempts.push_back(mesh.lastAttempts());
  };
}

class ElasticOptimizersTest : public ::testing::TestWithParam<Kind> {
 protected:
  void SetUp() override {
    at::set_num_threads(1);  // every node is a thread of this process
    comm::StoreServerOptions options;
    options.host = "127.0.0.1";
    server_ = std::make_unique<comm::StoreServer>(options);
  }

  ElasticIdentity identity(int slot, int minNodes, int maxNodes) const {
    ElasticIdentity id;
    id.slot = slot;
    id.minNodes = minNodes;
    id.maxNodes = maxNodes;
    id.storeAddress = "127.0.0.1:" + std::to_string(server_->port());
    return id;
  }

  static ElasticConfig fastConfig() {
    ElasticConfig c;
    c.heartbeat_interval_s = 0.1;
    c.heartbeat_timeout_s = 0.6;
    c.wait_timeout_s = 5;
    c.collective_timeout_s = 5;
    c.join_timeout_s = 20;
    c.start_grace_s = 0.2;
    return c;
  }

  // A fixed Gloo group of `size` threads under store prefix `prefix`.
  comm::CommPtr fixedGroup(const std::string& prefix, int rank, int size) const {
    comm::StoreClientOptions options;
    options.port = server_->port();
    comm::GroupOptions group;
    group.timeout = std::chrono::seconds(30);
    return comm::makeStoreGroup(comm::makeStoreClient(options), prefix, rank, size, group);
  }

  std::unique_ptr<comm::StoreServer> server_;
};

// Three nodes train 8 steps with the elastic optimizer and, beside it, the
// same optimizer on a fixed group of the three; node 1's first elastic group
// fails its first collective (the sync is retried). Node 2 then leaves, and
// nodes 0 and 1 train 8 more steps against the fixed optimizer re-created on
// a group of the two with the state it had.
TEST_P(ElasticOptimizersTest, EqualTheFixedGroupOptimizerAlsoAcrossARetryAndALeave) {
  const Kind kind = GetParam();
  constexpr int64_t kPhase = 8;
  std::vector<SyncLog> logs(3);
  std::vector<std::future<void>> nodes;
  for (int node = 0; node < 3; ++node) {
    nodes.push_back(std::async(std::launch::async, [&, node] {
      comm::CommPtr fixed3 = fixedGroup("fixed3", node, 3);
      ElasticMesh mesh(identity(node, 2, 3), fastConfig());
      // (The int8 ring moves its data with send/recv, which fail: plans do not count.)
      if (node == 1 && kind != Kind::kStreamingDelayInt8) {
        const comm::FaultPlan plan = comm::FaultPlan::parse("fail:collective=1,comm=elastic");
        auto wrapped = std::make_shared<bool>(false);
        mesh.wrapGroup = [plan, wrapped](comm::CommPtr group) {
          if (*wrapped) return group;
          *wrapped = true;
          return comm::injectFaults(group, plan, 1);
        };
      }
      ASSERT_FALSE(mesh.join().has_value());
      Params a = initialParams();  // the fixed optimizer's
      Params b = initialParams();  // the elastic one's
      std::unique_ptr<Optimizer> fixed = makeFixed(kind, a, fixed3);
      std::unique_ptr<Optimizer> elastic = makeElastic(kind, b, recordingCollective(mesh, logs[node]));
      auto train = [&](int64_t first, int64_t last) {
        for (int64_t t = first; t <= last; ++t) {
          setGradients(a, node, t);
          setGradients(b, node, t);
          fixed->step();
          const OptimizerStepResult r = elastic->step();
          const std::string what = kindName(kind) + " node " + std::to_string(node) + " step " + std::to_string(t);
          expectSameTensors(a, b, what + " parameters");
          expectSameState(fixed->state(), elastic->state(), what);
          const std::vector<int64_t> due = expectedSyncs(kind, t, t);
          EXPECT_EQ(r.outerStep, !due.empty()) << what << ": every elastic sync is reported";
        }
      };
      train(1, kPhase);
      if (node == 2) {
        mesh.leave();
        return;
      }
      // The reference for two members: the same optimizer on a group of the
      // two, with the state and parameters the fixed one had (DiLoCo's
      // constructor broadcasts replica 0's parameters: restore them after).
      const OptimizerState state = cloneState(fixed->state());
      const Params before = cloneAll(a);
      fixed = makeFixed(kind, a, fixedGroup("fixed2", node, 2));
      copyInto(a, before);
      fixed->loadState(state);
      train(kPhase + 1, 2 * kPhase);
    }));
  }
  for (auto& n : nodes) n.get();

  const std::vector<int64_t> phase1 = expectedSyncs(kind, 1, kPhase);
  std::vector<int64_t> all = phase1;
  for (int64_t k : expectedSyncs(kind, kPhase + 1, 2 * kPhase)) all.push_back(k);
  EXPECT_EQ(logs[2].indices, phase1);
  for (int node = 0; node < 2; ++node) {
    EXPECT_EQ(logs[node].indices, all) << "node " << node;
    ASSERT_EQ(logs[node].sizes.size(), all.size());
    for (size_t s = 0; s < all.size(); ++s) {
      EXPECT_EQ(logs[node].sizes[s], s < phase1.size() ? 3 : 2) << "node " << node << " sync " << all[s];
    }
  }
  if (kind != Kind::kStreamingDelayInt8) {
    for (int node = 0; node < 3; ++node) {
      EXPECT_EQ(logs[node].attempts.front(), 2) << "node " << node << ": the first sync must have been retried";
    }
  }
}

// Two founders train; a third node registers after their first sync, is
// admitted at the second, restores the state its source snapshots right
// after that sync (what live recovery sends) and trains on with them. From
// the admitting sync on, it holds what its peers hold at every comparable step.
TEST_P(ElasticOptimizersTest, JoinerHoldsWhatItsPeersHoldFromTheNextSync) {
  const Kind kind = GetParam();
  const int64_t steps = kind == Kind::kDemo ? 6 : 8;
  struct Snapshot {
    OptimizerState state;
    Params params;
    int64_t step = 0;
  };
  std::promise<Snapshot> served;
  std::promise<void> firstSyncDone, registered;
  std::shared_future<void> registeredFuture = registered.get_future().share();
  std::vector<SyncLog> logs(3);
  std::vector<std::map<int64_t, Params>> agreed(3);  // node -> step -> what must agree

  auto founder = [&](int node) {
    ElasticMesh mesh(identity(node, 2, 3), fastConfig());
    ASSERT_FALSE(mesh.join().has_value());
    Params params = initialParams();
    std::unique_ptr<Optimizer> optimizer = makeElastic(kind, params, recordingCollective(mesh, logs[node]));
    bool waited = false;
    for (int64_t t = 1; t <= steps; ++t) {
      setGradients(params, node, t);
      const OptimizerStepResult r = optimizer->step();
      if (auto a = agreedAfter(kind, *optimizer, params, t)) agreed[node][t] = *a;
      if (r.outerStep) {
        for (const std::string& joiner : mesh.joinersToServe()) {
          EXPECT_EQ(joiner, "2.0");
          served.set_value(Snapshot{cloneState(optimizer->state()), cloneAll(params), t});
          mesh.publishRecoverySource(joiner, "in-process");
        }
      }
      if (!waited && !logs[node].indices.empty()) {
        if (node == 0) firstSyncDone.set_value();
        registeredFuture.wait();  // so that the next sync admits it
        waited = true;
      }
    }
  };
  auto f0 = std::async(std::launch::async, founder, 0);
  auto f1 = std::async(std::launch::async, founder, 1);
  firstSyncDone.get_future().wait();
  int64_t joinedAt = 0;
  int64_t admittedAt = -1;
  {
    ElasticMesh mesh(identity(2, 2, 3), fastConfig());
    registered.set_value();
    const std::optional<parallel::RecoveryTicket> ticket = mesh.join();
    ASSERT_TRUE(ticket.has_value());
    Snapshot snapshot = served.get_future().get();
    joinedAt = snapshot.step;
    EXPECT_EQ(ticket->outerStep, expectedSyncs(kind, 1, snapshot.step).back())
        << "admitted at the sync of the snapshot's step";
    admittedAt = ticket->outerStep;
    Params params = initialParams();
    std::unique_ptr<Optimizer> optimizer = makeElastic(kind, params, recordingCollective(mesh, logs[2]));
    copyInto(params, snapshot.params);
    optimizer->loadState(snapshot.state);
    mesh.recovered(*ticket);
    for (int64_t t = snapshot.step + 1; t <= steps; ++t) {
      setGradients(params, 2, t);
      optimizer->step();
      if (auto a = agreedAfter(kind, *optimizer, params, t)) agreed[2][t] = *a;
    }
  }
  f0.get();
  f1.get();
  ASSERT_GE(logs[0].indices.size(), 2u);
  EXPECT_EQ(admittedAt, logs[0].indices[1]) << "admitted at the second sync";

  const std::vector<int64_t> later = expectedSyncs(kind, joinedAt + 1, steps);
  ASSERT_FALSE(later.empty());
  EXPECT_EQ(logs[2].indices, later) << "the joiner continues the numbering";
  for (int size : logs[2].sizes) EXPECT_EQ(size, 3);
  int compared = 0;
  for (const auto& [t, values] : agreed[2]) {
    ASSERT_TRUE(agreed[0].count(t) && agreed[1].count(t)) << "step " << t;
    expectSameTensors(agreed[0][t], values, kindName(kind) + " joiner vs node 0 after step " + std::to_string(t));
    expectSameTensors(agreed[0][t], agreed[1][t], kindName(kind) + " node 1 vs node 0 after step " + std::to_string(t));
    ++compared;
  }
  EXPECT_GE(compared, 1) << "the joiner must be compared after a sync it took part in";
  // And the joiner's contribution counted: the founders' syncs after the
  // admission ran on groups of three.
  for (size_t s = 0; s < logs[0].indices.size(); ++s) {
    EXPECT_EQ(logs[0].sizes[s], logs[0].indices[s] > logs[0].indices[1] ? 3 : 2) << "sync " << logs[0].indices[s];
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ElasticOptimizersTest,
                         ::testing::Values(Kind::kStreaming, Kind::kStreamingDelayInt8, Kind::kDemo, Kind::kMtDao),
                         [](const ::testing::TestParamInfo<Kind>& info) { return kindName(info.param); });

// The factories refuse a missing collective, and the elastic DiLoCo takes
// streaming configurations (it used to refuse fragments > 1).
TEST(ElasticOptimizerFactories, RefuseANullCollectiveAndTakeStreaming) {
  const Params params = initialParams();
  EXPECT_THROW(makeElasticDiloco(dilocoConfig(Kind::kStreaming), innerAdamW(params), params, nullptr), InvalidArgument);
  EXPECT_THROW(makeElasticDemo(demoConfig(), params, nullptr, kLr), InvalidArgument);
  EXPECT_THROW(makeElasticMtDao(mtDaoConfig(), params, nullptr, kLr), InvalidArgument);
  const ElasticCollective alone = [](int64_t, const ElasticGroupBody& body) {
    const comm::CommPtr one = comm::makeSingleRankCommunicator("alone");
    body(*one);
  };
  auto diloco = makeElasticDiloco(dilocoConfig(Kind::kStreamingDelayInt8), innerAdamW(params), params, alone,
                                  {0, 1, 2, 3});
  EXPECT_TRUE(diloco->communicators().empty());
  DilocoConfig bad = dilocoConfig(Kind::kStreaming);
  bad.fragments = 3;  // does not divide inner_steps = 4
  EXPECT_THROW(makeElasticDiloco(bad, innerAdamW(params), params, alone), ConfigError);
}

}  // namespace
}  // namespace tessera::optim
