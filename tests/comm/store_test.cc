// The Store contract, run against every implementation: HashStore, FileStore,
// TcpStore (server and client in one process) and PrefixStore.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "tessera/comm/store.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"

namespace tessera::comm {
namespace {

using namespace std::chrono_literals;

struct StoreFactory {
  std::string name;
  std::function<StorePtr()> make;
};
void PrintTo(const StoreFactory& f, std::ostream* os) { *os << f.name; }

class StoreTest : public ::testing::TestWithParam<StoreFactory> {
 protected:
  void SetUp() override { store_ = GetParam().make(); }
  StorePtr store_;
};

TEST_P(StoreTest, SetGetRoundTripsBytes) {
  const Bytes value = {0, 1, 2, 255, 0};
  store_->set("k", value);
  EXPECT_EQ(store_->get("k", 1000ms), value);
  store_->setString("s", "hello");
  EXPECT_EQ(store_->getString("s"), "hello");
}

TEST_P(StoreTest, GetOfMissingKeyTimesOutNamingTheKey) {
  Stopwatch watch;
  try {
    store_->get("never-set", 300ms);
    FAIL() << "get of a missing key returned";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("never-set"), std::string::npos) << e.what();
  }
  EXPECT_LT(watch.seconds(), 5.0);
}

TEST_P(StoreTest, WaitListsOnlyTheMissingKeys) {
  store_->setString("present", "1");
  try {
    store_->wait({"present", "absent-a", "absent-b"}, 300ms);
    FAIL() << "wait returned with keys missing";
  } catch (const TimeoutError& e) {
    const std::string message = e.what();
    const std::string missing = message.substr(message.find("missing keys:"));
    EXPECT_NE(missing.find("absent-a"), std::string::npos) << message;
    EXPECT_NE(missing.find("absent-b"), std::string::npos) << message;
    EXPECT_EQ(missing.find("present"), std::string::npos) << message;
  }
}

TEST_P(StoreTest, WaitReturnsWhenAnotherThreadSets) {
  std::thread setter([&] {
    std::this_thread::sleep_for(100ms);
    store_->setString("late", "x");
  });
  store_->wait({"late"}, 5000ms);
  setter.join();
  EXPECT_TRUE(store_->check({"late"}));
}

TEST_P(StoreTest, AddIsAtomicAcrossThreads) {
  constexpr int kThreads = 4, kAdds = 50;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kAdds; ++i) store_->add("counter", 1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(store_->add("counter", 0), kThreads * kAdds);
}

TEST_P(StoreTest, CompareSetSwapsOnlyOnMatch) {
  EXPECT_EQ(toString(store_->compareSet("cas", {}, toBytes("first"))), "first");  // absent + empty: set
  EXPECT_EQ(toString(store_->compareSet("cas", toBytes("wrong"), toBytes("x"))), "first");
  EXPECT_EQ(toString(store_->compareSet("cas", toBytes("first"), toBytes("second"))), "second");
  EXPECT_EQ(store_->getString("cas"), "second");
}

TEST_P(StoreTest, DeleteAndCheck) {
  store_->setString("d", "1");
  EXPECT_TRUE(store_->check({"d"}));
  EXPECT_TRUE(store_->deleteKey("d"));
  EXPECT_FALSE(store_->check({"d"}));
  EXPECT_FALSE(store_->deleteKey("d"));
}

TEST_P(StoreTest, DescribeSaysWhereTheStoreIs) { EXPECT_FALSE(store_->describe().empty()); }

std::string tempPath(const std::string& stem) {
  static std::atomic<int> counter{0};
  return "/tmp/tessera-store-test-" + std::to_string(getpid()) + "-" + stem + std::to_string(counter++);
}

INSTANTIATE_TEST_SUITE_P(
    AllStores, StoreTest,
    ::testing::Values(StoreFactory{"hash", [] { return makeHashStore(); }},
                      StoreFactory{"file", [] { return makeFileStore(tempPath("file")); }},
                      StoreFactory{"tcp",
                                   [] {
                                     TcpStoreOptions options;
                                     options.port = 0;
                                     options.isServer = true;
                                     return StorePtr(std::make_shared<TcpStore>(options));
                                   }},
                      StoreFactory{"prefix_over_hash", [] { return makePrefixStore("group/epoch1", makeHashStore()); }}),
    [](const ::testing::TestParamInfo<StoreFactory>& info) { return info.param.name; });

TEST(PrefixStore, IsolatesNamespaces) {
  auto base = makeHashStore();
  auto a = makePrefixStore("a", base);
  auto b = makePrefixStore("b", base);
  a->setString("k", "from-a");
  EXPECT_FALSE(b->check({"k"}));
  EXPECT_EQ(base->getString("a/k"), "from-a");
  auto nested = makePrefixStore("inner", a);
  nested->setString("k", "deep");
  EXPECT_EQ(base->getString("a/inner/k"), "deep");
}

// Leases on the hash store (and through a prefix view): a leased key lives
// while kept alive, vanishes after its ttl or at once on revoke.
TEST(HashStoreLeases, KeysVanishWhenTheLeaseEndsAndNotBefore) {
  StorePtr base = makeHashStore();
  StorePtr store = makePrefixStore("job", base);
  ASSERT_TRUE(store->supportsLeases());
  const int64_t lease = store->grantLease(300ms);
  store->setWithLease("alive/a", toBytes("1"), lease);
  EXPECT_TRUE(base->check({"job/alive/a"}));
  for (int i = 0; i < 4; ++i) {  // 4 x 150 ms = twice the ttl, kept alive
    std::this_thread::sleep_for(150ms);
    store->keepAlive(lease);
  }
  EXPECT_TRUE(store->check({"alive/a"}));
  std::this_thread::sleep_for(450ms);
  EXPECT_FALSE(store->check({"alive/a"}));
  EXPECT_THROW(store->keepAlive(lease), StoreError);
  EXPECT_THROW(store->setWithLease("alive/b", toBytes("1"), lease), StoreError);

  const int64_t second = store->grantLease(std::chrono::seconds(60));
  store->setWithLease("alive/c", toBytes("1"), second);
  store->set("plain", toBytes("x"));
  store->revokeLease(second);
  store->revokeLease(second);  // idempotent
  EXPECT_FALSE(store->check({"alive/c"}));
  EXPECT_TRUE(store->check({"plain"}));
}

TEST(FileStoreLeases, AreRefusedNamingTheStore) {
  StorePtr store = makeFileStore(::testing::TempDir() + "/lease-store");
  EXPECT_FALSE(store->supportsLeases());
  try {
    store->grantLease(1s);
    FAIL() << "a file store granted a lease";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no leases"), std::string::npos) << e.what();
  }
}

TEST(TcpStore, ClientSeesServerKeys) {
  TcpStoreOptions serverOptions;
  serverOptions.port = 0;
  serverOptions.isServer = true;
  TcpStore server(serverOptions);
  TcpStoreOptions clientOptions;
  clientOptions.port = server.port();
  TcpStore client(clientOptions);
  server.setString("from-server", "1");
  EXPECT_EQ(client.getString("from-server", 2000ms), "1");
  client.add("n", 5);
  EXPECT_EQ(server.add("n", 0), 5);
  EXPECT_NE(client.describe().find(std::to_string(server.port())), std::string::npos) << client.describe();
}

}  // namespace
}  // namespace tessera::comm
