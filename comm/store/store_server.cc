// StoreServer (store_server.h): an accept thread plus one thread per
// connection, all sharing one map under a mutex.
//
// Robustness is the point of this server, so the rules are simple: nothing a
// peer sends can throw out of a connection thread (that would terminate the
// process); a peer that fails the handshake or sends a malformed frame is
// logged, counted and dropped, and only its own connection is affected.
// Blocking gets and waits sleep on a condition variable that the destructor
// also signals, so shutdown never waits for a client's timeout.
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <list>
#include <map>
#include <optional>
#include <thread>

#include "comm/store/store_wire.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm {
namespace {

using store_protocol::Op;
using store_protocol::Request;
using store_protocol::Response;
using store_protocol::Status;

// A peer has this long to complete the join handshake.
constexpr std::chrono::milliseconds kHandshakeTimeout{10000};
// Sending a response to a client that stopped reading gives up after this.
constexpr std::chrono::milliseconds kResponseTimeout{30000};
// The accept loop wakes this often to reap finished connection threads.
constexpr std::chrono::milliseconds kAcceptSlice{500};
constexpr size_t kRecentRejections = 32;

Response badRequest(const std::string& message) {
  Response response;
  response.status = Status::kBadRequest;
  response.values.push_back(toBytes(message));
  return response;
}

// The stored decimal text of an add() counter, if it is one.
std::optional<int64_t> parseInteger(const Bytes& value) {
  int64_t result = 0;
  const char* begin = reinterpret_cast<const char*>(value.data());
  const char* end = begin + value.size();
  const auto [stop, error] = std::from_chars(begin, end, result);
  if (error != std::errc() || stop != end || value.empty()) return std::nullopt;
  return result;
}

}  // namespace

struct StoreServer::Impl {
  struct Connection {
    net::Socket socket;
    std::thread thread;
    std::atomic<bool> done{false};
  };

  explicit Impl(StoreServerOptions opts) : options(std::move(opts)), listener(options.host, options.port) {}

  void acceptLoop();
  void serve(Connection& connection);
  void serveRequests(net::Socket& socket);
  // nullopt: the server is stopping; drop the connection without answering.
  std::optional<Response> handle(const Request& request);
  std::optional<Response> waitFor(const std::vector<std::string>& keys, int64_t timeoutMs, bool returnValue);
  void reject(const std::string& reason);
  void reapFinished();

  StoreServerOptions options;
  net::Listener listener;
  std::atomic<bool> stopping{false};

  std::mutex dataMutex;
  std::condition_variable changed;
  std::map<std::string, Bytes> data;

  std::atomic<uint64_t> connections{0}, authFailures{0}, protocolErrors{0}, requests{0}, overloaded{0};
  mutable std::mutex rejectionsMutex;
  std::deque<std::string> rejections;

  // Only the accept thread adds and reaps; the destructor walks it after
  // joining the accept thread.
  std::list<std::unique_ptr<Connection>> live;
  std::thread acceptThread;
};

void StoreServer::Impl::reject(const std::string& reason) {
  TESSERA_LOG(kWarn) << "tessera store on port " << listener.port() << ": " << reason;
  std::lock_guard<std::mutex> lock(rejectionsMutex);
  rejections.push_back(reason);
  if (rejections.size() > kRecentRejections) rejections.pop_front();
}

void StoreServer::Impl::reapFinished() {
  for (auto it = live.begin(); it != live.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = live.erase(it);  // closes the socket
    } else {
      ++it;
    }
  }
}

void StoreServer::Impl::acceptLoop() {
  while (!stopping.load()) {
    net::Socket socket;
    try {
      socket = listener.accept(net::Deadline::after(kAcceptSlice));
    } catch (const TimeoutError&) {
      reapFinished();
      continue;
    } catch (const std::exception& e) {
      if (stopping.load()) break;
      // E.g. out of file descriptors: say so and keep serving the others.
      TESSERA_LOG(kWarn) << "tessera store on port " << listener.port() << ": " << e.what();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    ++connections;
    reapFinished();
    if (live.size() >= options.maxConnections) {
      reject("refused " + socket.peer() + ": already serving " + std::to_string(live.size()) +
             " connections (maxConnections)");
      ++overloaded;
      continue;  // the socket closes here
    }
    auto connection = std::make_unique<Connection>();
    connection->socket = std::move(socket);
    Connection* raw = connection.get();
    try {
      raw->thread = std::thread([this, raw] {
        serve(*raw);
        raw->done.store(true);
      });
    } catch (const std::system_error& e) {
      reject("refused " + raw->socket.peer() + ": cannot start a thread: " + e.what());
      continue;
    }
    live.push_back(std::move(connection));
  }
}

void StoreServer::Impl::serve(Connection& connection) {
  net::Socket& socket = connection.socket;
  try {
    try {
      net::authenticateServer(socket, options.secret, net::Deadline::after(kHandshakeTimeout));
    } catch (const std::exception& e) {
      if (!stopping.load()) {
        // Recorded before counted: whoever sees the count also sees the reason.
        reject(std::string("refused a connection: ") + e.what());
        ++authFailures;
      }
      socket.shutdown();
      return;
    }
    serveRequests(socket);
  } catch (const std::exception& e) {
    // Nothing a peer sends may take the server down.
    if (!stopping.load()) reject("dropped the connection of " + socket.peer() + ": " + e.what());
  }
  // Shut down rather than close: the destructor may be calling shutdown() on
  // this socket concurrently, and the fd must not be reused under it.
  socket.shutdown();
}

void StoreServer::Impl::serveRequests(net::Socket& socket) {
  while (!stopping.load()) {
    Bytes frame;
    try {
      frame = net::recvFrame(socket, store_protocol::kMaxFrameBytes, net::Deadline::after(options.idleTimeout),
                             "store request");
    } catch (const TimeoutError&) {
      TESSERA_LOG(kDebug) << "tessera store: closing idle connection from " << socket.peer();
      return;
    } catch (const ProtocolError& e) {
      reject(std::string("dropped a connection: ") + e.what());
      ++protocolErrors;
      return;
    } catch (const CommError&) {
      return;  // the client went away
    }
    Request request;
    try {
      request = store_protocol::parse(frame.data(), frame.size());
    } catch (const ProtocolError& e) {
      reject("dropped the connection of " + socket.peer() + ": " + e.what());
      ++protocolErrors;
      return;
    }
    frame = Bytes();  // a large set's frame is not needed past here
    std::optional<Response> response = handle(request);
    if (!response) return;
    ++requests;
    try {
      net::sendFrame(socket, store_protocol::encodeResponse(*response), net::Deadline::after(kResponseTimeout),
                     "store response");
    } catch (const Error&) {
      return;
    }
  }
}

std::optional<Response> StoreServer::Impl::waitFor(const std::vector<std::string>& keys, int64_t timeoutMs,
                                                   bool returnValue) {
  const auto timeout = std::chrono::milliseconds(std::min(timeoutMs, store_protocol::kMaxWaitMs));
  std::unique_lock<std::mutex> lock(dataMutex);
  auto allPresent = [&] {
    for (const auto& key : keys) {
      if (data.count(key) == 0) return false;
    }
    return true;
  };
  changed.wait_for(lock, timeout, [&] { return stopping.load() || allPresent(); });
  if (stopping.load()) return std::nullopt;
  Response response;
  if (!allPresent()) {
    response.status = Status::kTimeout;
    for (const auto& key : keys) {
      if (data.count(key) == 0) response.values.push_back(toBytes(key));
    }
  } else if (returnValue) {
    response.values.push_back(data.at(keys.front()));
  }
  return response;
}

std::optional<Response> StoreServer::Impl::handle(const Request& request) {
  Response response;
  switch (request.op) {
    case Op::kGet:
      return waitFor(request.keys, request.integer, true);
    case Op::kWait:
      return waitFor(request.keys, request.integer, false);
    case Op::kPing:
      return response;
    case Op::kCheck: {
      std::lock_guard<std::mutex> lock(dataMutex);
      response.integer = 1;
      for (const auto& key : request.keys) {
        if (data.count(key) == 0) response.integer = 0;
      }
      return response;
    }
    case Op::kDelete: {
      std::lock_guard<std::mutex> lock(dataMutex);
      response.integer = data.erase(request.keys[0]) > 0 ? 1 : 0;
      return response;
    }
    default:
      break;
  }
  // The writes: update under the lock, then wake every waiter.
  const std::string& key = request.keys[0];
  {
    std::lock_guard<std::mutex> lock(dataMutex);
    auto it = data.find(key);
    if (request.op == Op::kSet) {
      data[key] = request.values[0];
    } else if (request.op == Op::kAdd) {
      int64_t value = request.integer;
      if (it != data.end()) {
        const std::optional<int64_t> current = parseInteger(it->second);
        if (!current) return badRequest("add on key '" + key + "', whose value is not an integer");
        if (__builtin_add_overflow(*current, request.integer, &value)) {
          return badRequest("add on key '" + key + "' overflows int64");
        }
      }
      data[key] = toBytes(std::to_string(value));
      response.integer = value;
    } else {  // compareSet: same rules as every other Store (store.h)
      const Bytes& expected = request.values[0];
      const Bytes& desired = request.values[1];
      if (it == data.end()) {
        if (!expected.empty()) {
          response.values.push_back(expected);
          return response;
        }
        data[key] = desired;
        response.values.push_back(desired);
      } else {
        if (it->second == expected) it->second = desired;
        response.values.push_back(it->second);
      }
    }
  }
  changed.notify_all();
  return response;
}

StoreServer::StoreServer(StoreServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->acceptThread = std::thread([impl = impl_.get()] { impl->acceptLoop(); });
}

StoreServer::~StoreServer() {
  impl_->stopping.store(true);
  impl_->listener.close();
  impl_->acceptThread.join();
  {
    // Taking the lock orders this against a waiter's predicate check, so the
    // notify below cannot be lost.
    std::lock_guard<std::mutex> lock(impl_->dataMutex);
  }
  impl_->changed.notify_all();
  for (auto& connection : impl_->live) connection->socket.shutdown();
  for (auto& connection : impl_->live) connection->thread.join();
}

uint16_t StoreServer::port() const { return impl_->listener.port(); }

StoreServerStats StoreServer::stats() const {
  StoreServerStats stats;
  stats.connections = impl_->connections.load();
  stats.authFailures = impl_->authFailures.load();
  stats.protocolErrors = impl_->protocolErrors.load();
  stats.requests = impl_->requests.load();
  stats.overloaded = impl_->overloaded.load();
  return stats;
}

std::vector<std::string> StoreServer::recentRejections() const {
  std::lock_guard<std::mutex> lock(impl_->rejectionsMutex);
  return std::vector<std::string>(impl_->rejections.begin(), impl_->rejections.end());
}

}  // namespace tessera::comm
