// comm/net: frames, deadlines, connect retries, the join handshake and HMAC.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <future>
#include <thread>

#include "tessera/comm/net.h"
#include "tessera/core/error.h"

namespace tessera::comm::net {
namespace {

using namespace std::chrono_literals;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A connected pair over loopback: (client side, server side).
std::pair<Socket, Socket> connectedPair() {
  Listener listener("127.0.0.1", 0);
  auto server = std::async(std::launch::async, [&] { return listener.accept(Deadline::after(5s)); });
  Socket client = connectTo("127.0.0.1", listener.port(), Deadline::after(5s));
  return {std::move(client), server.get()};
}

Bytes fromHex(const std::string& hex) {
  Bytes out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

void framesRoundTripIncludingEmptyAndLarge() {
  auto sockets = connectedPair();
  Socket& client = sockets.first;
  Socket& server = sockets.second;
  Bytes large(3 << 20);
  for (size_t i = 0; i < large.size(); ++i) large[i] = static_cast<uint8_t>(i * 31 + 7);
  const std::vector<Bytes> frames = {{}, {0, 1, 2, 255}, large};
  // The large frame exceeds the socket buffers: send from another thread.
  std::thread sender([&] {
    for (const auto& frame : frames) sendFrame(client, frame, Deadline::after(10s));
  });
  for (const auto& frame : frames) EXPECT_EQ(recvFrame(server, 8 << 20, Deadline::after(10s)), frame);
  sender.join();
}

void oversizeLengthIsAProtocolErrorNamingThePeer() {
  auto sockets = connectedPair();
  Socket& client = sockets.first;
  Socket& server = sockets.second;
  // Announce 4 GB - 1 and send nothing more: must fail at once, not allocate or wait.
  const uint8_t header[4] = {0xff, 0xff, 0xff, 0xff};
  client.sendAll(header, sizeof(header), Deadline::after(1s));
  try {
    recvFrame(server, 1024, Deadline::after(5s), "test frame");
    FAIL() << "oversize frame accepted";
  } catch (const ProtocolError& e) {
    EXPECT_TRUE(contains(e.what(), "4294967295")) << e.what();
    EXPECT_TRUE(contains(e.what(), server.peer())) << e.what();
  }
}

void receiveDeadlineIsATimeoutErrorNamingOperationAndPeer() {
  auto sockets = connectedPair();
  Socket& server = sockets.second;
  uint8_t byte;
  try {
    server.recvAll(&byte, 1, Deadline::after(100ms), "store request");
    FAIL() << "recv returned without data";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), "store request")) << e.what();
    EXPECT_TRUE(contains(e.what(), server.peer())) << e.what();
  }
}

void closedPeerIsACommError() {
  auto sockets = connectedPair();
  Socket& client = sockets.first;
  Socket& server = sockets.second;
  client.close();
  uint8_t byte;
  EXPECT_THROW(server.recvAll(&byte, 1, Deadline::after(5s)), CommError);
}

void shutdownWakesABlockedReceiver() {
  auto sockets = connectedPair();
  Socket& server = sockets.second;
  auto blocked = std::async(std::launch::async, [&] {
    uint8_t byte;
    try {
      server.recvAll(&byte, 1, Deadline::after(20s));
    } catch (const CommError&) {
      return true;
    }
    return false;
  });
  std::this_thread::sleep_for(50ms);
  server.shutdown();
  ASSERT_EQ(blocked.wait_for(5s), std::future_status::ready) << "shutdown did not wake recvAll";
  EXPECT_TRUE(blocked.get());
}

void listenerCloseWakesABlockedAccept() {
  Listener listener("127.0.0.1", 0);
  auto blocked = std::async(std::launch::async, [&] {
    try {
      listener.accept(Deadline::after(20s));
    } catch (const CommError&) {
      return true;
    }
    return false;
  });
  std::this_thread::sleep_for(50ms);
  listener.close();
  ASSERT_EQ(blocked.wait_for(5s), std::future_status::ready) << "close did not wake accept";
  EXPECT_TRUE(blocked.get());
}

void acceptTimesOut() {
  Listener listener("127.0.0.1", 0);
  EXPECT_THROW(listener.accept(Deadline::after(50ms)), TimeoutError);
}

TEST(Net, ConnectRetriesUntilTheServerAppears) {
  // Reserve a port, free it, and bring a listener up on it a little later.
  uint16_t port;
  {
    Listener probe("127.0.0.1", 0);
    port = probe.port();
  }
  std::thread late([&] {
    std::this_thread::sleep_for(300ms);
    Listener listener("127.0.0.1", port);
    listener.accept(Deadline::after(5s));
  });
  Socket client = connectTo("127.0.0.1", port, Deadline::after(10s));
  EXPECT_TRUE(client.valid());
  late.join();
}

void connectToNothingTimesOutNamingTheAddress() {
  uint16_t port;
  {
    Listener probe("127.0.0.1", 0);
    port = probe.port();
  }
  try {
    connectTo("127.0.0.1", port, Deadline::after(200ms));
    FAIL() << "connected to a closed port";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), "127.0.0.1:" + std::to_string(port))) << e.what();
    EXPECT_TRUE(contains(e.what(), "refused")) << e.what();
  }
}

void unresolvableHostIsInvalidArgument() {
  EXPECT_THROW(connectTo("no-such-host.invalid", 1234, Deadline::after(2s)), InvalidArgument);
}

void parseHostPortAcceptsHostPortOnly() {
  EXPECT_EQ(parseHostPort("10.0.0.1:29500", "endpoint"), std::make_pair(std::string("10.0.0.1"), uint16_t{29500}));
  EXPECT_EQ(parseHostPort("[::1]:80", "endpoint"), std::make_pair(std::string("::1"), uint16_t{80}));
  for (const char* bad : {"host", "host:", ":80", "host:99999", "host:12a", "host:-1"}) {
    try {
      parseHostPort(bad, "--rdzv-endpoint");
      FAIL() << bad << " accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_TRUE(contains(e.what(), "--rdzv-endpoint")) << e.what();
    }
  }
}

void bindingABusyPortIsACommErrorNamingIt() {
  Listener first("127.0.0.1", 0);
  try {
    Listener second("127.0.0.1", first.port());
    FAIL() << "bound a busy port";
  } catch (const CommError& e) {
    EXPECT_TRUE(contains(e.what(), std::to_string(first.port()))) << e.what();
  }
}

// Runs both handshake sides on a fresh pair; returns the errors (empty = ok).
std::pair<std::string, std::string> handshake(const std::string& clientSecret, const std::string& serverSecret) {
  auto sockets = connectedPair();
  Socket& client = sockets.first;
  Socket& server = sockets.second;
  auto serverSide = std::async(std::launch::async, [&]() -> std::string {
    try {
      authenticateServer(server, serverSecret, Deadline::after(5s));
    } catch (const AuthError& e) {
      server.shutdown();
      return std::string("AuthError: ") + e.what();
    } catch (const std::exception& e) {
      server.shutdown();
      return std::string("other: ") + e.what();
    }
    return "";
  });
  std::string clientError;
  try {
    authenticateClient(client, clientSecret, Deadline::after(5s));
  } catch (const AuthError& e) {
    clientError = std::string("AuthError: ") + e.what();
  } catch (const std::exception& e) {
    clientError = std::string("other: ") + e.what();
  }
  return {clientError, serverSide.get()};
}

void handshakeSucceedsWithTheSameSecret() {
  const auto [clientError, serverError] = handshake("s3cret", "s3cret");
  EXPECT_EQ(clientError, "");
  EXPECT_EQ(serverError, "");
}

void handshakeWithEmptySecretsSucceeds() {
  const auto [clientError, serverError] = handshake("", "");
  EXPECT_EQ(clientError, "");
  EXPECT_EQ(serverError, "");
}

void wrongSecretIsAnAuthErrorOnBothSides() {
  const auto [clientError, serverError] = handshake("guess", "s3cret");
  EXPECT_TRUE(contains(clientError, "AuthError")) << clientError;
  EXPECT_TRUE(contains(clientError, "join secret")) << clientError;
  EXPECT_TRUE(contains(serverError, "AuthError")) << serverError;
  EXPECT_TRUE(contains(serverError, "join secret")) << serverError;
  EXPECT_FALSE(contains(clientError, "s3cret") || contains(serverError, "s3cret")) << "a message leaks the secret";
  // An empty secret against a real one is refused too.
  const auto [emptyClient, emptyServer] = handshake("", "s3cret");
  EXPECT_TRUE(contains(emptyClient, "AuthError")) << emptyClient;
  EXPECT_TRUE(contains(emptyServer, "AuthError")) << emptyServer;
}

void garbageInsteadOfAHandshakeIsRejected() {
  const std::vector<std::string> garbage = {
      "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + std::string(40, 'x'),  // a web request
      std::string("TSRA\x07") + std::string(32, 'n'),              // right magic, wrong version
      "TSR",                                                        // truncated, then closed
  };
  for (const auto& bytes : garbage) {
    auto sockets = connectedPair();
    Socket& client = sockets.first;
    Socket& server = sockets.second;
    client.sendAll(bytes.data(), bytes.size(), Deadline::after(1s));
    client.shutdown();
    try {
      authenticateServer(server, "s3cret", Deadline::after(2s));
      FAIL() << "garbage accepted: " << bytes;
    } catch (const AuthError& e) {
      EXPECT_TRUE(contains(e.what(), server.peer())) << e.what();
    } catch (const CommError&) {
      // Truncated: the peer closed mid-hello.
      EXPECT_LT(bytes.size(), 37u);
    }
  }
  // A client that gets garbage from its "server" fails clearly too.
  auto sockets = connectedPair();
  Socket& client = sockets.first;
  Socket& server = sockets.second;
  const std::string reply = "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + std::string(20, ' ');
  server.sendAll(reply.data(), reply.size(), Deadline::after(1s));
  EXPECT_THROW(authenticateClient(client, "s3cret", Deadline::after(2s)), AuthError);
}

void silentPeerTimesOutTheHandshake() {
  auto sockets = connectedPair();
  EXPECT_THROW(authenticateServer(sockets.second, "", Deadline::after(100ms)), TimeoutError);
}

TEST(Net, HmacSha256MatchesRfc4231) {
  // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
  const std::string data = "what do ya want for nothing?";
  EXPECT_EQ(hmacSha256("Jefe", Bytes(data.begin(), data.end())),
            fromHex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"));
  // Test case 1: key = 20 x 0x0b, data "Hi There".
  const std::string hiThere = "Hi There";
  EXPECT_EQ(hmacSha256(std::string(20, '\x0b'), Bytes(hiThere.begin(), hiThere.end())),
            fromHex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"));
}

TEST(Net, JoinSecretComesFromFileThenEnv) {
  const std::string path = ::testing::TempDir() + "/tessera_join_secret";
  {
    std::ofstream(path) << "from-file\n";
  }
  setenv("TESSERA_JOIN_TOKEN_FILE", path.c_str(), 1);
  setenv("TESSERA_JOIN_TOKEN", "from-env", 1);
  EXPECT_EQ(loadJoinSecret(), "from-file");
  unsetenv("TESSERA_JOIN_TOKEN_FILE");
  EXPECT_EQ(loadJoinSecret(), "from-env");
  unsetenv("TESSERA_JOIN_TOKEN");
  EXPECT_EQ(loadJoinSecret(), "");
  {
    std::ofstream(path) << "\n";
  }
  try {
    loadJoinSecretFile(path);
    FAIL() << "empty secret file accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_TRUE(contains(e.what(), path)) << e.what();
  }
  EXPECT_THROW(loadJoinSecretFile(path + ".missing"), InvalidArgument);
}

// Several checks per TEST: each TEST is a process under CTest, and process
// start-up (loading libtorch) costs more than the checks themselves.
TEST(Net, FramesRoundTripAndOversizeLengthsAreRejected) {
  framesRoundTripIncludingEmptyAndLarge();
  oversizeLengthIsAProtocolErrorNamingThePeer();
}

TEST(Net, DeadlinesClosedPeersAndShutdown) {
  receiveDeadlineIsATimeoutErrorNamingOperationAndPeer();
  closedPeerIsACommError();
  shutdownWakesABlockedReceiver();
}

TEST(Net, ListenerAcceptTimesOutAndCloseWakesIt) {
  listenerCloseWakesABlockedAccept();
  acceptTimesOut();
}

TEST(Net, ConnectFailuresAndBadAddressesNameTheAddress) {
  connectToNothingTimesOutNamingTheAddress();
  unresolvableHostIsInvalidArgument();
  parseHostPortAcceptsHostPortOnly();
  bindingABusyPortIsACommErrorNamingIt();
}

TEST(Net, HandshakeAcceptsTheSecretAndRefusesOthers) {
  handshakeSucceedsWithTheSameSecret();
  handshakeWithEmptySecretsSucceeds();
  wrongSecretIsAnAuthErrorOnBothSides();
}

TEST(Net, GarbageOrSilenceInsteadOfAHandshakeIsRejected) {
  garbageInsteadOfAHandshakeIsRejected();
  silentPeerTimesOutTheHandshake();
}

}  // namespace
}  // namespace tessera::comm::net
