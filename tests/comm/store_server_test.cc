// tessera's own store (store_server.h): Store semantics over a real server,
// the join secret, garbage on the port, a dying server, the request parser
// under random input, and Gloo rendezvousing through it.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <future>
#include <random>
#include <thread>

#include "comm/store/store_wire.h"
#include "tessera/comm/gloo.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

using namespace std::chrono_literals;

constexpr char kSecret[] = "correct horse battery staple";

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

StoreServerOptions serverOptions(uint16_t port = 0) {
  StoreServerOptions options;
  options.host = "127.0.0.1";
  options.port = port;
  options.secret = kSecret;
  return options;
}

StoreClientOptions clientOptions(uint16_t port, const std::string& secret = kSecret) {
  StoreClientOptions options;
  options.host = "127.0.0.1";
  options.port = port;
  options.secret = secret;
  options.timeout = 5s;
  options.requestTimeout = 2s;
  return options;
}

// Waits (bounded) until the server's counters satisfy `done`: the server
// handles a bad connection on its own thread, after the test's send returns.
template <typename Predicate>
StoreServerStats waitForStats(const StoreServer& server, Predicate done) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  StoreServerStats stats = server.stats();
  while (!done(stats) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
    stats = server.stats();
  }
  return stats;
}

class StoreServerTest : public ::testing::Test {
 protected:
  StoreServerTest() : server_(serverOptions()) {}
  StorePtr client() { return makeStoreClient(clientOptions(server_.port())); }
  // A legitimate client still gets full service.
  void expectServing() {
    auto store = client();
    store->setString("still-serving", "yes");
    EXPECT_EQ(store->getString("still-serving", 2s), "yes");
  }
  StoreServer server_;
};

TEST_F(StoreServerTest, StoreOpsFollowTheStoreContract) {
  {  // SetGetCheckDeleteAndDescribe
    auto store = client();
    EXPECT_EQ(store->describe(), "tessera://127.0.0.1:" + std::to_string(server_.port()));
    const Bytes value = {0, 1, 2, 255, 0};
    store->set("k", value);
    EXPECT_EQ(store->get("k", 1s), value);
    store->set("empty", {});
    EXPECT_EQ(store->get("empty", 1s), Bytes{});
    EXPECT_TRUE(store->check({"k", "empty"}));
    EXPECT_FALSE(store->check({"k", "absent"}));
    EXPECT_TRUE(store->check({}));
    EXPECT_TRUE(store->deleteKey("k"));
    EXPECT_FALSE(store->deleteKey("k"));
    EXPECT_FALSE(store->check({"k"}));
    // Another client sees the same data.
    EXPECT_TRUE(client()->check({"empty"}));
  }
  {  // LargeValueRoundTrips
    auto store = client();
    Bytes large(5 << 20);
    for (size_t i = 0; i < large.size(); ++i) large[i] = static_cast<uint8_t>(i % 251);
    store->set("large", large);
    EXPECT_EQ(client()->get("large", 5s), large);
  }
  {  // AddAndCompareSetFollowTheStoreContract
    auto store = client();
    EXPECT_EQ(store->add("n", 5), 5);   // absent counts as 0
    EXPECT_EQ(store->add("n", -7), -2);
    EXPECT_EQ(store->getString("n", 1s), "-2");  // stored as decimal text, like every Store
    // compareSet: absent + empty expected -> set; absent + non-empty expected -> unchanged, returns expected.
    EXPECT_EQ(toString(store->compareSet("c", toBytes("x"), toBytes("y"))), "x");
    EXPECT_FALSE(store->check({"c"}));
    EXPECT_EQ(toString(store->compareSet("c", {}, toBytes("first"))), "first");
    EXPECT_EQ(toString(store->compareSet("c", toBytes("wrong"), toBytes("second"))), "first");
    EXPECT_EQ(toString(store->compareSet("c", toBytes("first"), toBytes("second"))), "second");
    EXPECT_EQ(store->getString("c", 1s), "second");
    // add on a non-integer is refused, and the connection keeps working.
    EXPECT_THROW(store->add("c", 1), StoreError);
    EXPECT_EQ(store->add("n", 2), 0);
  }
}

TEST_F(StoreServerTest, GetAndWaitTimeOutNamingTheKeysOrAreWokenBySets) {
  {  // GetTimesOutNamingTheKey
    auto store = client();
    try {
      store->get("never-set", 200ms);
      FAIL() << "get of a missing key returned";
    } catch (const TimeoutError& e) {
      EXPECT_TRUE(contains(e.what(), "never-set")) << e.what();
      EXPECT_TRUE(contains(e.what(), store->describe())) << e.what();
    }
    store->setString("present", "1");
    try {
      store->wait({"present", "absent-a", "absent-b"}, 200ms);
      FAIL() << "wait returned with keys missing";
    } catch (const TimeoutError& e) {
      const std::string missing = std::string(e.what()).substr(std::string(e.what()).find("missing keys:"));
      EXPECT_TRUE(contains(missing, "absent-a") && contains(missing, "absent-b")) << e.what();
      EXPECT_FALSE(contains(missing, "present")) << e.what();
    }
    EXPECT_EQ(store->getString("present", 1s), "1");  // the connection survived the timeouts
  }
  {  // BlockingGetIsWokenByAnotherClientsSet
    auto waiter = client();
    auto setter = client();
    auto result = std::async(std::launch::async, [&] { return waiter->getString("late", 20s); });
    std::this_thread::sleep_for(100ms);
    setter->setString("late", "arrived");
    ASSERT_EQ(result.wait_for(10s), std::future_status::ready) << "get was not woken by the set";
    EXPECT_EQ(result.get(), "arrived");
  }
}

TEST_F(StoreServerTest, ClientsInManyThreadsAddAtomically) {
  constexpr int kThreads = 6, kAdds = 40;
  auto shared = client();  // one client shared by threads (calls serialize)
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto own = client();
      for (int i = 0; i < kAdds; ++i) {
        own->add("counter", 1);
        shared->add("counter", 1);
      }
      own->setString("done/" + std::to_string(t), "1");
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(shared->add("counter", 0), 2 * kThreads * kAdds);
  std::vector<std::string> done;
  for (int t = 0; t < kThreads; ++t) done.push_back("done/" + std::to_string(t));
  EXPECT_TRUE(client()->check(done));
}

TEST_F(StoreServerTest, WrongSecretIsRefusedAndTheServerKeepsServing) {
  try {
    makeStoreClient(clientOptions(server_.port(), "wrong secret"));
    FAIL() << "a client with the wrong secret connected";
  } catch (const AuthError& e) {
    EXPECT_TRUE(contains(e.what(), "join secret")) << e.what();
  }
  const auto stats = waitForStats(server_, [](const StoreServerStats& s) { return s.authFailures >= 1; });
  EXPECT_EQ(stats.authFailures, 1u);
  const auto rejections = server_.recentRejections();
  ASSERT_FALSE(rejections.empty());
  EXPECT_TRUE(contains(rejections.back(), "join secret")) << rejections.back();
  EXPECT_THROW(makeStoreClient(clientOptions(server_.port(), "")), AuthError);
  expectServing();
}

// Raw bytes at the server's port, as an attacker or a confused tool would send.
net::Socket rawConnection(uint16_t port) { return net::connectTo("127.0.0.1", port, net::Deadline::after(5s)); }

void sendRaw(net::Socket& socket, const Bytes& bytes) {
  socket.sendAll(bytes.data(), bytes.size(), net::Deadline::after(5s));
}

// Reads until the server closes the connection (proves it dropped us).
bool serverCloses(net::Socket& socket) {
  uint8_t buffer[256];
  try {
    for (;;) socket.recvAll(buffer, 1, net::Deadline::after(10s));
  } catch (const CommError&) {
    return true;
  } catch (const TimeoutError&) {
    return false;
  }
}

TEST_F(StoreServerTest, GarbageBeforeTheHandshakeIsRejected) {
  std::mt19937 random(1234);
  for (int round = 0; round < 5; ++round) {
    auto socket = rawConnection(server_.port());
    // At least a hello's worth, so the server judges it at once.
    Bytes junk(37 + random() % 200);
    for (auto& byte : junk) byte = static_cast<uint8_t>(random());
    junk[0] = 'X';  // never the magic by chance
    sendRaw(socket, junk);
    EXPECT_TRUE(serverCloses(socket)) << "server kept a garbage connection open";
  }
  {
    auto socket = rawConnection(server_.port());
    sendRaw(socket, toBytes("TSRA"));  // a truncated hello, then hang up
  }
  const auto stats = waitForStats(server_, [](const StoreServerStats& s) { return s.authFailures >= 6; });
  EXPECT_EQ(stats.authFailures, 6u);
  EXPECT_TRUE(contains(server_.recentRejections().front(), "bad magic")) << server_.recentRejections().front();
  expectServing();
}

// A connection that passed the handshake, for garbage after it.
net::Socket authenticatedConnection(uint16_t port) {
  auto socket = rawConnection(port);
  net::authenticateClient(socket, kSecret, net::Deadline::after(5s));
  return socket;
}

TEST_F(StoreServerTest, GarbageAfterTheHandshakeDropsOnlyThatConnection) {
  auto bystander = client();
  bystander->setString("before", "1");
  {
    // A 4 GB announced length: refused before any allocation.
    auto socket = authenticatedConnection(server_.port());
    sendRaw(socket, {0xff, 0xff, 0xff, 0xff});
    EXPECT_TRUE(serverCloses(socket));
  }
  {
    // A valid length with random content.
    std::mt19937 random(99);
    auto socket = authenticatedConnection(server_.port());
    Bytes payload(64);
    for (auto& byte : payload) byte = static_cast<uint8_t>(random());
    payload[0] = 0xee;  // an unknown op
    net::sendFrame(socket, payload, net::Deadline::after(5s));
    EXPECT_TRUE(serverCloses(socket));
  }
  {
    // A well-formed frame whose request lies about its key length.
    auto socket = authenticatedConnection(server_.port());
    Bytes request = store_protocol::encode({store_protocol::Op::kSet, {"key"}, {toBytes("v")}, 0});
    request[5] = 0xff;  // key length low byte: now far past the frame's end
    net::sendFrame(socket, request, net::Deadline::after(5s));
    EXPECT_TRUE(serverCloses(socket));
  }
  {
    // A truncated frame: 100 bytes announced, 10 sent, then the client hangs up.
    auto socket = authenticatedConnection(server_.port());
    Bytes partial = {100, 0, 0, 0};
    partial.resize(14, 0x01);
    sendRaw(socket, partial);
  }
  const auto stats = waitForStats(server_, [](const StoreServerStats& s) { return s.protocolErrors >= 3; });
  EXPECT_EQ(stats.protocolErrors, 3u);
  EXPECT_EQ(stats.authFailures, 0u);
  // The bystander's connection was never disturbed.
  EXPECT_EQ(bystander->getString("before", 1s), "1");
  expectServing();
}

TEST(StoreServerLifetime, ClientWaitingOnADestroyedServerFailsPromptly) {
  auto server = std::make_unique<StoreServer>(serverOptions());
  auto store = makeStoreClient(clientOptions(server->port()));
  auto waiting = std::async(std::launch::async, [&]() -> std::string {
    try {
      store->get("never-set", 60s);
    } catch (const StoreError& e) {
      return std::string("StoreError: ") + e.what();
    } catch (const TimeoutError& e) {
      return std::string("TimeoutError: ") + e.what();
    }
    return "returned";
  });
  std::this_thread::sleep_for(200ms);
  server.reset();
  // The 60 s get must end long before its timeout (hang guard, not a timing assertion).
  ASSERT_EQ(waiting.wait_for(15s), std::future_status::ready) << "client kept waiting on a dead server";
  const std::string outcome = waiting.get();
  EXPECT_TRUE(contains(outcome, "Error")) << outcome;
  EXPECT_TRUE(contains(outcome, "127.0.0.1")) << outcome;
}

TEST(StoreServerLifetime, DeadOrUnreachableServerIsAStoreErrorAndARestartedOneIsReconnected) {
  {  // DeadServerIsAStoreErrorAndARestartedOneIsReconnected
    auto server = std::make_unique<StoreServer>(serverOptions());
    const uint16_t port = server->port();
    auto options = clientOptions(port);
    options.requestTimeout = 500ms;
    auto store = makeStoreClient(options);
    store->setString("a", "1");
    server.reset();
    try {
      store->setString("b", "2");
      FAIL() << "set on a dead server returned";
    } catch (const StoreError& e) {
      EXPECT_TRUE(contains(e.what(), "127.0.0.1:" + std::to_string(port))) << e.what();
    }
    server = std::make_unique<StoreServer>(serverOptions(port));
    store->setString("c", "3");  // reconnects on its own
    EXPECT_EQ(store->getString("c", 1s), "3");
    EXPECT_FALSE(store->check({"a"}));  // a new server starts empty
  }
  {  // UnreachableServerIsAStoreErrorNamingTheAddress
    uint16_t port;
    {
      net::Listener probe("127.0.0.1", 0);
      port = probe.port();
    }
    auto options = clientOptions(port);
    options.timeout = 300ms;
    try {
      makeStoreClient(options);
      FAIL() << "connected to nothing";
    } catch (const StoreError& e) {
      EXPECT_TRUE(contains(e.what(), "127.0.0.1:" + std::to_string(port))) << e.what();
    }
  }
}

TEST(StoreServerLifetime, ServerThatStopsAnsweringIsAStoreErrorWithinTheRequestTimeout) {
  // A server that completes the handshake and then goes silent, as a store
  // behind a link that went down looks to its client.
  net::Listener listener("127.0.0.1", 0);
  std::promise<void> release;
  std::thread blackHole([&] {
    net::Socket socket = listener.accept(net::Deadline::after(10s));
    net::authenticateServer(socket, kSecret, net::Deadline::after(10s));
    release.get_future().wait_for(20s);
  });
  auto options = clientOptions(listener.port());
  options.requestTimeout = 300ms;
  auto store = makeStoreClient(options);
  auto outcome = std::async(std::launch::async, [&]() -> std::string {
    try {
      store->add("counter", 1);
    } catch (const StoreError& e) {
      return e.what();
    }
    return "returned";
  });
  // Hang guard only: the call must end on its own 300 ms request timeout.
  const bool ended = outcome.wait_for(15s) == std::future_status::ready;
  release.set_value();
  blackHole.join();
  ASSERT_TRUE(ended) << "the client hung on a silent server";
  const std::string message = outcome.get();
  EXPECT_TRUE(contains(message, "did not answer") && contains(message, "127.0.0.1")) << message;
}

TEST(StoreServerLifetime, IdleConnectionsAreReconnectedAndExcessOnesRefused) {
  {  // IdleConnectionsAreClosedAndClientsReconnectTransparently
    auto options = serverOptions();
    options.idleTimeout = 100ms;
    StoreServer server(options);
    auto store = makeStoreClient(clientOptions(server.port()));
    store->setString("k", "v");
    std::this_thread::sleep_for(400ms);  // the server drops the idle connection
    EXPECT_EQ(store->getString("k", 1s), "v");
    EXPECT_GE(server.stats().connections, 2u);
  }
  {  // ConnectionsOverTheLimitAreRefused
    auto options = serverOptions();
    options.maxConnections = 1;
    StoreServer server(options);
    auto first = makeStoreClient(clientOptions(server.port()));
    first->setString("k", "v");
    auto overflow = clientOptions(server.port());
    overflow.timeout = 1s;
    EXPECT_THROW(makeStoreClient(overflow), StoreError);
    EXPECT_GE(server.stats().overloaded, 1u);
    EXPECT_EQ(first->getString("k", 1s), "v");
  }
}

// --- The parser under random input --------------------------------------------

store_protocol::Request randomRequest(std::mt19937& random) {
  using store_protocol::Op;
  store_protocol::Request request;
  request.op = static_cast<Op>(1 + random() % 8);
  auto randomBlob = [&](size_t maxLength) {
    std::string blob(random() % (maxLength + 1), '\0');
    for (auto& c : blob) c = static_cast<char>(random());
    return blob;
  };
  size_t keys = 1, values = 0;
  switch (request.op) {
    case Op::kSet: values = 1; break;
    case Op::kCompareSet: values = 2; break;
    case Op::kWait:
    case Op::kCheck: keys = random() % 5; break;
    case Op::kPing: keys = 0; break;
    default: break;
  }
  for (size_t i = 0; i < keys; ++i) request.keys.push_back(randomBlob(24));
  for (size_t i = 0; i < values; ++i) {
    const std::string value = randomBlob(40);
    request.values.emplace_back(value.begin(), value.end());
  }
  request.integer = static_cast<int64_t>((uint64_t{random()} << 32) | random());
  if (request.op == Op::kGet || request.op == Op::kWait) request.integer &= INT64_MAX;
  return request;
}

TEST(StoreProtocol, EncodeParseRoundTripsAndMalformedRequestsAreRejected) {
  {  // EncodeParseRoundTripsRandomValidRequests
    std::mt19937 random(20261130);
    for (int i = 0; i < 20000; ++i) {
      const auto request = randomRequest(random);
      const Bytes wire = store_protocol::encode(request);
      const auto parsed = store_protocol::parse(wire.data(), wire.size());
      ASSERT_EQ(static_cast<int>(parsed.op), static_cast<int>(request.op)) << "request " << i;
      ASSERT_EQ(parsed.keys, request.keys) << "request " << i;
      ASSERT_EQ(parsed.values, request.values) << "request " << i;
      ASSERT_EQ(parsed.integer, request.integer) << "request " << i;
    }
  }
  {  // ParserRejectsEachKindOfMalformedRequest
    using store_protocol::Op;
    const Bytes valid = store_protocol::encode({Op::kSet, {"key"}, {toBytes("value")}, 0});
    auto expectRejected = [](Bytes input, const std::string& why) {
      try {
        store_protocol::parse(input.data(), input.size());
        ADD_FAILURE() << "accepted: " << why;
      } catch (const ProtocolError& e) {
        SUCCEED() << e.what();
      }
    };
    expectRejected({}, "empty");
    expectRejected({0}, "op 0");
    expectRejected({9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, "op 9");
    Bytes trailing = valid;
    trailing.push_back(0);
    expectRejected(trailing, "trailing byte");
    expectRejected(Bytes(valid.begin(), valid.end() - 1), "missing byte");
    Bytes manyKeys = valid;
    manyKeys[1] = 0xff, manyKeys[2] = 0xff, manyKeys[3] = 0xff, manyKeys[4] = 0xff;
    expectRejected(manyKeys, "4 G keys");
    const Bytes wrongArity = store_protocol::encode({Op::kSet, {"a", "b"}, {toBytes("v")}, 0});
    expectRejected(wrongArity, "set with two keys");
    const Bytes negativeTimeout = store_protocol::encode({Op::kGet, {"a"}, {}, -1});
    expectRejected(negativeTimeout, "negative timeout");
    EXPECT_THROW(store_protocol::encode({Op::kSet, {std::string(store_protocol::kMaxKeyBytes + 1, 'k')}, {{}}, 0}),
                 InvalidArgument);
  }
}

TEST(StoreProtocol, ParserEitherParsesOrThrowsProtocolErrorOnRandomInput) {
  std::mt19937 random(7);
  int parsed = 0, rejected = 0;
  auto tryParse = [&](const Bytes& input) {
    // Copy into an exactly-sized heap buffer so an out-of-bounds read would
    // be caught by ASan builds.
    std::unique_ptr<uint8_t[]> exact(new uint8_t[input.size() + 1]);
    std::copy(input.begin(), input.end(), exact.get());
    try {
      store_protocol::parse(exact.get(), input.size());
      ++parsed;
    } catch (const ProtocolError&) {
      ++rejected;
    }
  };
  constexpr int kInputs = 120000;
  for (int i = 0; i < kInputs; ++i) {
    Bytes input;
    if (i % 2 == 0) {
      // Pure noise, biased towards valid ops so the parser gets past the first byte.
      input.resize(random() % 64);
      for (auto& byte : input) byte = static_cast<uint8_t>(random());
      if (!input.empty() && random() % 2 == 0) input[0] = static_cast<uint8_t>(1 + random() % 8);
    } else {
      // A valid request, mutated: flipped bytes, a truncation, an extension,
      // or a length/count field overwritten with an extreme value.
      input = store_protocol::encode(randomRequest(random));
      switch (random() % 4) {
        case 0:
          for (int flips = 1 + random() % 3; flips > 0; --flips) input[random() % input.size()] ^= 1u << (random() % 8);
          break;
        case 1: input.resize(random() % input.size()); break;
        case 2:
          for (int extra = 1 + random() % 8; extra > 0; --extra) input.push_back(static_cast<uint8_t>(random()));
          break;
        default: {
          const size_t at = random() % input.size();
          const uint8_t extreme[] = {0xff, 0xff, 0xff, 0x7f};
          for (size_t b = 0; b < 4 && at + b < input.size(); ++b) input[at + b] = extreme[b];
        }
      }
    }
    tryParse(input);
  }
  EXPECT_EQ(parsed + rejected, kInputs);
  // Both outcomes were exercised (otherwise the generator is broken).
  EXPECT_GT(parsed, 1000);
  EXPECT_GT(rejected, 1000);
}

// --- Gloo over the store ---------------------------------------------------------

void allReduceOverStore(uint16_t port, int size) {
  std::vector<std::thread> ranks;
  std::vector<std::string> errors(size);
  std::vector<at::Tensor> results(size);
  for (int rank = 0; rank < size; ++rank) {
    ranks.emplace_back([&, rank] {
      try {
        GlooOptions options;
        options.name = "store-test";
        options.hostname = "127.0.0.1";
        options.timeout = 20s;
        auto comm = makeGlooCommunicator(makeStoreClient(clientOptions(port)), "gloo" + std::to_string(size), rank,
                                         size, options);
        at::Tensor tensor = at::arange(5, at::kFloat) * (rank + 1);
        comm->allReduce(tensor);
        results[rank] = tensor;
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& thread : ranks) thread.join();
  // Sum over ranks of arange(5) * (r + 1) = arange(5) * size (size + 1) / 2.
  const at::Tensor expected = at::arange(5, at::kFloat) * (size * (size + 1) / 2);
  for (int rank = 0; rank < size; ++rank) {
    ASSERT_EQ(errors[rank], "") << "rank " << rank;
    EXPECT_TRUE(at::equal(results[rank], expected)) << "rank " << rank << ": " << results[rank];
  }
}

TEST(StoreServerGloo, TwoAndThreeRanksAllReduceThroughTheStore) {
  StoreServer server(serverOptions());
  allReduceOverStore(server.port(), 2);
  allReduceOverStore(server.port(), 3);
}

// --- The tessera-store binary -----------------------------------------------------

#ifdef TESSERA_STORE_PATH
// Reads the child's first stdout line (bounded), "" on timeout or EOF.
std::string readLine(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string line;
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd entry{fd, POLLIN, 0};
    if (::poll(&entry, 1, 100) <= 0) continue;
    char c;
    if (::read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

TEST(TesseraStoreBinary, ServesWithTheSecretFromItsFileAndStopsOnSigterm) {
  const std::string tokenFile = ::testing::TempDir() + "/tessera_store_test_token";
  std::ofstream(tokenFile) << kSecret << "\n";
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::close(out[0]);
    ::execl(TESSERA_STORE_PATH, "tessera-store", "--port", "0", "--host", "127.0.0.1", "--join-token-file",
            tokenFile.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  const std::string line = readLine(out[0], 30s);
  const std::string prefix = "tessera-store: listening on 127.0.0.1:";
  if (line.rfind(prefix, 0) != 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    FAIL() << "unexpected first line: '" << line << "'";
  }
  const auto port = static_cast<uint16_t>(std::stoi(line.substr(prefix.size())));
  {
    auto store = makeStoreClient(clientOptions(port));
    store->setString("k", "v");
    EXPECT_EQ(makeStoreClient(clientOptions(port))->getString("k", 1s), "v");
    EXPECT_THROW(makeStoreClient(clientOptions(port, "not the secret")), AuthError);
  }
  ::kill(child, SIGTERM);
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(out[0]);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}
#endif

}  // namespace
}  // namespace tessera::comm
