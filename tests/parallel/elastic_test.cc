// ElasticMesh in one process: each "node" is a thread with its own mesh,
// store clients and Gloo groups, talking through a real tessera store over
// loopback. Membership decisions, joins, leaves, deaths, retries and
// evictions are checked against what the protocol (elastic.h) promises.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "parallel/elastic/heartbeat_monitor.h"
#include "tessera/comm/fault.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/config.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel {
namespace {

class ElasticMeshTest : public ::testing::Test {
 protected:
  void SetUp() override {
    comm::StoreServerOptions options;
    options.host = "127.0.0.1";
    server_ = std::make_unique<comm::StoreServer>(options);
  }

  ElasticIdentity identity(int slot, int minNodes, int maxNodes, int incarnation = 0) const {
    ElasticIdentity id;
    id.slot = slot;
    id.incarnation = incarnation;
    id.minNodes = minNodes;
    id.maxNodes = maxNodes;
    id.storeAddress = "127.0.0.1:" + std::to_string(server_->port());
    return id;
  }

  static ElasticConfig fastConfig() {
    ElasticConfig c;
    c.heartbeat_interval_s = 0.1;
    c.heartbeat_timeout_s = 0.6;
    c.wait_timeout_s = 2;
    c.collective_timeout_s = 5;
    c.join_timeout_s = 20;
    c.start_grace_s = 0.2;
    return c;
  }

  // Runs body(node) on `count` threads at once and returns their results (rethrowing the first error).
  template <typename Body>
  static auto onNodes(int count, Body body) {
    using Result = decltype(body(0));
    std::vector<std::future<Result>> futures;
    for (int node = 0; node < count; ++node) futures.push_back(std::async(std::launch::async, body, node));
    std::vector<Result> results;
    for (auto& f : futures) results.push_back(f.get());
    return results;
  }

  std::unique_ptr<comm::StoreServer> server_;
};

// Node i contributes (i + k) at outer step k; the mean of 0..n-1 plus k is exact in fp32.
at::Tensor contribution(int node, int64_t outerStep) { return at::full({7}, static_cast<float>(node + outerStep)); }

TEST(ElasticMembership, JsonRoundTripAndSlots) {
  Membership m;
  m.epoch = 4;
  m.outerStep = 9;
  m.attempt = 1;
  m.members = {"0.0", "2.1"};
  m.joiners = {{"3.0", "0.0"}};
  m.pending = {"5.2"};
  m.dropped = {"1.0"};
  m.joinCursor = 6;
  const Membership back = Membership::fromJson(m.toJson());
  EXPECT_EQ(back.epoch, 4);
  EXPECT_EQ(back.outerStep, 9);
  EXPECT_EQ(back.attempt, 1);
  EXPECT_EQ(back.members, m.members);
  EXPECT_EQ(back.joiners, m.joiners);
  EXPECT_EQ(back.pending, m.pending);
  EXPECT_EQ(back.dropped, m.dropped);
  EXPECT_EQ(back.joinCursor, 6);
  EXPECT_EQ(back.indexOf("2.1"), 1);
  EXPECT_EQ(back.indexOf("7.0"), -1);
  EXPECT_EQ(slotOf("12.3"), 12);
  EXPECT_THROW(slotOf("nodot"), InvalidArgument);
  EXPECT_THROW(Membership::fromJson("{\"epoch\": 1}"), InvalidArgument);
}

TEST(ElasticMembership, ConfigErrorsNameTheField) {
  ElasticConfig c;
  c.heartbeat_timeout_s = 1;  // < 2 x interval (2 s)
  try {
    c.validate();
    FAIL() << "expected a ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("elastic.heartbeat_timeout_s"), std::string::npos) << e.what();
  }
  ElasticConfig d;
  d.min_nodes = 3;
  d.max_nodes = 2;
  EXPECT_THROW(d.validate(), ConfigError);
}

TEST_F(ElasticMeshTest, ThreeFoundersAverageEveryOuterStep) {
  const auto results = onNodes(3, [&](int node) {
    ElasticMesh mesh(identity(node, 3, 3), fastConfig());
    EXPECT_FALSE(mesh.join().has_value()) << "a founder needs no state";
    std::vector<int64_t> epochs;
    for (int64_t k = 1; k <= 3; ++k) {
      at::Tensor flat = contribution(node, k);
      const Membership d = mesh.averageAcrossNodes(flat, k);
      EXPECT_EQ(d.members.size(), 3u);
      EXPECT_TRUE(at::equal(flat, at::full({7}, static_cast<float>(1 + k)))) << flat;
      epochs.push_back(d.epoch);
    }
    return epochs;
  });
  for (const auto& epochs : results) {
    EXPECT_EQ(epochs, results[0]);
    EXPECT_EQ(epochs[0], epochs[2]) << "unchanged membership must reuse the group (same epoch)";
  }
}

// PRIME's issue #21: a global group of one silently never communicated.
// Here a node alone still runs every outer step, and the mean of one is itself.
TEST_F(ElasticMeshTest, GroupOfOneRunsEveryOuterStep) {
  ElasticMesh mesh(identity(0, 1, 1), fastConfig());
  ASSERT_FALSE(mesh.join().has_value());
  for (int64_t k = 1; k <= 3; ++k) {
    at::Tensor flat = at::arange(5, at::kFloat) * static_cast<float>(k);
    const at::Tensor expected = flat.clone();
    const Membership d = mesh.averageAcrossNodes(flat, k);
    EXPECT_EQ(d.members, std::vector<std::string>{"0.0"});
    EXPECT_EQ(d.outerStep, k);
    EXPECT_TRUE(at::equal(flat, expected));
    ASSERT_NE(mesh.group(), nullptr) << "the group of one must exist and carry the outer step";
    EXPECT_EQ(mesh.group()->size(), 1);
  }
}

// A graceful leave is seen at once: with a 60 s heartbeat timeout the
// survivors would otherwise wait a minute for the leaver.
TEST_F(ElasticMeshTest, GracefulLeaveDoesNotWaitForTheHeartbeatTimeout) {
  ElasticConfig config = fastConfig();
  config.heartbeat_timeout_s = 60;
  config.wait_timeout_s = 60;
  const auto started = std::chrono::steady_clock::now();
  const auto results = onNodes(3, [&](int node) {
    ElasticMesh mesh(identity(node, 2, 3), config);
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == 2) {
      mesh.leave();
      return std::vector<std::string>{};
    }
    flat = contribution(node, 2);
    const Membership d = mesh.averageAcrossNodes(flat, 2);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 0.5f + 2.0f))) << "mean of nodes 0 and 1 only";
    EXPECT_EQ(d.dropped, std::vector<std::string>{"2.0"});
    return d.members;
  });
  EXPECT_EQ(results[0], (std::vector<std::string>{"0.0", "1.0"}));
  EXPECT_EQ(results[1], results[0]);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_LT(seconds, 30.0) << "the leave must not wait for the 60 s heartbeat timeout";
}

// A node that stops heartbeating (its mesh destroyed, as a killed process's
// would be) is dropped after the heartbeat timeout; the survivors' outer
// step averages over themselves only.
TEST_F(ElasticMeshTest, DeadNodeIsDroppedAfterTheHeartbeatTimeout) {
  const auto results = onNodes(3, [&](int node) {
    auto mesh = std::make_unique<ElasticMesh>(identity(node, 2, 3), fastConfig());
    EXPECT_FALSE(mesh->join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh->averageAcrossNodes(flat, 1);
    if (node == 1) {
      mesh.reset();  // dies silently: no leave notice, no more heartbeats
      return Membership{};
    }
    flat = contribution(node, 2);
    const Membership d = mesh->averageAcrossNodes(flat, 2);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 1.0f + 2.0f))) << "mean of nodes 0 and 2";
    return d;
  });
  EXPECT_EQ(results[0].members, (std::vector<std::string>{"0.0", "2.0"}));
  EXPECT_EQ(results[0].dropped, std::vector<std::string>{"1.0"});
  EXPECT_EQ(results[2].toJson(), results[0].toJson()) << "both survivors follow the same decision";
}

TEST_F(ElasticMeshTest, BelowMinNodesTheSurvivorStopsWithAClearError) {
  const auto results = onNodes(2, [&](int node) -> std::string {
    ElasticMesh mesh(identity(node, 2, 2), fastConfig());
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == 1) {
      mesh.leave();
      return "";
    }
    try {
      flat = contribution(node, 2);
      mesh.averageAcrossNodes(flat, 2);
      return "no error";
    } catch (const Error& e) {
      return e.what();
    }
  });
  EXPECT_NE(results[0].find("min_nodes = 2"), std::string::npos) << results[0];
  EXPECT_NE(results[0].find("stopped"), std::string::npos) << results[0];
}

// A joiner registers while the job runs, is admitted at the next outer step
// with a source, gets the address the source publishes, and after recovery
// takes part in the following outer step (new epoch, mean over three).
TEST_F(ElasticMeshTest, JoinerIsAdmittedServedAndThenAveraged) {
  std::promise<void> firstStepDone;
  std::shared_future<void> firstStep = firstStepDone.get_future().share();
  auto founder = [&](int node) {
    ElasticMesh mesh(identity(node, 2, 3), fastConfig());
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == 0) firstStepDone.set_value();
    // Outer step 2 must admit the joiner: give it time to register.
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    flat = contribution(node, 2);
    const Membership admitted = mesh.averageAcrossNodes(flat, 2);
    EXPECT_EQ(admitted.members.size(), 2u);
    for (const std::string& joiner : mesh.joinersToServe()) {
      mesh.publishRecoverySource(joiner, "127.0.0.1:" + std::to_string(40000 + node));
    }
    flat = contribution(node, 3);
    const Membership d = mesh.averageAcrossNodes(flat, 3);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 1.0f + 3.0f))) << "mean of 0, 1 and the joiner (2)";
    EXPECT_GT(d.epoch, admitted.epoch);
    return admitted;
  };
  auto f0 = std::async(std::launch::async, founder, 0);
  auto f1 = std::async(std::launch::async, founder, 1);
  firstStep.wait();
  ElasticMesh joiner(identity(2, 2, 3), fastConfig());
  const std::optional<RecoveryTicket> ticket = joiner.join();
  ASSERT_TRUE(ticket.has_value());
  EXPECT_EQ(ticket->source, "0.0");
  EXPECT_EQ(ticket->address, "127.0.0.1:40000");
  EXPECT_EQ(ticket->outerStep, 2);
  joiner.recovered(*ticket);
  at::Tensor flat = contribution(2, 3);
  const Membership d = joiner.averageAcrossNodes(flat, 3);
  EXPECT_EQ(d.members, (std::vector<std::string>{"0.0", "1.0", "2.0"}));
  EXPECT_TRUE(at::equal(flat, at::full({7}, 4.0f)));
  const Membership admitted = f0.get();
  f1.get();
  ASSERT_EQ(admitted.joiners.size(), 1u);
  EXPECT_EQ(admitted.joiners[0].first, "2.0");
}

// A joiner admitted with a source that dies before serving it leaves at once
// (Evicted, to rejoin as a new incarnation) instead of waiting out
// join_timeout_s, and the next decision drops it and the dead source without
// waiting out wait_timeout_s (15 s here).
TEST_F(ElasticMeshTest, JoinerWhoseSourceDiesBeforeServingLeavesAtOnce) {
  ElasticConfig config = fastConfig();
  config.wait_timeout_s = 15;
  config.join_timeout_s = 60;
  std::promise<void> firstStepDone;
  std::shared_future<void> firstStep = firstStepDone.get_future().share();
  auto founder = [&](int node) -> double {
    ElasticMesh mesh(identity(node, 1, 3), config);
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == 0) firstStepDone.set_value();
    std::this_thread::sleep_for(std::chrono::milliseconds(800));  // the joiner registers
    flat = contribution(node, 2);
    const Membership admitted = mesh.averageAcrossNodes(flat, 2);
    EXPECT_EQ(admitted.joiners.size(), 1u);
    if (node == 0) {  // the source dies before serving; its launcher marks it dead
      mesh.store()->setString("elastic/dead/0.0", "test: killed before serving its joiner");
      return 0;
    }
    const auto begin = std::chrono::steady_clock::now();
    flat = contribution(node, 3);
    const Membership d = mesh.averageAcrossNodes(flat, 3);
    EXPECT_EQ(d.members, (std::vector<std::string>{"1.0"}));
    EXPECT_TRUE(at::equal(flat, contribution(1, 3)));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  };
  auto f0 = std::async(std::launch::async, founder, 0);
  auto f1 = std::async(std::launch::async, founder, 1);
  firstStep.wait();
  ElasticMesh joiner(identity(2, 1, 3), config);
  const auto begin = std::chrono::steady_clock::now();
  EXPECT_THROW(joiner.join(), Evicted);
  const double joinerWaited = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  f0.get();
  const double survivorWaited = f1.get();
  EXPECT_LT(joinerWaited, 10.0) << "the joiner must not wait out join_timeout_s (60 s)";
  EXPECT_LT(survivorWaited, 10.0) << "the survivor must not wait out wait_timeout_s (15 s) for the joiner";
}

// A failure inside the outer all-reduce (the fault plan fails node 1's first
// collective on its elastic group) is voted down and the same step is
// retried on a re-formed group with the same inputs: the result is the
// correct mean, on every node, once.
TEST_F(ElasticMeshTest, FailedAllReduceIsRetriedWithTheSamePseudoGradients) {
  const auto results = onNodes(3, [&](int node) {
    ElasticMesh mesh(identity(node, 3, 3), fastConfig());
    if (node == 1) {
      // Only the first group formed gets the fault: the retry's group is healthy.
      const comm::FaultPlan plan = comm::FaultPlan::parse("fail:collective=1,comm=elastic");
      auto wrapped = std::make_shared<bool>(false);
      mesh.wrapGroup = [plan, wrapped](comm::CommPtr group) {
        if (*wrapped) return group;
        *wrapped = true;
        return comm::injectFaults(group, plan, 0);
      };
    }
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    const Membership d = mesh.averageAcrossNodes(flat, 1);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 2.0f))) << flat;
    EXPECT_EQ(d.members.size(), 3u);
    return mesh.lastAttempts();
  });
  EXPECT_EQ(results, (std::vector<int>{2, 2, 2}));
}

// A node too slow to arrive within wait_timeout is dropped; when it arrives
// it learns so (Evicted: the worker exits 75 and rejoins as a new node).
// Also when the slow node is the leader (slot 0): alive but absent, it loses
// the role to the first member that arrived, so the others are not held up.
class ElasticSlowNodeTest : public ElasticMeshTest, public ::testing::WithParamInterface<int> {};

TEST_P(ElasticSlowNodeTest, NodeDroppedWhileAwayIsEvicted) {
  const int slow = GetParam();
  ElasticConfig config = fastConfig();
  config.wait_timeout_s = 1;
  const auto results = onNodes(3, [&](int node) -> std::string {
    ElasticMesh mesh(identity(node, 2, 3), config);
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == slow) std::this_thread::sleep_for(std::chrono::seconds(3));
    try {
      flat = contribution(node, 2);
      const Membership d = mesh.averageAcrossNodes(flat, 2);
      return "member of " + std::to_string(d.members.size());
    } catch (const Evicted& e) {
      return std::string("evicted: ") + e.what();
    }
  });
  for (int node = 0; node < 3; ++node) {
    if (node == slow) {
      EXPECT_EQ(results[node].rfind("evicted: ", 0), 0u) << results[node];
    } else {
      EXPECT_EQ(results[node], "member of 2");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(SlowFollowerOrLeader, ElasticSlowNodeTest, ::testing::Values(2, 0));

// Several joiners at one outer step are spread over the members as sources
// (round-robin), so no single peer sends every copy.
TEST_F(ElasticMeshTest, SeveralJoinersAreSpreadOverSources) {
  std::promise<void> firstStepDone;
  std::shared_future<void> firstStep = firstStepDone.get_future().share();
  auto founder = [&](int node) {
    ElasticMesh mesh(identity(node, 2, 4), fastConfig());
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh.averageAcrossNodes(flat, 1);
    if (node == 0) firstStepDone.set_value();
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    flat = contribution(node, 2);
    const Membership admitted = mesh.averageAcrossNodes(flat, 2);
    for (const std::string& joiner : mesh.joinersToServe()) {
      mesh.publishRecoverySource(joiner, "127.0.0.1:" + std::to_string(41000 + node));
    }
    return admitted;
  };
  auto f0 = std::async(std::launch::async, founder, 0);
  auto f1 = std::async(std::launch::async, founder, 1);
  firstStep.wait();
  auto joiner = [&](int slot) {
    ElasticMesh mesh(identity(slot, 2, 4), fastConfig());
    const std::optional<RecoveryTicket> ticket = mesh.join();
    EXPECT_TRUE(ticket.has_value());
    return ticket ? ticket->source : std::string("none");
  };
  auto j2 = std::async(std::launch::async, joiner, 2);
  auto j3 = std::async(std::launch::async, joiner, 3);
  const std::set<std::string> sources = {j2.get(), j3.get()};
  EXPECT_EQ(sources, (std::set<std::string>{"0.0", "1.0"})) << "two joiners, two different sources";
  const Membership admitted = f0.get();
  f1.get();
  EXPECT_EQ(admitted.joiners.size(), 2u);
}

// --- Fast failure detection (heartbeat_monitor.h, groups.cc) ---

using elastic::HeartbeatMonitor;
using Seconds = std::chrono::duration<double>;

double secondsSince(std::chrono::steady_clock::time_point start) {
  return Seconds(std::chrono::steady_clock::now() - start).count();
}

// Polls `condition` every 20 ms for up to `limit` seconds; returns whether it held.
template <typename Condition>
bool eventually(double limit, Condition condition) {
  const auto start = std::chrono::steady_clock::now();
  while (secondsSince(start) < limit) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

// The hash store without its leases: the stores that keep heartbeat counters
// instead (the tessera store, TCP, file).
class NoLeaseStore final : public comm::Store {
 public:
  explicit NoLeaseStore(comm::StorePtr base) : base_(std::move(base)) {}
  void set(const std::string& k, const comm::Bytes& v) override { base_->set(k, v); }
  comm::Bytes get(const std::string& k, std::chrono::milliseconds t) override { return base_->get(k, t); }
  void wait(const std::vector<std::string>& k, std::chrono::milliseconds t) override { base_->wait(k, t); }
  int64_t add(const std::string& k, int64_t d) override { return base_->add(k, d); }
  comm::Bytes compareSet(const std::string& k, const comm::Bytes& e, const comm::Bytes& d) override {
    return base_->compareSet(k, e, d);
  }
  bool deleteKey(const std::string& k) override { return base_->deleteKey(k); }
  bool check(const std::vector<std::string>& k) override { return base_->check(k); }
  std::string describe() const override { return "hash store without leases"; }

 private:
  comm::StorePtr base_;
};

ElasticConfig monitorConfig(double interval, double timeout) {
  ElasticConfig c;
  c.heartbeat_interval_s = interval;
  c.heartbeat_timeout_s = timeout;
  return c;
}

// Both liveness records: leases (the hash store, like etcd) and counters.
class MonitorTest : public ::testing::TestWithParam<bool> {
 protected:
  comm::StorePtr store() const { return GetParam() ? hash_ : std::make_shared<NoLeaseStore>(hash_); }
  comm::StorePtr hash_ = comm::makeHashStore();
};

// A launcher's dead mark makes the member dead at once, whatever the
// heartbeat timeout (here 60 s) -- and refresh() reads it on the spot.
TEST_P(MonitorTest, DeadMarkIsDeadAtOnce) {
  const ElasticConfig config = monitorConfig(0.1, 60);
  HeartbeatMonitor a(store(), "0.0", config);
  HeartbeatMonitor b(store(), "1.0", config);
  EXPECT_EQ(b.usesLeases(), GetParam());
  b.watch({"0.0", "2.0"});
  EXPECT_TRUE(b.alive("0.0"));
  hash_->setString(elastic::deadKey("0.0"), "worker 0 killed by signal 9");
  b.refresh({"0.0"});
  const auto death = b.death("0.0");
  ASSERT_TRUE(death.has_value()) << "refresh() must read the mark on the spot";
  EXPECT_NE(death->cause.find("dead mark: worker 0 killed by signal 9"), std::string::npos) << death->cause;
  EXPECT_FALSE(b.alive("0.0"));
  // The thread sees marks too, within one observation (250 ms at most).
  hash_->setString(elastic::deadKey("2.0"), "worker exited with code 1");
  EXPECT_TRUE(eventually(5, [&] { return !b.alive("2.0"); })) << "the monitor thread never read the mark";
  EXPECT_TRUE(a.alive("1.0"));
}

// Silence: a member that stops its heartbeat (its monitor destroyed, as a
// killed process's would be) is dead after about heartbeat_timeout -- by the
// lease expiring where the store has leases, by the counter otherwise -- and
// not before (a running member stays alive for several timeouts).
TEST_P(MonitorTest, SilenceIsDeathAfterTheTimeout) {
  const ElasticConfig config = monitorConfig(0.1, 1.0);
  auto a = std::make_unique<HeartbeatMonitor>(store(), "0.0", config);
  HeartbeatMonitor b(store(), "1.0", config);
  b.watch({"0.0"});
  EXPECT_EQ(hash_->check({elastic::aliveKey("0.0")}), GetParam()) << "the alive key exists exactly with leases";
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_TRUE(b.alive("0.0")) << "a member that keeps beating must stay alive past the timeout";
  const auto killed = std::chrono::steady_clock::now();
  a.reset();
  ASSERT_TRUE(eventually(10, [&] { return !b.alive("0.0"); }));
  const double took = secondsSince(killed);
  EXPECT_GT(took, 0.3) << "declared dead before its lease/counter could have aged";
  const auto death = b.death("0.0");
  ASSERT_TRUE(death.has_value());
  EXPECT_EQ(death->cause, GetParam() ? "lease expired" : "heartbeat timeout");
  if (GetParam()) EXPECT_FALSE(hash_->check({elastic::aliveKey("0.0")})) << "the lease's key must be gone";
}

// Suspicion: after a collective failed, a member that shows no heartbeat
// within the window (about a second here) is dead, long before the 30 s
// heartbeat timeout; live members are suspected too and are NOT declared
// dead (their heartbeats clear them). Other nodes' monitors learn of the
// suspicion through the store.
TEST_P(MonitorTest, SuspicionIsConfirmedQuicklyAndClearedForTheLiving) {
  const ElasticConfig config = monitorConfig(0.1, 30);
  HeartbeatMonitor a(store(), "0.0", config);
  HeartbeatMonitor b(store(), "1.0", config);
  auto c = std::make_unique<HeartbeatMonitor>(store(), "2.0", config);
  ASSERT_LT(b.suspicionWindow().count(), 30000);
  a.watch({"1.0", "2.0"});
  b.watch({"0.0", "2.0"});
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // both have looked at everyone once
  c.reset();  // node 2 dies silently
  const auto failed = std::chrono::steady_clock::now();
  b.suspectPeers("test: connection closed");
  ASSERT_TRUE(eventually(15, [&] { return !b.alive("2.0") && !a.alive("2.0"); }))
      << "the suspicion was never confirmed (b: " << b.alive("2.0") << ", a: " << a.alive("2.0") << ")";
  EXPECT_LT(secondsSince(failed), 15.0);
  const auto death = b.death("2.0");
  ASSERT_TRUE(death.has_value());
  EXPECT_NE(death->cause.find("suspicion confirmed"), std::string::npos) << death->cause;
  // The living were suspected too: give the window time to pass twice over.
  std::this_thread::sleep_for(2 * b.suspicionWindow());
  EXPECT_TRUE(b.alive("0.0")) << "a live member was evicted on a false suspicion";
  EXPECT_TRUE(a.alive("1.0")) << "a live member was evicted on a false suspicion";
}

INSTANTIATE_TEST_SUITE_P(LeasesOrCounters, MonitorTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("Leases") : std::string("Counters");
                         });

ElasticConfig slowHeartbeatConfig() {
  ElasticConfig c;
  c.heartbeat_interval_s = 0.1;
  c.heartbeat_timeout_s = 30;  // silence alone would take 30 s
  c.wait_timeout_s = 60;
  c.collective_timeout_s = 60;  // formation timeout: min(60, 30 + 2) = 32 s
  c.join_timeout_s = 60;
  c.start_grace_s = 0.2;
  return c;
}

// A node whose launcher wrote its dead mark is dropped at the next outer
// step without waiting for its heartbeat to age (30 s here): the leader's
// wait for arrivals reacts to the mark.
TEST_F(ElasticMeshTest, DeadMarkEndsTheWaitForArrivals) {
  comm::StoreClientOptions client;
  client.port = server_->port();
  comm::StorePtr store = comm::makeStoreClient(client);
  std::atomic<std::chrono::steady_clock::rep> killedAt{0};  // node 2's death, on the steady clock
  const auto results = onNodes(3, [&](int node) {
    auto mesh = std::make_unique<ElasticMesh>(identity(node, 2, 3), slowHeartbeatConfig());
    EXPECT_FALSE(mesh->join().has_value());
    at::Tensor flat = contribution(node, 1);
    mesh->averageAcrossNodes(flat, 1);
    if (node == 2) {
      mesh.reset();  // the worker dies; its launcher says so
      killedAt = std::chrono::steady_clock::now().time_since_epoch().count();
      store->setString("elastic/dead/2.0", "worker exited with signal 9");
      return std::make_pair(Membership{}, 0.0);
    }
    flat = contribution(node, 2);
    const Membership d = mesh->averageAcrossNodes(flat, 2);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 0.5f + 2.0f))) << "mean of nodes 0 and 1";
    const std::chrono::steady_clock::time_point killed{std::chrono::steady_clock::duration(killedAt.load())};
    return std::make_pair(d, secondsSince(killed));
  });
  EXPECT_EQ(results[0].first.members, (std::vector<std::string>{"0.0", "1.0"}));
  EXPECT_EQ(results[0].first.dropped, std::vector<std::string>{"2.0"});
  EXPECT_LT(results[0].second, 15.0) << "the dead mark must not wait for the 30 s heartbeat timeout";
}

// A member dies while the group of a decision that includes it forms: the
// formation is abandoned when its dead mark appears, not after the 32 s
// formation timeout, and the retry commits without it. Node 2 is played by
// hand (registered and arrived, never forms), so the death lands inside the
// formation for sure.
TEST_F(ElasticMeshTest, FormationIsAbandonedWhenAMemberDies) {
  comm::StoreClientOptions client;
  client.port = server_->port();
  comm::StorePtr store = comm::makeStoreClient(client);
  {  // the phantom registers like a node (ElasticMesh's constructor)
    const int64_t index = store->add("elastic/join/count", 1) - 1;
    store->setString("elastic/join/" + std::to_string(index), "2.0");
  }
  std::vector<std::string> events0;
  std::mutex eventsMutex;
  std::thread phantom([&] {
    // Arrives at outer step 1, so the decision names it; then dies while the others form.
    store->setString("elastic/round/1/0/arrived/2.0", "1");
    store->wait({"elastic/round/1/0/decision"}, std::chrono::seconds(60));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    store->setString("elastic/dead/2.0", "worker exited with signal 9");
  });
  const auto started = std::chrono::steady_clock::now();
  const auto results = onNodes(2, [&](int node) {
    ElasticMesh mesh(identity(node, 2, 3), slowHeartbeatConfig());
    if (node == 0) {
      mesh.onEvent = [&](const std::string& line) {
        std::lock_guard<std::mutex> lock(eventsMutex);
        events0.push_back(line);
      };
    }
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    const Membership d = mesh.averageAcrossNodes(flat, 1);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 0.5f + 1.0f))) << "mean of nodes 0 and 1";
    return std::make_pair(d, mesh.lastAttempts());
  });
  phantom.join();
  const double seconds = secondsSince(started);
  EXPECT_LT(seconds, 20.0) << "the formation must be abandoned well before its 32 s timeout";
  EXPECT_EQ(results[0].first.members, (std::vector<std::string>{"0.0", "1.0"}));
  EXPECT_EQ(results[0].second, 2) << "one failed attempt (the abandoned formation), then the commit";
  // The events say what happened: a failed formation naming the dead member,
  // and a decision that dropped it with its cause.
  bool abandoned = false, decided = false;
  for (const auto& line : events0) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("event", "") == "group" && !j.value("ok", true)) {
      abandoned = j.value("error", "").find("abandoned: member 2.0 is dead") != std::string::npos;
    }
    if (j.value("event", "") == "decision" && j.value("attempt", 0) == 1) {
      for (const auto& dead : j.at("dead")) {
        decided = decided || (dead.value("member", "") == "2.0" &&
                              dead.value("cause", "").find("dead mark") != std::string::npos &&
                              dead.value("seen_s", 0.0) > 1e9);
      }
    }
  }
  EXPECT_TRUE(abandoned) << "no failed group event naming the dead member";
  EXPECT_TRUE(decided) << "no decision event with the dead member's cause";
}

// A false suspicion costs at most a retry: a collective fails on a healthy
// group (injected), every peer is suspected, all are alive and beat, and the
// step commits with every node at the second attempt -- nobody evicted.
TEST_F(ElasticMeshTest, FalseSuspicionCostsOnlyARetry) {
  ElasticConfig config = slowHeartbeatConfig();
  config.heartbeat_timeout_s = 10;   // suspicion window ~1 s < 10 s: suspicion is on
  config.collective_timeout_s = 8;   // the peers' failure diagnosis waits 2 s for the faulty rank's report
  const auto results = onNodes(3, [&](int node) {
    ElasticMesh mesh(identity(node, 3, 3), config);
    if (node == 1) {
      const comm::FaultPlan plan = comm::FaultPlan::parse("fail:collective=1,comm=elastic");
      auto wrapped = std::make_shared<bool>(false);
      mesh.wrapGroup = [plan, wrapped](comm::CommPtr group) {
        if (*wrapped) return group;
        *wrapped = true;
        return comm::injectFaults(group, plan, 0);
      };
    }
    EXPECT_FALSE(mesh.join().has_value());
    at::Tensor flat = contribution(node, 1);
    Membership d = mesh.averageAcrossNodes(flat, 1);
    EXPECT_TRUE(at::equal(flat, at::full({7}, 2.0f))) << flat;
    const int attempts = mesh.lastAttempts();
    // Past the suspicion window: still everyone.
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    flat = contribution(node, 2);
    d = mesh.averageAcrossNodes(flat, 2);
    EXPECT_EQ(d.members.size(), 3u) << "a live node was dropped on a false suspicion";
    return attempts;
  });
  EXPECT_EQ(results, (std::vector<int>{2, 2, 2}));
}

}  // namespace
}  // namespace tessera::parallel
