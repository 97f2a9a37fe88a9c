// The transport of the etcd store (include/tessera/comm/etcd_store.h): JSON
// requests to etcd v3's HTTP/JSON gateway over libcurl, with failover between
// the cluster's endpoints, a deadline on every exchange, and etcd's own
// token authentication. Private to comm/store (and the tests' etcd fixture).
//
// Failover rule. A request goes to the current endpoint with a per-exchange
// deadline (requestTimeout, capped by the call's deadline). When that endpoint
// cannot be reached, does not answer in time, or answers that it cannot serve
// now (gRPC Unavailable: no leader, request timed out, leader changed, server
// stopped), the request moves to the next endpoint, round the list, pausing
// briefly after each full round, until the call's deadline. Then StoreError
// names every endpoint with its last error and says whether the cluster lost
// quorum (a majority unreachable or without a leader). Any other answer from
// etcd (bad request, lease not found, permission denied) is final: EtcdError.
//
// Retried requests may be applied twice when the first one's answer was lost
// (etcd applied it, then the link or the member died). Callers send only
// requests for which that is harmless (put, range, txn guarded by a compare,
// lease keepalive/revoke), or resolve it themselves (EtcdStore::add).
//
// Thread-safety: every method may be called from any thread. A pool of curl
// easy handles (one per concurrent call) keeps connections open between calls.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/core/error.h"

namespace tessera::comm::etcd {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// etcd answered with an error that retrying elsewhere does not change. code is
// the gRPC status code (5 NotFound, 3 InvalidArgument, 7 PermissionDenied...).
class EtcdError : public StoreError {
 public:
  EtcdError(int code, std::string etcdMessage, const std::string& message)
      : StoreError(message), code_(code), etcdMessage_(std::move(etcdMessage)) {}
  int code() const { return code_; }
  const std::string& etcdMessage() const { return etcdMessage_; }

 private:
  int code_;
  std::string etcdMessage_;
};

struct HttpOptions {
  std::vector<std::string> endpoints;  // "host:port" (http://); at least one
  std::string user;                    // "" : no authentication
  std::string password;
  std::chrono::milliseconds requestTimeout{std::chrono::seconds(10)};
};

class HttpClient {
 public:
  explicit HttpClient(HttpOptions options);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // POSTs body to `path` ("/v3/kv/range") and returns etcd's JSON answer,
  // failing over as the header says until `deadline`. Throws StoreError at the
  // deadline, EtcdError for a final error answer, AuthError when etcd refuses
  // the user/password. *resent (when given) tells whether an earlier copy of
  // the request may have reached etcd and been applied (its answer was lost,
  // or etcd said "request timed out") before the answer returned.
  Json call(const std::string& path, const Json& body, Clock::time_point deadline, bool* resent = nullptr);

  // A streaming request (/v3/watch): every JSON message of the answer (its
  // "result") goes to onMessage until it returns false (stream returns true
  // then), or until `until` (returns false: nothing more in time, or no
  // endpoint could serve the stream until then; the caller's next call() says
  // why). The stream must send its first message (watch "created") within
  // requestTimeout or it fails over like call(); a stream that breaks later
  // throws StreamBroken, so the caller re-reads what it may have missed before
  // watching again. EtcdError / AuthError as call().
  bool stream(const std::string& path, const Json& body, Clock::time_point until,
              const std::function<bool(const Json&)>& onMessage);

  // "etcd://h1:p1,h2:p2".
  const std::string& describe() const { return description_; }
  const std::vector<std::string>& endpoints() const { return options_.endpoints; }

  // One GET or POST to one endpoint, no failover and no auth: what the tests'
  // cluster fixture uses (/health, /v3/maintenance/status). Returns the HTTP
  // status (0 when the endpoint could not be reached) and fills body.
  static long exchangeOnce(const std::string& endpoint, const std::string& path, const std::string* postBody,
                           std::chrono::milliseconds timeout, std::string* body);

  class StreamBroken : public StoreError {
   public:
    using StoreError::StoreError;
  };

  struct Attempt;  // one exchange's outcome (internal)

 private:
  struct Handle;
  Handle* takeHandle();
  void returnHandle(Handle* handle);
  std::string token();
  void invalidateToken(const std::string& stale);
  std::string authenticate(Clock::time_point deadline);
  // Runs attempt(endpointIndex, token) round the endpoints until it returns
  // true or the deadline passes; the failover loop shared by call and stream.
  void failover(const std::string& path, Clock::time_point deadline, bool withAuth,
                const std::function<bool(size_t, const std::string&, Attempt&)>& attempt);

  HttpOptions options_;
  std::string description_;
  std::atomic<size_t> current_{0};
  std::mutex poolMutex_;
  std::vector<Handle*> pool_;
  std::mutex tokenMutex_;
  std::string token_;
};

// base64 of the bytes (etcd's JSON encodes keys and values so).
std::string base64Encode(const std::string& bytes);
std::string base64Decode(const std::string& text);
// etcd's JSON writes int64 fields as strings and omits zeros: "5", 5 or absent.
int64_t jsonInt(const Json& object, const char* field);

}  // namespace tessera::comm::etcd
