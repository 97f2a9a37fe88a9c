// Membership records of the elastic mesh: the [elastic] config's checks, who
// this process is (ElasticIdentity, from the launcher's environment), member
// ids, and the decision record as it is published in the store (JSON).
// Nothing here touches the store or the network.
#include "parallel/elastic/membership.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>

#include "parallel/elastic/timing.h"
#include "tessera/comm/net.h"
#include "tessera/core/config.h"

namespace tessera::parallel {
namespace {

using Json = nlohmann::json;

int envInt(const char* name, int fallback, bool required) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    TESSERA_CHECK_ARG(!required, "elastic mode: " << name << " is not set (start workers with tessera-run --nnodes MIN:MAX)");
    return fallback;
  }
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TESSERA_CHECK_ARG(end != value && *end == '\0' && parsed >= 0 && parsed < (1L << 30),
                    "elastic mode: " << name << "=\"" << value << "\" is not a whole number >= 0");
  return static_cast<int>(parsed);
}

std::string envString(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::string(value) : fallback;
}

// "a:1,b:2" -> {"a:1", "b:2"}, each checked as host:port; throws
// InvalidArgument naming `what`.
std::vector<std::string> endpointList(const std::string& list, const std::string& what) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (true) {
    const size_t comma = list.find(',', begin);
    const std::string item = list.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    TESSERA_CHECK_ARG(!item.empty(), what << "=\"" << list << "\" has an empty entry (want host:port[,host:port...])");
    comm::net::parseHostPort(item, what);
    out.push_back(item);
    if (comma == std::string::npos) return out;
    begin = comma + 1;
  }
}

bool validRunId(const std::string& id) {
  return id.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") == std::string::npos;
}

std::string joinComma(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

}  // namespace

void ElasticConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(heartbeat_interval_s > 0, prefix + "heartbeat_interval_s", "must be > 0, got " << heartbeat_interval_s);
  TESSERA_CHECK_CONFIG(heartbeat_timeout_s >= 2 * heartbeat_interval_s, prefix + "heartbeat_timeout_s",
                       "must be at least twice heartbeat_interval_s (" << heartbeat_interval_s << "), got "
                                                                       << heartbeat_timeout_s);
  TESSERA_CHECK_CONFIG(min_nodes >= 1, prefix + "min_nodes", "must be >= 1, got " << min_nodes);
  TESSERA_CHECK_CONFIG(max_nodes == 0 || max_nodes >= min_nodes, prefix + "max_nodes",
                       "must be 0 (no limit) or >= min_nodes (" << min_nodes << "), got " << max_nodes);
  TESSERA_CHECK_CONFIG(wait_timeout_s > 0, prefix + "wait_timeout_s", "must be > 0, got " << wait_timeout_s);
  TESSERA_CHECK_CONFIG(collective_timeout_s > 0, prefix + "collective_timeout_s",
                       "must be > 0, got " << collective_timeout_s);
  TESSERA_CHECK_CONFIG(max_retries >= 1, prefix + "max_retries", "must be >= 1, got " << max_retries);
  TESSERA_CHECK_CONFIG(join_timeout_s > 0, prefix + "join_timeout_s", "must be > 0, got " << join_timeout_s);
  TESSERA_CHECK_CONFIG(start_grace_s >= 0, prefix + "start_grace_s", "must be >= 0, got " << start_grace_s);
  TESSERA_CHECK_CONFIG(rdzv_backend == "tessera" || rdzv_backend == "etcd", prefix + "rdzv_backend",
                       "got '" << rdzv_backend << "' (valid: tessera, etcd)");
  if (!rdzv_endpoint.empty()) {
    std::vector<std::string> endpoints;
    try {
      endpoints = endpointList(rdzv_endpoint, prefix + "rdzv_endpoint");
    } catch (const InvalidArgument& e) {
      throw ConfigError(prefix + "rdzv_endpoint", e.what());
    }
    TESSERA_CHECK_CONFIG(rdzv_backend == "etcd" || endpoints.size() == 1, prefix + "rdzv_endpoint",
                         "lists " << endpoints.size() << " endpoints; the tessera backend takes one host:port (a list "
                                  << "is for rdzv_backend = \"etcd\")");
  }
  TESSERA_CHECK_CONFIG(validRunId(rdzv_id), prefix + "rdzv_id",
                       "'" << rdzv_id << "' may hold letters, digits, '-', '_' and '.' only (it prefixes store keys)");
  TESSERA_CHECK_CONFIG(store_outage_timeout_s > 0, prefix + "store_outage_timeout_s",
                       "must be > 0, got " << store_outage_timeout_s);
}

std::string ElasticIdentity::memberId() const { return std::to_string(slot) + "." + std::to_string(incarnation); }

ElasticIdentity ElasticIdentity::fromEnv() {
  ElasticIdentity id;
  id.slot = envInt("TESSERA_NODE_SLOT", 0, true);
  id.incarnation = envInt("TESSERA_NODE_INCARNATION", 0, false);
  id.localRank = envInt("LOCAL_RANK", 0, false);
  id.localSize = std::max(1, envInt("LOCAL_WORLD_SIZE", 1, false));
  TESSERA_CHECK_ARG(id.localRank < id.localSize,
                    "elastic mode: LOCAL_RANK " << id.localRank << " >= LOCAL_WORLD_SIZE " << id.localSize);
  const std::string nnodes = envString("TESSERA_NNODES", "1:0");
  const size_t colon = nnodes.find(':');
  try {
    id.minNodes = std::stoi(nnodes.substr(0, colon));
    id.maxNodes = colon == std::string::npos ? id.minNodes : std::stoi(nnodes.substr(colon + 1));
  } catch (const std::exception&) {
    throw InvalidArgument("elastic mode: TESSERA_NNODES=\"" + nnodes + "\" is not MIN:MAX (e.g. 2:4)");
  }
  id.backend = envString("TESSERA_RDZV_BACKEND", "");
  TESSERA_CHECK_ARG(id.backend.empty() || id.backend == "tessera" || id.backend == "etcd",
                    "elastic mode: TESSERA_RDZV_BACKEND=\"" << id.backend << "\" is not tessera or etcd");
  // TESSERA_RDZV_ENDPOINT is the list; TESSERA_STORE_ADDR (a tessera store) is
  // what launchers before the etcd backend set, and still do for tessera.
  const std::string list = envString("TESSERA_RDZV_ENDPOINT", "");
  const std::string storeAddr = envString("TESSERA_STORE_ADDR", "");
  if (!list.empty()) {
    id.endpoints = endpointList(list, "TESSERA_RDZV_ENDPOINT");
  } else if (!storeAddr.empty() && id.backend != "etcd") {
    id.endpoints = endpointList(storeAddr, "TESSERA_STORE_ADDR");
  }
  id.storeAddress = id.backend != "etcd" && !storeAddr.empty() ? storeAddr : joinComma(id.endpoints);
  id.runId = envString("TESSERA_RDZV_ID", "");
  TESSERA_CHECK_ARG(validRunId(id.runId),
                    "elastic mode: TESSERA_RDZV_ID=\"" << id.runId << "\" may hold letters, digits, '-', '_' and '.' only");
  id.etcdUser = envString("TESSERA_ETCD_USER", "");
  id.etcdPasswordFile = envString("TESSERA_ETCD_PASSWORD_FILE", "");
  id.advertiseHost = envString("TESSERA_ADVERTISE_HOST", "127.0.0.1");
  return id;
}

ElasticIdentity ElasticIdentity::resolved(const ElasticConfig& config) const {
  ElasticIdentity id = *this;
  if (id.backend.empty()) id.backend = config.rdzv_backend;
  TESSERA_CHECK_CONFIG(id.backend == "tessera" || id.backend == "etcd", "elastic.rdzv_backend",
                       "got '" << id.backend << "' (valid: tessera, etcd)");
  // An identity built in code (tests) may name only storeAddress.
  if (id.endpoints.empty() && !id.storeAddress.empty()) id.endpoints = endpointList(id.storeAddress, "storeAddress");
  if (id.endpoints.empty() && !config.rdzv_endpoint.empty()) {
    try {
      id.endpoints = endpointList(config.rdzv_endpoint, "elastic.rdzv_endpoint");
    } catch (const InvalidArgument& e) {
      throw ConfigError("elastic.rdzv_endpoint", e.what());
    }
  }
  TESSERA_CHECK_CONFIG(!id.endpoints.empty(), "elastic.rdzv_endpoint",
                       "no rendezvous store: start the workers with tessera-run --nnodes MIN:MAX (it sets "
                       "TESSERA_RDZV_ENDPOINT), or give elastic.rdzv_endpoint (host:port; etcd: a list)");
  TESSERA_CHECK_CONFIG(id.backend == "etcd" || id.endpoints.size() == 1, "elastic.rdzv_endpoint",
                       "lists " << id.endpoints.size() << " endpoints; the tessera backend takes one host:port");
  if (id.runId.empty()) id.runId = config.rdzv_id;
  if (id.storeAddress.empty()) id.storeAddress = joinComma(id.endpoints);
  return id;
}

int slotOf(const std::string& member) {
  const size_t dot = member.find('.');
  TESSERA_CHECK_ARG(dot != std::string::npos && dot > 0, "bad elastic member id \"" << member << "\" (want slot.incarnation)");
  return std::atoi(member.substr(0, dot).c_str());
}

std::string Membership::toJson() const {
  Json j;
  j["epoch"] = epoch;
  j["outer_step"] = outerStep;
  j["attempt"] = attempt;
  j["members"] = members;
  Json joined = Json::array();
  for (const auto& [joiner, source] : joiners) joined.push_back({{"member", joiner}, {"source", source}});
  j["joiners"] = joined;
  j["pending"] = pending;
  j["dropped"] = dropped;
  j["join_cursor"] = joinCursor;
  if (!stop.empty()) j["stop"] = stop;
  return j.dump();
}

Membership Membership::fromJson(const std::string& text) {
  try {
    const Json j = Json::parse(text);
    Membership m;
    m.epoch = j.at("epoch").get<int64_t>();
    m.outerStep = j.at("outer_step").get<int64_t>();
    m.attempt = j.at("attempt").get<int>();
    m.members = j.at("members").get<std::vector<std::string>>();
    for (const auto& joiner : j.at("joiners")) {
      m.joiners.emplace_back(joiner.at("member").get<std::string>(), joiner.at("source").get<std::string>());
    }
    m.pending = j.at("pending").get<std::vector<std::string>>();
    m.dropped = j.at("dropped").get<std::vector<std::string>>();
    m.joinCursor = j.at("join_cursor").get<int64_t>();
    if (j.contains("stop")) m.stop = j.at("stop").get<std::string>();
    return m;
  } catch (const Json::exception& e) {
    throw InvalidArgument(std::string("elastic membership record is not valid: ") + e.what());
  }
}

int Membership::indexOf(const std::string& member) const {
  const auto it = std::find(members.begin(), members.end(), member);
  return it == members.end() ? -1 : static_cast<int>(it - members.begin());
}

namespace elastic {

bool memberLess(const std::string& a, const std::string& b) {
  const int sa = slotOf(a), sb = slotOf(b);
  if (sa != sb) return sa < sb;
  return std::atoi(a.c_str() + a.find('.') + 1) < std::atoi(b.c_str() + b.find('.') + 1);
}

void sortMembers(std::vector<std::string>& members) { std::sort(members.begin(), members.end(), memberLess); }

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

std::string joinList(const std::vector<std::string>& list) {
  std::string out;
  for (const auto& item : list) out += (out.empty() ? "" : ", ") + item;
  return "[" + out + "]";
}

std::string membershipEvent(const Membership& decision) {
  std::vector<std::string> joined;
  for (const auto& [joiner, source] : decision.joiners) joined.push_back(joiner);
  return Json{{"event", "membership"},  {"epoch", decision.epoch},     {"outer_step", decision.outerStep},
              {"members", decision.members}, {"joined", joined},      {"dropped", decision.dropped},
              {"time_s", unixSeconds()}}
      .dump();
}

}  // namespace elastic
}  // namespace tessera::parallel
