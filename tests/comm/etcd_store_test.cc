// The etcd store (etcd_store.h) against a real 3-member etcd cluster
// (tests/harness/etcd_cluster.h): every Store call, blocking waits woken by
// another client, add and compareSet under contention, leases, failover when
// the leader dies, a lost quorum that returns (or not) within the bound,
// authentication, and the rendezvous factory (rendezvous.h).
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <set>
#include <thread>

#include "tessera/comm/etcd_store.h"
#include "tessera/comm/rendezvous.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tests/harness/etcd_cluster.h"

namespace tessera::comm {
namespace {

using namespace std::chrono_literals;
using testing::EtcdCluster;
using Clock = std::chrono::steady_clock;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

EtcdStoreOptions optionsFor(std::vector<std::string> endpoints) {
  EtcdStoreOptions options;
  options.endpoints = std::move(endpoints);
  options.requestTimeout = 2s;
  options.outageTimeout = 20s;
  return options;
}

// Waits (bounded) for `done`; lease expiry happens on etcd's clock.
template <typename Predicate>
bool eventually(Predicate done, std::chrono::milliseconds within) {
  const auto deadline = Clock::now() + within;
  while (Clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return done();
}

// One 3-member cluster for the whole suite (its tests leave every member up).
class EtcdStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!tessera::testing::etcdBinary().empty()) cluster_ = new EtcdCluster(3);
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override { TESSERA_REQUIRE_ETCD(); }
  StorePtr connect() { return makeEtcdStore(optionsFor(cluster_->endpoints())); }
  // Keys of this test only (the suite shares one cluster).
  std::string key(const std::string& name) {
    return std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "/" + name;
  }

  static EtcdCluster* cluster_;
};
EtcdCluster* EtcdStoreTest::cluster_ = nullptr;

TEST_F(EtcdStoreTest, SetGetCheckDeleteDescribe) {
  StorePtr store = connect();
  EXPECT_EQ(store->describe(), "etcd://" + cluster_->endpointList());
  const Bytes binary = {0, 1, 2, 255, '\n', '"', 0};
  store->set(key("a"), binary);
  EXPECT_EQ(store->get(key("a"), 1s), binary);
  store->setString(key("b"), "");  // an empty value is a value
  EXPECT_TRUE(store->check({key("a"), key("b")}));
  EXPECT_FALSE(store->check({key("a"), key("missing")}));
  EXPECT_TRUE(store->deleteKey(key("a")));
  EXPECT_FALSE(store->deleteKey(key("a")));
  EXPECT_FALSE(store->check({key("a")}));
  try {
    store->get(key("a"), 300ms);
    FAIL() << "get of a missing key returned";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), key("a"))) << e.what();
    EXPECT_TRUE(contains(e.what(), "etcd://")) << e.what();
  }
  try {
    store->wait({key("b"), key("never")}, 200ms);
    FAIL() << "wait for a missing key returned";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), key("never"))) << e.what();
    EXPECT_FALSE(contains(e.what(), key("b") + ",")) << e.what();
  }
}

TEST_F(EtcdStoreTest, BlockingGetAndWaitWokenByAnotherClient) {
  StorePtr waiter = connect();
  StorePtr writer = connect();
  auto value = std::async(std::launch::async, [&] { return waiter->getString(key("late"), 20s); });
  auto waited = std::async(std::launch::async, [&] { waiter->wait({key("x"), key("y")}, 20s); });
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(value.wait_for(0s), std::future_status::timeout) << "get returned before the key was put";
  writer->setString(key("late"), "here");
  EXPECT_EQ(value.get(), "here");
  writer->setString(key("y"), "1");
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(waited.wait_for(0s), std::future_status::timeout) << "wait returned with a key missing";
  writer->setString(key("x"), "1");
  waited.get();  // throws if it timed out
}

TEST_F(EtcdStoreTest, AddFromSeveralThreadsAndClients) {
  StorePtr clients[2] = {connect(), connect()};
  constexpr int kThreads = 4, kAdds = 25;
  std::vector<std::future<std::vector<int64_t>>> results;
  for (int t = 0; t < kThreads; ++t) {
    results.push_back(std::async(std::launch::async, [&, t] {
      std::vector<int64_t> seen;
      for (int i = 0; i < kAdds; ++i) seen.push_back(clients[t % 2]->add(key("counter"), 1));
      return seen;
    }));
  }
  std::set<int64_t> all;
  for (auto& result : results) {
    for (int64_t value : result.get()) all.insert(value);
  }
  // Every add saw a distinct value: 1..N exactly once (none lost, none doubled).
  ASSERT_EQ(all.size(), size_t(kThreads * kAdds));
  EXPECT_EQ(*all.begin(), 1);
  EXPECT_EQ(*all.rbegin(), kThreads * kAdds);
  EXPECT_EQ(clients[0]->getString(key("counter")), std::to_string(kThreads * kAdds));
  EXPECT_EQ(clients[1]->add(key("counter"), -5), kThreads * kAdds - 5);
  clients[0]->setString(key("text"), "abc");
  EXPECT_THROW(clients[0]->add(key("text"), 1), InvalidArgument);
}

TEST_F(EtcdStoreTest, CompareSetHasExactlyOneWinner) {
  StorePtr clients[2] = {connect(), connect()};
  constexpr int kThreads = 8;
  std::vector<std::future<std::string>> results;
  for (int t = 0; t < kThreads; ++t) {
    results.push_back(std::async(std::launch::async, [&, t] {
      return toString(clients[t % 2]->compareSet(key("leader"), {}, toBytes("node-" + std::to_string(t))));
    }));
  }
  std::vector<std::string> answers;
  for (auto& result : results) answers.push_back(result.get());
  const std::string stored = clients[0]->getString(key("leader"));
  int winners = 0;
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(answers[t], stored) << "thread " << t << " was told another value than the one stored";
    winners += stored == "node-" + std::to_string(t);
  }
  EXPECT_EQ(winners, 1);
  // expected matches: swapped; does not: unchanged, the stored value returned.
  EXPECT_EQ(toString(clients[1]->compareSet(key("leader"), toBytes(stored), toBytes("next"))), "next");
  EXPECT_EQ(toString(clients[1]->compareSet(key("leader"), toBytes(stored), toBytes("again"))), "next");
  // Absent key with a non-empty expected: nothing set, `expected` handed back (as every store does).
  EXPECT_EQ(toString(clients[0]->compareSet(key("absent"), toBytes("x"), toBytes("y"))), "x");
  EXPECT_FALSE(clients[0]->check({key("absent")}));
}

TEST_F(EtcdStoreTest, LeasesExpireStayAliveAndRevoke) {
  StorePtr store = connect();
  ASSERT_TRUE(store->supportsLeases());
  // Without keepAlive: gone after the ttl (1 s; etcd's clock, so allow slack).
  const int64_t dying = store->grantLease(1s);
  store->setWithLease(key("dying"), toBytes("x"), dying);
  EXPECT_TRUE(store->check({key("dying")}));
  EXPECT_TRUE(eventually([&] { return !store->check({key("dying")}); }, 6s)) << "a key outlived its lease";
  EXPECT_THROW(store->keepAlive(dying), StoreError);
  EXPECT_THROW(store->setWithLease(key("late"), toBytes("x"), dying), StoreError);

  // With keepAlive every 300 ms: still there after three ttls.
  const int64_t living = store->grantLease(1s);
  store->setWithLease(key("living"), toBytes("y"), living);
  const auto until = Clock::now() + 3s;
  while (Clock::now() < until) {
    store->keepAlive(living);
    std::this_thread::sleep_for(300ms);
    ASSERT_TRUE(store->check({key("living")})) << "a kept-alive lease expired";
  }
  // Revoked: gone at once, for every client.
  StorePtr other = connect();
  store->revokeLease(living);
  EXPECT_FALSE(other->check({key("living")}));
  store->revokeLease(living);  // idempotent
  EXPECT_THROW(store->keepAlive(living), StoreError);
}

// A cluster per test below: they kill members.
TEST(EtcdFailover, LeaderKilledCallsGoOnThroughTheOthers) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  const int leader = cluster.leader();
  ASSERT_GE(leader, 0);
  // The killed member is listed first: every call starts there and fails over.
  std::vector<std::string> endpoints = {cluster.endpoint(leader)};
  for (int i = 0; i < cluster.size(); ++i) {
    if (i != leader) endpoints.push_back(cluster.endpoint(i));
  }
  StorePtr store = makeEtcdStore(optionsFor(endpoints));
  StorePtr waiter = makeEtcdStore(optionsFor(endpoints));
  store->setString("before", "1");
  EXPECT_EQ(store->add("count", 1), 1);
  auto blocked = std::async(std::launch::async, [&] { return waiter->getString("after-kill", 20s); });
  // Adds running while the leader dies: none lost, none applied twice.
  constexpr int kAdders = 2, kAdds = 40;
  std::vector<std::future<std::vector<int64_t>>> adders;
  for (int t = 0; t < kAdders; ++t) {
    adders.push_back(std::async(std::launch::async, [&] {
      StorePtr own = makeEtcdStore(optionsFor(endpoints));
      std::vector<int64_t> seen;
      for (int i = 0; i < kAdds; ++i) seen.push_back(own->add("busy", 1));
      return seen;
    }));
  }
  std::this_thread::sleep_for(200ms);

  cluster.kill(leader);
  store->setString("after-kill", "2");
  EXPECT_EQ(blocked.get(), "2");
  std::set<int64_t> seen;
  for (auto& adder : adders) {
    for (int64_t value : adder.get()) seen.insert(value);
  }
  EXPECT_EQ(seen.size(), size_t(kAdders * kAdds));
  EXPECT_EQ(store->getString("busy", 5s), std::to_string(kAdders * kAdds));
  EXPECT_EQ(store->getString("before", 5s), "1");
  EXPECT_EQ(store->add("count", 1), 2);
  EXPECT_EQ(toString(store->compareSet("count", toBytes("2"), toBytes("7"))), "7");
  EXPECT_TRUE(store->check({"before", "after-kill"}));
  // A fresh client whose first endpoint is dead connects too.
  StorePtr fresh = makeEtcdStore(optionsFor(endpoints));
  EXPECT_EQ(fresh->getString("count", 5s), "7");
  EXPECT_GE(cluster.leader(), 0);
  EXPECT_NE(cluster.leader(), leader);
}

TEST(EtcdFailover, LostQuorumFailsAfterTheBoundOrResumesWhenAMemberReturns) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(3);
  EtcdStoreOptions options = optionsFor(cluster.endpoints());
  options.requestTimeout = 500ms;
  options.outageTimeout = 2s;
  StorePtr store = makeEtcdStore(options);
  EtcdStoreOptions patientOptions = options;
  patientOptions.outageTimeout = 30s;
  StorePtr patient = makeEtcdStore(patientOptions);
  store->setString("k", "v");
  cluster.kill(0);
  cluster.kill(1);

  // Past the bound: StoreError naming the lost quorum and the endpoints.
  const auto started = Clock::now();
  try {
    store->setString("k", "w");
    FAIL() << "a write succeeded without quorum";
  } catch (const StoreError& e) {
    const std::string what = e.what();
    EXPECT_TRUE(contains(what, "no quorum")) << what;
    EXPECT_TRUE(contains(what, "2 of 3 endpoints unreachable")) << what;
    for (const auto& endpoint : cluster.endpoints()) EXPECT_TRUE(contains(what, endpoint)) << what;
  }
  const auto waited = Clock::now() - started;
  EXPECT_GE(waited, 1900ms) << "gave up before the outage bound";
  EXPECT_LT(waited, 30s) << "the outage bound was not applied";

  // A member back within the bound: the blocked call goes through.
  auto write = std::async(std::launch::async, [&] { patient->setString("k", "after"); });
  std::this_thread::sleep_for(1s);
  EXPECT_EQ(write.wait_for(0s), std::future_status::timeout) << "a write succeeded without quorum";
  cluster.restart(1);
  write.get();  // throws if the call failed
  EXPECT_EQ(patient->getString("k", 5s), "after");
}

TEST(EtcdAuth, UserPasswordAndExpiredTokens) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(1, {"--auth-token-ttl", "1"});
  cluster.enableAuth("s3cret");
  EtcdStoreOptions options = optionsFor(cluster.endpoints());
  options.outageTimeout = 5s;
  EXPECT_THROW(makeEtcdStore(options)->setString("k", "v"), AuthError) << "no user on a cluster with auth";
  options.user = "root";
  options.password = "wrong";
  try {
    makeEtcdStore(options);
    FAIL() << "a wrong password was accepted";
  } catch (const AuthError& e) {
    EXPECT_TRUE(contains(e.what(), "root")) << e.what();
  }
  options.password = "s3cret";
  StorePtr store = makeEtcdStore(options);
  store->setString("k", "v");
  // The token expires after 1 s idle (--auth-token-ttl 1): renewed transparently.
  std::this_thread::sleep_for(2500ms);
  EXPECT_EQ(store->getString("k", 5s), "v");
  EXPECT_EQ(store->add("n", 2), 2);
}

TEST(EtcdStore, NothingListeningFailsWithinTheBoundNamingTheEndpoint) {
  // No etcd needed: a port nobody listens on.
  EtcdStoreOptions options;
  options.endpoints = {"127.0.0.1:1"};
  options.requestTimeout = 200ms;
  options.outageTimeout = 500ms;
  try {
    makeEtcdStore(options);
    FAIL() << "connected to nothing";
  } catch (const StoreError& e) {
    EXPECT_TRUE(contains(e.what(), "127.0.0.1:1")) << e.what();
    EXPECT_TRUE(contains(e.what(), "unreachable")) << e.what();
  }
}

// --- the rendezvous factory ---------------------------------------------------

TEST(Rendezvous, RunIdsIsolateRunsOnOneEtcdCluster) {
  TESSERA_REQUIRE_ETCD();
  EtcdCluster cluster(1);
  RendezvousOptions options;
  options.backend = "etcd";
  options.endpoints = parseEndpointList(cluster.endpointList(), "--rdzv-endpoint");
  options.timeout = 10s;
  options.requestTimeout = 2s;
  options.runId = "run-a";
  StorePtr a = connectRendezvousStore(options);
  options.runId = "run-b";
  StorePtr b = connectRendezvousStore(options);
  a->setString("elastic/join/0", "alpha");
  EXPECT_EQ(a->add("elastic/join/count", 1), 1);
  EXPECT_FALSE(b->check({"elastic/join/0"})) << "run b sees run a's record";
  EXPECT_EQ(b->add("elastic/join/count", 1), 1);
  b->setString("elastic/join/0", "beta");
  EXPECT_EQ(a->getString("elastic/join/0", 1s), "alpha");
  // The records live under "<runId>/" on the cluster.
  StorePtr raw = makeEtcdStore(optionsFor(cluster.endpoints()));
  EXPECT_EQ(raw->getString("run-b/elastic/join/0", 1s), "beta");
  EXPECT_TRUE(a->supportsLeases());
}

TEST(Rendezvous, TesseraBackendWithRunId) {
  StoreServerOptions serverOptions;
  serverOptions.host = "127.0.0.1";
  serverOptions.secret = "s";
  StoreServer server(serverOptions);
  RendezvousOptions options;  // backend "tessera" by default
  options.endpoints = {"127.0.0.1:" + std::to_string(server.port())};
  options.secret = "s";
  options.timeout = 5s;
  options.requestTimeout = 2s;
  options.runId = "job7";
  StorePtr store = connectRendezvousStore(options);
  store->setString("k", "v");
  options.runId = "";
  EXPECT_EQ(connectRendezvousStore(options)->getString("job7/k", 1s), "v");
}

TEST(Rendezvous, BadBackendOrEndpointsNameTheFlag) {
  RendezvousOptions options;
  options.endpoints = {"127.0.0.1:2379"};
  options.backend = "zookeeper";
  try {
    connectRendezvousStore(options);
    FAIL() << "an unknown backend was accepted";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "--rdzv-backend")) << e.what();
    EXPECT_TRUE(contains(e.what(), "zookeeper")) << e.what();
    EXPECT_TRUE(contains(e.what(), "tessera or etcd")) << e.what();
  }
  options.backend = "tessera";
  options.endpoints = {"h1:1", "h2:2"};
  try {
    connectRendezvousStore(options);
    FAIL() << "the tessera backend took two endpoints";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "--rdzv-endpoint")) << e.what();
    EXPECT_TRUE(contains(e.what(), "etcd")) << e.what();
  }
  EXPECT_EQ(parseEndpointList(" h1:2379, http://h2:2379 ,[::1]:3", "--rdzv-endpoint"),
            (std::vector<std::string>{"h1:2379", "h2:2379", "[::1]:3"}));
  for (const std::string bad : {"", " , ", "h1:2379,,h2:2379", "h1", "h1:port", "h1:99999", "https://h1:2379"}) {
    try {
      parseEndpointList(bad, "--rdzv-endpoint");
      FAIL() << "'" << bad << "' was accepted";
    } catch (const ConfigError& e) {
      EXPECT_TRUE(contains(e.what(), "--rdzv-endpoint")) << bad << ": " << e.what();
    }
  }
}

}  // namespace
}  // namespace tessera::comm
