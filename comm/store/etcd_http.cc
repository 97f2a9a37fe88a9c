// etcd's HTTP/JSON gateway over libcurl, with failover (see etcd_http.h).
#include "comm/store/etcd_http.h"

#include <curl/curl.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>

#include "tessera/core/logging.h"

namespace tessera::comm::etcd {
namespace {

using std::chrono::milliseconds;

milliseconds left(Clock::time_point deadline) {
  return std::max(milliseconds(0), std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
}

void initCurlOnce() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

}  // namespace

std::string base64Encode(const std::string& bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += kAlphabet[(v >> s) & 63];
  }
  if (i < bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= uint8_t(bytes[i + 1]) << 8;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string base64Decode(const std::string& text) {
  std::string out;
  uint32_t v = 0;
  int bits = 0;
  for (char c : text) {
    const char* at = std::find(kAlphabet, kAlphabet + 64, c);
    if (c == '=' || at == kAlphabet + 64) continue;  // padding (and no whitespace in etcd's JSON)
    v = (v << 6) | uint32_t(at - kAlphabet);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((v >> bits) & 0xff);
    }
  }
  return out;
}

int64_t jsonInt(const Json& object, const char* field) {
  auto it = object.find(field);
  if (it == object.end() || it->is_null()) return 0;
  if (it->is_string()) return std::stoll(it->get<std::string>());
  return it->get<int64_t>();
}

struct HttpClient::Handle {
  CURL* curl = nullptr;
};

// The outcome of one exchange with one endpoint, and the last one per
// endpoint for the failure message.
struct HttpClient::Attempt {
  enum Kind { kNone, kOk, kUnreachable, kNoAnswer, kUnavailable, kAuthExpired, kFinal } kind = kNone;
  std::string error;        // for messages
  int code = 0;             // gRPC code of an error answer
  std::string etcdMessage;  // its text
  bool timedOut = false;    // the exchange ran out of time (curl's timeout)
};

namespace {

struct Transfer {
  std::function<bool(const char*, size_t)> write;  // false: stop the transfer
  std::exception_ptr failure;                      // thrown by `write`
  bool stopped = false;
  Clock::time_point firstByteDeadline = Clock::time_point::max();
  bool gotData = false;
};

size_t onWrite(char* data, size_t size, size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  transfer->gotData = true;
  try {
    if (!transfer->write(data, size * count)) {
      transfer->stopped = true;
      return 0;  // curl ends the transfer with CURLE_WRITE_ERROR
    }
  } catch (...) {
    transfer->failure = std::current_exception();
    return 0;
  }
  return size * count;
}

int onProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* transfer = static_cast<Transfer*>(user);
  return !transfer->gotData && Clock::now() > transfer->firstByteDeadline ? 1 : 0;
}

// Classifies an HTTP answer other than 200 (grpc-gateway's error JSON:
// {"error": "...", "code": 14, "message": "..."}; inside a stream:
// {"error": {"grpc_code": 14, "message": "..."}}).
void classifyErrorJson(long status, const Json& error, HttpClient::Attempt* attempt) {
  int code = 2;
  std::string text = "HTTP " + std::to_string(status);
  if (error.is_object()) {
    const Json& inner = error.contains("error") && error["error"].is_object() ? error["error"] : error;
    if (inner.contains("code") && inner["code"].is_number()) code = inner["code"].get<int>();
    if (inner.contains("grpc_code") && inner["grpc_code"].is_number()) code = inner["grpc_code"].get<int>();
    if (inner.contains("message") && inner["message"].is_string()) text = inner["message"].get<std::string>();
    if (inner.contains("error") && inner["error"].is_string()) text = inner["error"].get<std::string>();
  }
  if (status == 404) text += " (is this the client URL of an etcd >= 3.4? older ones serve /v3beta only)";
  attempt->code = code;
  attempt->etcdMessage = text;
  attempt->error = text;
  // 14 Unavailable: no leader, request timed out, leader changed, server
  // stopped; 4 DeadlineExceeded. Another member may serve it (or this one later).
  if (code == 14 || code == 4 || status == 503) {
    attempt->kind = HttpClient::Attempt::kUnavailable;
  } else if (code == 16 || text.find("invalid auth token") != std::string::npos ||
             text.find("user name is empty") != std::string::npos) {
    attempt->kind = HttpClient::Attempt::kAuthExpired;  // 16 Unauthenticated
  } else {
    attempt->kind = HttpClient::Attempt::kFinal;
  }
}

}  // namespace

HttpClient::HttpClient(HttpOptions options) : options_(std::move(options)) {
  TESSERA_CHECK_ARG(!options_.endpoints.empty(), "the etcd store needs at least one endpoint (host:port)");
  initCurlOnce();
  description_ = "etcd://";
  for (size_t i = 0; i < options_.endpoints.size(); ++i) description_ += (i ? "," : "") + options_.endpoints[i];
}

HttpClient::~HttpClient() {
  for (Handle* handle : pool_) {
    curl_easy_cleanup(handle->curl);
    delete handle;
  }
}

HttpClient::Handle* HttpClient::takeHandle() {
  {
    std::lock_guard<std::mutex> lock(poolMutex_);
    if (!pool_.empty()) {
      Handle* handle = pool_.back();
      pool_.pop_back();
      return handle;
    }
  }
  auto* handle = new Handle;
  handle->curl = curl_easy_init();
  if (handle->curl == nullptr) {
    delete handle;
    throw StoreError("libcurl could not create a handle for " + description_ + " (out of memory?)");
  }
  return handle;
}

void HttpClient::returnHandle(Handle* handle) {
  std::lock_guard<std::mutex> lock(poolMutex_);
  pool_.push_back(handle);
}

namespace {

// One POST (or GET when body is null) to one endpoint. Fills `attempt` with
// kOk (status 200), an error answer's class, or the transport failure.
long perform(CURL* curl, const std::string& endpoint, const std::string& path, const std::string* body,
             const std::string& token, milliseconds timeout, Transfer* transfer, HttpClient::Attempt* attempt,
             std::string* errorBody) {
  curl_easy_reset(curl);  // keeps the connection cache
  const std::string url = "http://" + endpoint + path;
  char errorBuffer[CURL_ERROR_SIZE] = {0};
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  headers = curl_slist_append(headers, "Expect:");
  // Watches (and every request) fail at once on a member without a leader
  // instead of hanging there (etcd's "hasleader" gRPC metadata).
  headers = curl_slist_append(headers, "Grpc-Metadata-hasleader: true");
  if (!token.empty()) headers = curl_slist_append(headers, ("Authorization: " + token).c_str());
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  if (body != nullptr) {
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body->data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, long(body->size()));
  }
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);  // threads: no SIGALRM for timeouts
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");   // etcd is reached directly, never through http_proxy
  curl_easy_setopt(curl, CURLOPT_TCP_NODELAY, 1L);
  const long timeoutMs = std::max<long>(1, long(timeout.count()));
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, timeoutMs);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, timeoutMs);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errorBuffer);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, onWrite);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, transfer);
  if (transfer->firstByteDeadline != Clock::time_point::max()) {
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, onProgress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, transfer);
  }
  const CURLcode code = curl_easy_perform(curl);
  curl_slist_free_all(headers);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  if (transfer->failure) std::rethrow_exception(transfer->failure);
  if (code == CURLE_OK || transfer->stopped) {
    if (status == 200) {
      attempt->kind = HttpClient::Attempt::kOk;
    } else {
      Json error = Json::parse(*errorBody, nullptr, false);
      classifyErrorJson(status, error, attempt);
    }
    return status;
  }
  // Whether the request left this process (a reused connection reports no
  // connect time, so count the bytes): if not, etcd cannot have applied it.
  curl_off_t uploaded = 0;
  curl_easy_getinfo(curl, CURLINFO_SIZE_UPLOAD_T, &uploaded);
  attempt->timedOut = code == CURLE_OPERATION_TIMEDOUT;
  const std::string what = errorBuffer[0] ? errorBuffer : curl_easy_strerror(code);
  if (code == CURLE_COULDNT_CONNECT || code == CURLE_COULDNT_RESOLVE_HOST ||
      (code == CURLE_OPERATION_TIMEDOUT && uploaded == 0 && !transfer->gotData)) {
    attempt->kind = HttpClient::Attempt::kUnreachable;
    attempt->error = "unreachable: " + what;
  } else {
    attempt->kind = HttpClient::Attempt::kNoAnswer;
    attempt->error = code == CURLE_OPERATION_TIMEDOUT ? "no answer within " + std::to_string(timeout.count()) + " ms"
                     : code == CURLE_ABORTED_BY_CALLBACK ? std::string("did not start the stream within the request timeout")
                                                         : "connection lost: " + what;
  }
  return status;
}

}  // namespace

long HttpClient::exchangeOnce(const std::string& endpoint, const std::string& path, const std::string* postBody,
                              milliseconds timeout, std::string* body) {
  initCurlOnce();
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return 0;
  body->clear();
  Transfer transfer;
  transfer.write = [&](const char* data, size_t size) {
    body->append(data, size);
    return true;
  };
  Attempt attempt;
  long status = 0;
  try {
    status = perform(curl, endpoint, path, postBody, "", timeout, &transfer, &attempt, body);
  } catch (...) {
    curl_easy_cleanup(curl);
    throw;
  }
  curl_easy_cleanup(curl);
  return attempt.kind == Attempt::kUnreachable || attempt.kind == Attempt::kNoAnswer ? 0 : status;
}

std::string HttpClient::token() {
  if (options_.user.empty()) return "";
  std::lock_guard<std::mutex> lock(tokenMutex_);
  return token_;
}

void HttpClient::invalidateToken(const std::string& stale) {
  std::lock_guard<std::mutex> lock(tokenMutex_);
  if (token_ == stale) token_.clear();
}

std::string HttpClient::authenticate(Clock::time_point deadline) {
  const Json request = {{"name", options_.user}, {"password", options_.password}};
  Json answer;
  try {
    std::string body = request.dump();
    failover("/v3/auth/authenticate", deadline, false, [&](size_t i, const std::string&, Attempt& attempt) {
      std::string text;
      Transfer transfer;
      transfer.write = [&](const char* data, size_t size) {
        text.append(data, size);
        return true;
      };
      Handle* handle = takeHandle();
      try {
        const milliseconds timeout = std::clamp(left(deadline), std::min(options_.requestTimeout, milliseconds(200)),
                                                options_.requestTimeout);
        perform(handle->curl, options_.endpoints[i], "/v3/auth/authenticate", &body, "", timeout, &transfer, &attempt,
                &text);
      } catch (...) {
        returnHandle(handle);
        throw;
      }
      returnHandle(handle);
      if (attempt.kind == Attempt::kOk) answer = Json::parse(text, nullptr, false);
      return attempt.kind == Attempt::kOk;
    });
  } catch (const EtcdError& e) {
    throw AuthError("etcd at " + description_ + " refused user '" + options_.user + "': " + e.etcdMessage() +
                    ". Check the etcd user and its password (TESSERA_ETCD_USER / TESSERA_ETCD_PASSWORD_FILE)");
  }
  if (!answer.is_object() || !answer.contains("token") || !answer["token"].is_string()) {
    throw AuthError("etcd at " + description_ + " accepted user '" + options_.user +
                    "' but returned no token: is authentication enabled on the cluster (etcdctl auth enable)?");
  }
  std::lock_guard<std::mutex> lock(tokenMutex_);
  token_ = answer["token"].get<std::string>();
  return token_;
}

void HttpClient::failover(const std::string& path, Clock::time_point deadline, bool withAuth,
                          const std::function<bool(size_t, const std::string&, Attempt&)>& attempt) {
  const size_t n = options_.endpoints.size();
  std::vector<Attempt> last(n);
  const auto started = Clock::now();
  int authRetries = 0;
  for (int round = 0;; ++round) {
    for (size_t k = 0; k < n; ++k) {
      const size_t i = current_.load() % n;
      std::string tok;
      if (withAuth && !options_.user.empty()) {
        tok = token();
        if (tok.empty()) tok = authenticate(std::max(deadline, Clock::now() + options_.requestTimeout));
      }
      Attempt outcome;
      if (attempt(i, tok, outcome)) return;
      if (outcome.kind == Attempt::kAuthExpired) {
        if (options_.user.empty()) {
          throw AuthError("etcd at " + description_ + " requires authentication (" + outcome.etcdMessage +
                          "): set the etcd user and password (TESSERA_ETCD_USER / TESSERA_ETCD_PASSWORD_FILE)");
        }
        // Tokens expire (etcd's --auth-token-ttl): authenticate again, same endpoint.
        if (++authRetries > 3) throw AuthError("etcd at " + description_ + " keeps refusing the token of user '" +
                                               options_.user + "': " + outcome.etcdMessage);
        invalidateToken(tok);
        --k;
        continue;
      }
      if (outcome.kind == Attempt::kFinal) {
        throw EtcdError(outcome.code, outcome.etcdMessage,
                        "etcd at " + options_.endpoints[i] + " (" + description_ + ") refused " + path + ": " +
                            outcome.etcdMessage);
      }
      last[i] = outcome;
      size_t expected = i;
      current_.compare_exchange_strong(expected, (i + 1) % n);
      if (Clock::now() >= deadline) break;
    }
    if (Clock::now() >= deadline) break;
    // Every endpoint failed this round: pause before the next (a member
    // restarting or an election takes a few hundred ms).
    std::this_thread::sleep_for(std::min(left(deadline), milliseconds(std::min(50 * (round + 1), 500))));
  }
  // The failure message: which endpoints, and whether the cluster lost quorum.
  std::string detail;
  size_t unreachable = 0, leaderless = 0;
  for (size_t i = 0; i < n; ++i) {
    if (last[i].kind == Attempt::kUnreachable) ++unreachable;
    if (last[i].kind == Attempt::kNoAnswer || last[i].kind == Attempt::kUnavailable) ++leaderless;
    detail += (i ? "; " : "") + options_.endpoints[i] + ": " +
              (last[i].kind == Attempt::kNone ? std::string("not tried") : last[i].error);
  }
  const auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - started).count();
  const std::string of = " of " + std::to_string(n) + " endpoints";
  std::string what;
  std::string fix = "bring a majority of the etcd members back within it";
  if (unreachable == n) {
    what = "is unreachable (no quorum: " + std::to_string(n) + of + " unreachable)";
    fix = "check that etcd runs at these addresses (--rdzv-endpoint)";
  } else {
    what = "has no quorum: " + std::to_string(unreachable) + of + " unreachable";
    if (leaderless > 0) what += ", " + std::to_string(leaderless) + " without a leader or not answering";
  }
  throw StoreError("etcd cluster " + description_ + " " + what + " (" + detail + "); " + path + " gave up after " +
                   std::to_string(waited) + " ms, the store's outage bound (the rendezvous timeout): " + fix);
}

Json HttpClient::call(const std::string& path, const Json& body, Clock::time_point deadline, bool* resent) {
  const std::string text = body.dump();
  Json answer;
  bool maybeApplied = false;  // by an earlier copy
  failover(path, deadline, true, [&](size_t i, const std::string& tok, Attempt& attempt) {
    if (resent != nullptr) *resent = maybeApplied;
    std::string received;
    Transfer transfer;
    transfer.write = [&](const char* data, size_t size) {
      received.append(data, size);
      return true;
    };
    const milliseconds timeout =
        std::clamp(left(deadline), std::min(options_.requestTimeout, milliseconds(200)), options_.requestTimeout);
    Handle* handle = takeHandle();
    try {
      perform(handle->curl, options_.endpoints[i], path, &text, tok, timeout, &transfer, &attempt, &received);
    } catch (...) {
      returnHandle(handle);
      throw;
    }
    returnHandle(handle);
    // Connection refused / "no leader": never reached the log. No answer /
    // "request timed out" / "leader changed": it may be applied still.
    if (attempt.kind == Attempt::kNoAnswer ||
        (attempt.kind == Attempt::kUnavailable && attempt.etcdMessage.find("no leader") == std::string::npos)) {
      maybeApplied = true;
    }
    if (attempt.kind != Attempt::kOk) return false;
    answer = Json::parse(received, nullptr, false);
    if (answer.is_discarded()) {
      attempt.kind = Attempt::kNoAnswer;
      attempt.error = "answered something that is not JSON (" + received.substr(0, 80) + ")";
      return false;
    }
    return true;
  });
  return answer;
}

bool HttpClient::stream(const std::string& path, const Json& body, Clock::time_point until,
                        const std::function<bool(const Json&)>& onMessage) {
  const std::string text = body.dump();
  bool stopped = false;
  bool timedOut = false;
  try {
    failover(path, until, true, [&](size_t i, const std::string& tok, Attempt& attempt) {
      std::string buffer;
      bool started = false;
      Attempt streamError;
      Transfer transfer;
      transfer.firstByteDeadline = Clock::now() + options_.requestTimeout;
      // Messages are newline-delimited JSON objects.
      transfer.write = [&](const char* data, size_t size) {
        buffer.append(data, size);
        size_t end;
        while ((end = buffer.find('\n')) != std::string::npos) {
          const std::string line = buffer.substr(0, end);
          buffer.erase(0, end + 1);
          if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
          Json message = Json::parse(line, nullptr, false);
          if (message.is_discarded()) continue;
          if (message.contains("error")) {
            classifyErrorJson(200, message, &streamError);
            return false;
          }
          started = true;
          if (!onMessage(message.contains("result") ? message["result"] : message)) {
            stopped = true;
            return false;
          }
        }
        return true;
      };
      const milliseconds timeout = std::max(left(until), milliseconds(1));
      Handle* handle = takeHandle();
      try {
        perform(handle->curl, options_.endpoints[i], path, &text, tok, timeout, &transfer, &attempt, &buffer);
      } catch (...) {
        returnHandle(handle);
        throw;
      }
      returnHandle(handle);
      if (stopped) return true;
      if (streamError.kind != Attempt::kNone) {
        if (started) throw StreamBroken("watch on " + options_.endpoints[i] + " ended: " + streamError.error);
        attempt = streamError;
        return false;
      }
      if (!started) {
        if (attempt.kind == Attempt::kOk) {
          attempt.kind = Attempt::kNoAnswer;
          attempt.error = "closed the watch before it started";
        }
        if (Clock::now() >= until) {
          timedOut = true;
          return true;
        }
        return false;
      }
      if (attempt.timedOut) {
        timedOut = true;  // the watch ran its course (curl's timeout is `until`)
        return true;
      }
      throw StreamBroken("watch on " + options_.endpoints[i] + " broke: " +
                         (attempt.kind == Attempt::kOk ? "closed by etcd" : attempt.error));
    });
  } catch (const StreamBroken&) {
    throw;
  } catch (const EtcdError&) {
    throw;
  } catch (const StoreError&) {
    return false;  // no endpoint served a watch before `until`: the caller's next read tells why
  }
  return stopped && !timedOut;
}

}  // namespace tessera::comm::etcd
