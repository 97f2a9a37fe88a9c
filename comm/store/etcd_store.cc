// The etcd store: Store calls as etcd v3 KV / txn / watch / lease requests
// over the HTTP gateway (the mapping and its reasons: etcd_store.h).
#include "tessera/comm/etcd_store.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <random>

#include "comm/store/etcd_http.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm {
namespace {

using etcd::base64Decode;
using etcd::base64Encode;
using etcd::Clock;
using etcd::EtcdError;
using etcd::HttpClient;
using etcd::Json;
using etcd::jsonInt;
using std::chrono::milliseconds;

// A watch is re-armed (after a fresh read) this often, so a wait on a member
// that is cut off from the others without noticing still ends within this.
constexpr milliseconds kWatchSegment{std::chrono::seconds(5)};
// etcd's default --max-txn-ops.
constexpr size_t kMaxTxnOps = 128;
// gRPC NotFound: "etcdserver: requested lease not found".
constexpr int kNotFound = 5;

struct Kv {
  bool exists = false;
  std::string value;
  int64_t modRevision = 0;
};

Kv firstKv(const Json& rangeResponse) {
  Kv kv;
  auto it = rangeResponse.find("kvs");
  if (it == rangeResponse.end() || !it->is_array() || it->empty()) return kv;
  const Json& entry = (*it)[0];
  kv.exists = true;
  kv.value = base64Decode(entry.value("value", ""));
  kv.modRevision = jsonInt(entry, "mod_revision");
  return kv;
}

Json rangeOp(const std::string& key, bool countOnly = false) {
  Json range = {{"key", base64Encode(key)}};
  if (countOnly) range["count_only"] = true;
  return {{"request_range", range}};
}

Json putOp(const std::string& key, const std::string& value) {
  return {{"request_put", {{"key", base64Encode(key)}, {"value", base64Encode(value)}}}};
}

// The range result of a txn's i-th operation.
const Json& txnRange(const Json& txn, size_t i) {
  static const Json kEmpty = Json::object();
  auto it = txn.find("responses");
  if (it == txn.end() || !it->is_array() || i >= it->size()) return kEmpty;
  const Json& op = (*it)[i];
  return op.contains("response_range") ? op["response_range"] : kEmpty;
}

std::string randomNonceBase() {
  std::random_device device;
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return std::string(host) + ":" + std::to_string(::getpid()) + ":" + std::to_string(device()) +
         std::to_string(device());
}

class EtcdStore final : public Store {
 public:
  explicit EtcdStore(const EtcdStoreOptions& options)
      : options_(options),
        http_(etcd::HttpOptions{options.endpoints, options.user, options.password, options.requestTimeout}),
        nonceBase_(randomNonceBase()) {
    TESSERA_CHECK_ARG(options.outageTimeout.count() > 0, "EtcdStoreOptions.outageTimeout must be positive");
    // Fails fast (StoreError / AuthError) when nothing answers or the
    // credentials are wrong, rather than at the job's first rendezvous.
    call("/v3/maintenance/status", Json::object());
  }

  void set(const std::string& key, const Bytes& value) override {
    call("/v3/kv/put", {{"key", base64Encode(key)}, {"value", base64Encode(toString(value))}});
  }

  Bytes get(const std::string& key, milliseconds timeout) override {
    std::optional<std::string> value = awaitKey(key, Clock::now() + timeout);
    if (!value) throw timedOut("get", timeout, {key});
    return toBytes(*value);
  }

  void wait(const std::vector<std::string>& keys, milliseconds timeout) override {
    // Keys are not deleted while a group waits for them, so waiting for one
    // after the other is waiting for all.
    const auto deadline = Clock::now() + timeout;
    for (const auto& key : keys) {
      if (!awaitKey(key, deadline)) throw timedOut("wait", timeout, keys);
    }
  }

  int64_t add(const std::string& key, int64_t delta) override;
  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override;

  bool deleteKey(const std::string& key) override {
    return jsonInt(call("/v3/kv/deleterange", {{"key", base64Encode(key)}}), "deleted") > 0;
  }

  bool check(const std::vector<std::string>& keys) override {
    for (size_t begin = 0; begin < keys.size(); begin += kMaxTxnOps) {
      Json ops = Json::array();
      const size_t end = std::min(keys.size(), begin + kMaxTxnOps);
      for (size_t i = begin; i < end; ++i) ops.push_back(rangeOp(keys[i], /*countOnly=*/true));
      const Json answer = call("/v3/kv/txn", {{"success", ops}});
      for (size_t i = 0; i < end - begin; ++i) {
        if (jsonInt(txnRange(answer, i), "count") == 0) return false;
      }
    }
    return true;
  }

  std::string describe() const override { return http_.describe(); }

  bool supportsLeases() const override { return true; }

  int64_t grantLease(milliseconds ttl) override {
    TESSERA_CHECK_ARG(ttl.count() > 0, "grantLease: the ttl must be positive, got " << ttl.count() << " ms");
    const int64_t seconds = std::max<int64_t>(1, (ttl.count() + 999) / 1000);  // etcd counts whole seconds
    const Json answer = call("/v3/lease/grant", {{"TTL", std::to_string(seconds)}});
    const int64_t id = jsonInt(answer, "ID");
    if (id <= 0 || !answer.value("error", "").empty()) {
      throw StoreError("etcd at " + describe() + " granted no lease: " + answer.value("error", answer.dump()));
    }
    return id;
  }

  void keepAlive(int64_t lease) override {
    // LeaseKeepAlive is a stream: one request, the first answer is ours.
    Json result;
    const bool answered = http_.stream("/v3/lease/keepalive", {{"ID", std::to_string(lease)}},
                                       Clock::now() + options_.outageTimeout, [&](const Json& message) {
                                         result = message;
                                         return false;
                                       });
    if (!answered) call("/v3/maintenance/status", Json::object());  // throws the outage's StoreError
    if (!answered || jsonInt(result, "TTL") <= 0) {
      throw StoreError("lease " + std::to_string(lease) + " on " + describe() +
                       (answered ? " has expired or was revoked; its keys are gone"
                                 : " could not be renewed (no endpoint answered the keepalive)"));
    }
  }

  void revokeLease(int64_t lease) override {
    try {
      call("/v3/lease/revoke", {{"ID", std::to_string(lease)}});
    } catch (const EtcdError& e) {
      if (e.code() != kNotFound) throw;  // an unknown lease: already gone, as asked
    }
  }

  void setWithLease(const std::string& key, const Bytes& value, int64_t lease) override {
    try {
      call("/v3/kv/put",
           {{"key", base64Encode(key)}, {"value", base64Encode(toString(value))}, {"lease", std::to_string(lease)}});
    } catch (const EtcdError& e) {
      if (e.code() != kNotFound) throw;
      throw StoreError("setWithLease(" + key + "): lease " + std::to_string(lease) + " on " + describe() +
                       " has expired or was revoked");
    }
  }

  using Store::get;
  using Store::wait;

 private:
  // A request with the outage bound as its deadline.
  Json call(const std::string& path, const Json& body) {
    return http_.call(path, body, Clock::now() + options_.outageTimeout);
  }

  // The key's value, waiting for it until `deadline`; nullopt when absent then.
  std::optional<std::string> awaitKey(const std::string& key, Clock::time_point deadline);
  // The value of the first put of `key` after `afterRevision`, waiting until
  // `until`; nullopt when none came (or the watch broke: re-read and retry).
  std::optional<std::string> watchPut(const std::string& key, int64_t afterRevision, Clock::time_point until);

  TimeoutError timedOut(const char* op, milliseconds timeout, const std::vector<std::string>& keys) {
    return TimeoutError("store " + std::string(op) + " timed out after " + std::to_string(timeout.count()) +
                        " ms on " + describe() + "; missing keys: " + describeMissingKeys(*this, keys));
  }

  EtcdStoreOptions options_;
  HttpClient http_;
  const std::string nonceBase_;
  std::atomic<uint64_t> nonceSeq_{0};
};

std::optional<std::string> EtcdStore::awaitKey(const std::string& key, Clock::time_point deadline) {
  for (;;) {
    const Json range = call("/v3/kv/range", {{"key", base64Encode(key)}});
    const Kv kv = firstKv(range);
    if (kv.exists) return kv.value;
    if (Clock::now() >= deadline) return std::nullopt;
    const int64_t revision = jsonInt(range.value("header", Json::object()), "revision");
    std::optional<std::string> value =
        watchPut(key, revision, std::min(deadline, Clock::now() + std::max(kWatchSegment, options_.requestTimeout)));
    if (value) return value;
  }
}

std::optional<std::string> EtcdStore::watchPut(const std::string& key, int64_t afterRevision,
                                                Clock::time_point until) {
  const Json create = {{"create_request", {{"key", base64Encode(key)}, {"start_revision", afterRevision + 1}}}};
  std::optional<std::string> value;
  try {
    http_.stream("/v3/watch", create, until, [&](const Json& result) {
      if (result.value("canceled", false)) return false;  // compacted past our revision: re-read
      auto events = result.find("events");
      if (events == result.end() || !events->is_array()) return true;
      for (const Json& event : *events) {
        // type is omitted for PUT (the enum's zero value).
        if (event.value("type", "PUT") != "PUT" || !event.contains("kv")) continue;
        value = base64Decode(event["kv"].value("value", ""));
        return false;
      }
      return true;
    });
  } catch (const HttpClient::StreamBroken& e) {
    TESSERA_LOG(kDebug) << "etcd store: " << e.what() << "; re-reading " << key;
  }
  return value;
}

int64_t EtcdStore::add(const std::string& key, int64_t delta) {
  // The CAS loop. Each attempt reads the key at revision R, then commits
  // base + delta only if the key is unchanged, writing `side` = nonce in the
  // same transaction. If an attempt's answer is lost (failover) it may still
  // have been applied: it did iff the first write of `side` after R carries
  // our nonce (any other add committing first after R makes our compare
  // fail; a plain set() does too).
  const std::string side = key + std::string("\0add", 4);
  const std::string nonce = nonceBase_ + ":" + std::to_string(++nonceSeq_);
  int64_t pendingAfter = -1;  // R of the last attempt, when a lost copy of it may have been applied
  int64_t pendingValue = 0;
  Json state = call("/v3/kv/txn", {{"success", Json::array({rangeOp(key), rangeOp(side)})}});
  for (;;) {
    const Kv current = firstKv(txnRange(state, 0));
    const Kv owner = firstKv(txnRange(state, 1));
    const int64_t revision = jsonInt(state.value("header", Json::object()), "revision");
    if (pendingAfter >= 0 && owner.exists && owner.modRevision > pendingAfter) {
      std::optional<std::string> first = owner.value == nonce ? owner.value
                                         : watchPut(side, pendingAfter, Clock::now() + options_.requestTimeout);
      if (first && *first == nonce) {
        TESSERA_LOG(kDebug) << "etcd store: add(" << key << ") was applied though its answer was lost; not repeated";
        return pendingValue;
      }
    }
    int64_t base = 0;
    if (current.exists) {
      try {
        size_t used = 0;
        base = std::stoll(current.value, &used);
        if (used != current.value.size()) throw std::invalid_argument("trailing bytes");
      } catch (const std::exception&) {
        throw InvalidArgument("add(" + key + ", " + std::to_string(delta) + ") on " + describe() + ": the key holds '" +
                              current.value.substr(0, 40) + "', not an integer");
      }
    }
    const int64_t value = base + delta;
    const Json compare =
        current.exists
            ? Json{{"key", base64Encode(key)}, {"target", "MOD"}, {"result", "EQUAL"},
                   {"mod_revision", std::to_string(current.modRevision)}}
            : Json{{"key", base64Encode(key)}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}};
    bool resent = false;
    state = http_.call("/v3/kv/txn",
                       {{"compare", Json::array({compare})},
                        {"success", Json::array({putOp(key, std::to_string(value)), putOp(side, nonce)})},
                        {"failure", Json::array({rangeOp(key), rangeOp(side)})}},
                       Clock::now() + options_.outageTimeout, &resent);
    if (state.value("succeeded", false)) return value;
    // The copy that answered lost the race; one sent before it may have won.
    pendingAfter = resent ? revision : -1;
    pendingValue = value;
  }
}

Bytes EtcdStore::compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) {
  const std::string want = toString(desired);
  auto attempt = [&](const Json& compare) {
    return call("/v3/kv/txn", {{"compare", Json::array({compare})},
                               {"success", Json::array({putOp(key, want)})},
                               {"failure", Json::array({rangeOp(key)})}});
  };
  const Json valueIs = {{"key", base64Encode(key)}, {"target", "VALUE"}, {"result", "EQUAL"},
                        {"value", base64Encode(toString(expected))}};
  if (!expected.empty()) {
    const Json answer = attempt(valueIs);
    if (answer.value("succeeded", false)) return desired;
    const Kv now = firstKv(txnRange(answer, 0));
    return now.exists ? toBytes(now.value) : expected;  // absent: as the other stores, hand back `expected`
  }
  // expected empty: the key is absent, or (as the other stores read it) holds "".
  const Json absent = {{"key", base64Encode(key)}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}};
  Json answer = attempt(absent);
  if (answer.value("succeeded", false)) return desired;
  Kv now = firstKv(txnRange(answer, 0));
  if (now.exists && now.value.empty()) {
    answer = attempt(valueIs);
    if (answer.value("succeeded", false)) return desired;
    now = firstKv(txnRange(answer, 0));
  }
  return toBytes(now.value);
}

}  // namespace

StorePtr makeEtcdStore(const EtcdStoreOptions& options) { return std::make_shared<EtcdStore>(options); }

}  // namespace tessera::comm
