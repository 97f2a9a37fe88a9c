// The client of tessera's own store (store_server.h): one authenticated
// connection, every call a request/response round trip under a mutex.
//
// Every round trip has a deadline: requestTimeout for the quick ops, the
// call's own timeout plus requestTimeout for get/wait (the server answers
// "timeout" itself when the keys do not appear). So a dead server or a
// downed link surfaces as a StoreError, never as a thread stuck in recv().
#include <poll.h>

#include "comm/store/store_wire.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

using store_protocol::Op;
using store_protocol::Request;
using store_protocol::Response;
using store_protocol::Status;


// True when the server has closed (or written unexpectedly to) an idle
// connection: it must not be reused.
bool looksClosed(const net::Socket& socket) {
  pollfd entry{socket.fd(), POLLIN, 0};
  return ::poll(&entry, 1, 0) != 0;
}

std::string joinKeys(const std::vector<Bytes>& keys) {
  std::string joined;
  for (const auto& key : keys) joined += (joined.empty() ? "" : ", ") + toString(key);
  return joined;
}

class StoreClient final : public Store {
 public:
  explicit StoreClient(const StoreClientOptions& options)
      : options_(options), address_(options.host + ":" + std::to_string(options.port)) {
    TESSERA_CHECK_ARG(!options.host.empty() && options.port != 0,
                      "tessera store client needs a host and a non-zero port, got '" << address_ << "'");
    std::lock_guard<std::mutex> lock(mutex_);
    connectLocked(options_.timeout);
  }

  void set(const std::string& key, const Bytes& value) override {
    call(Request{Op::kSet, {key}, {value}, 0}, std::chrono::milliseconds(0));
  }

  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override {
    Response response = blockingCall(Request{Op::kGet, {key}, {}, 0}, timeout);
    TESSERA_CHECK_T(StoreError, response.values.size() == 1,
                    "tessera store at " << address_ << " answered a get without a value");
    return std::move(response.values[0]);
  }

  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    blockingCall(Request{Op::kWait, keys, {}, 0}, timeout);
  }

  int64_t add(const std::string& key, int64_t delta) override {
    return call(Request{Op::kAdd, {key}, {}, delta}, std::chrono::milliseconds(0)).integer;
  }

  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override {
    Response response = call(Request{Op::kCompareSet, {key}, {expected, desired}, 0}, std::chrono::milliseconds(0));
    TESSERA_CHECK_T(StoreError, response.values.size() == 1,
                    "tessera store at " << address_ << " answered a compareSet without a value");
    return std::move(response.values[0]);
  }

  bool deleteKey(const std::string& key) override {
    return call(Request{Op::kDelete, {key}, {}, 0}, std::chrono::milliseconds(0)).integer != 0;
  }

  bool check(const std::vector<std::string>& keys) override {
    return call(Request{Op::kCheck, keys, {}, 0}, std::chrono::milliseconds(0)).integer != 0;
  }

  std::string describe() const override { return "tessera://" + address_; }

 private:
  // get/wait: the server waits up to `timeout`; a "timeout" answer becomes a
  // TimeoutError listing the keys still missing.
  Response blockingCall(Request request, std::chrono::milliseconds timeout) {
    const int64_t timeoutMs = std::max<int64_t>(0, std::min<int64_t>(timeout.count(), store_protocol::kMaxWaitMs));
    request.integer = timeoutMs;
    Response response = call(request, std::chrono::milliseconds(timeoutMs));
    if (response.status == Status::kTimeout) {
      throw TimeoutError("store " + std::string(store_protocol::toString(request.op)) + " timed out after " +
                         std::to_string(timeoutMs) + " ms on " + describe() +
                         "; missing keys: " + joinKeys(response.values));
    }
    return response;
  }

  // One round trip. `serverWait` is how long the server may legitimately
  // take before answering (get/wait); the link gets requestTimeout on top.
  Response call(const Request& request, std::chrono::milliseconds serverWait) {
    const Bytes frame = store_protocol::encode(request);
    const char* op = store_protocol::toString(request.op);
    std::lock_guard<std::mutex> lock(mutex_);
    for (int attempt = 0;; ++attempt) {
      bool fresh = false;
      if (!socket_.valid() || looksClosed(socket_)) {
        socket_.close();
        connectLocked(options_.requestTimeout);
        fresh = true;
      }
      bool sent = false;
      try {
        net::sendFrame(socket_, frame, net::Deadline::after(options_.requestTimeout), "store request");
        sent = true;
        const Bytes reply = net::recvFrame(socket_, store_protocol::kMaxFrameBytes,
                                           net::Deadline::after(options_.requestTimeout + serverWait),
                                           "store response");
        Response response = store_protocol::parseResponse(reply.data(), reply.size());
        if (response.status == Status::kBadRequest) {
          throw StoreError("tessera store at " + address_ + " refused a " + op + ": " +
                           (response.values.empty() ? std::string("bad request") : toString(response.values[0])));
        }
        return response;
      } catch (const CommError& e) {
        socket_.close();
        // The server closed a connection we thought was idle and healthy
        // just as we wrote to it: the request never reached it, so one
        // retry on a fresh connection is safe.
        if (!sent && !fresh && attempt == 0) continue;
        throw StoreError("lost the connection to the tessera store at " + address_ + " during a " + op + ": " +
                         e.what() + " (did tessera-store stop?)");
      } catch (const TimeoutError& e) {
        socket_.close();
        throw StoreError("the tessera store at " + address_ + " did not answer a " + op + " within " +
                         std::to_string((options_.requestTimeout + serverWait).count()) +
                         " ms (is the link down or the server overloaded?): " + e.what());
      } catch (const ProtocolError& e) {
        socket_.close();
        throw StoreError("the tessera store at " + address_ + " sent a malformed answer to a " + op + ": " +
                         e.what() + " (is something else listening on that port?)");
      }
    }
  }

  // Connects and authenticates within `timeout` (connect retries included).
  void connectLocked(std::chrono::milliseconds timeout) {
    const net::Deadline deadline = net::Deadline::after(timeout);
    try {
      socket_ = net::connectTo(options_.host, options_.port, deadline);
    } catch (const TimeoutError& e) {
      throw StoreError("cannot reach the tessera store at " + address_ + " within " +
                       std::to_string(timeout.count()) + " ms: " + e.what() +
                       " (is tessera-store running there, and the port reachable?)");
    }
    try {
      net::authenticateClient(socket_, options_.secret, deadline);
    } catch (const AuthError&) {
      socket_.close();
      throw;
    } catch (const Error& e) {
      socket_.close();
      throw StoreError("the tessera store at " + address_ + " did not complete the join handshake: " + e.what());
    }
  }

  const StoreClientOptions options_;
  const std::string address_;
  std::mutex mutex_;
  net::Socket socket_;
};

}  // namespace

StorePtr makeStoreClient(const StoreClientOptions& options) { return std::make_shared<StoreClient>(options); }

}  // namespace tessera::comm
