// tessera's own TCP store: the rendezvous service of elastic jobs.
//
// Why not c10d's TCPStore (store.h's TcpStore, used by fixed-size jobs):
// an elastic job's store must outlive every trainer (tessera-store runs it
// standalone), refuse processes that do not know the join secret, survive
// garbage on its port, and never let a client block forever on a link that
// went down (a partitioned node must notice and wait, not hang in the kernel).
// This server and client are small enough to own all of that.
//
// Protocol (over comm/net.h frames, after the join handshake): each request
// is one frame
//     u8 op | u32 key count | per key: u32 length + bytes |
//     u32 value count | per value: u32 length + bytes | i64 integer
// and each response one frame: u8 status (0 ok, 1 timeout, 2 bad request)
// then op-specific values. ops: set, get (waits), wait, add, compareSet,
// deleteKey, check, ping. Limits (keys per request, key and value length)
// are checked while parsing, before allocating.
//
// Thread-safety: the server runs one thread per connection (bounded by
// maxConnections) plus an accept thread; blocking gets/waits sleep on a
// condition variable server-side, bounded by the timeout the request carries.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/store.h"

namespace tessera::comm {

struct StoreServerOptions {
  std::string host = "0.0.0.0";  // address to bind
  uint16_t port = 0;             // 0: an ephemeral port (see StoreServer::port())
  std::string secret;            // join secret (net.h); "" accepts any client that speaks the protocol
  size_t maxConnections = 1024;  // further connections are closed at once (and counted)
  // A connection that sends nothing for this long is closed (clients keep
  // one connection open and re-connect transparently).
  std::chrono::milliseconds idleTimeout = std::chrono::minutes(10);
};

// What the server has seen; readable at any time.
struct StoreServerStats {
  uint64_t connections = 0;       // accepted (authenticated or not)
  uint64_t authFailures = 0;      // refused by the handshake
  uint64_t protocolErrors = 0;    // dropped for a malformed request
  uint64_t requests = 0;          // served
  uint64_t overloaded = 0;        // closed at once: maxConnections reached
};

class StoreServer {
 public:
  // Binds and starts serving. Throws CommError naming host:port when it
  // cannot bind.
  explicit StoreServer(StoreServerOptions options);
  // Stops: closes the listener and every connection, joins all threads.
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  uint16_t port() const;
  StoreServerStats stats() const;
  // Every refusal or protocol error is logged (TESSERA_LOG(kWarning)) with the
  // peer and the reason; the last few are kept here for tests and tools.
  std::vector<std::string> recentRejections() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct StoreClientOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  std::string secret;
  // How long the constructor (and a reconnect) keeps retrying to reach the
  // server, and the timeout of calls that pass none (Store::kDefaultTimeout
  // is not used by this client).
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // Bound on a single non-blocking request's round trip (set, add, check...):
  // a link that went down surfaces as a StoreError within this time.
  std::chrono::milliseconds requestTimeout = std::chrono::seconds(10);
};

// A Store (store.h) talking to a StoreServer. The constructor connects and
// authenticates: throws StoreError naming host:port when the server cannot be
// reached within options.timeout, AuthError when it refuses the secret.
// After a broken connection the next call reconnects once (within
// requestTimeout) before throwing StoreError. Thread-safe (calls are
// serialized over one connection; blocking waits hold it, so use one client
// per thread that waits).
StorePtr makeStoreClient(const StoreClientOptions& options);

// The request parser, exposed for the randomized and libFuzzer tests.
namespace store_protocol {

enum class Op : uint8_t { kSet = 1, kGet, kWait, kAdd, kCompareSet, kDelete, kCheck, kPing };

constexpr size_t kMaxKeys = 4096;
constexpr size_t kMaxKeyBytes = 4096;
constexpr size_t kMaxValueBytes = 64u << 20;
constexpr size_t kMaxFrameBytes = kMaxValueBytes + (1u << 20);

struct Request {
  Op op = Op::kPing;
  std::vector<std::string> keys;
  std::vector<Bytes> values;
  int64_t integer = 0;  // add: delta; get/wait: timeout in ms
};

// "set", "get", ... for messages.
const char* toString(Op op);

Bytes encode(const Request& request);
// Throws ProtocolError describing the first problem (unknown op, a count or
// length over its limit, trailing or missing bytes). Never reads outside
// [data, data + size).
Request parse(const uint8_t* data, size_t size);

}  // namespace store_protocol

}  // namespace tessera::comm
