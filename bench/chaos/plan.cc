#include "bench/chaos/plan.h"

#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::chaos {
namespace fs = std::filesystem;
namespace {

const std::set<std::string> kActions = {"kill", "kill_workers", "restart", "join", "leave", "partition", "heal", "throttle"};
// [job] keys that are elastic.* settings of every node.
const std::set<std::string> kElasticJobKeys = {"heartbeat_interval_s", "heartbeat_timeout_s", "wait_timeout_s",
                                               "collective_timeout_s", "join_timeout_s",    "start_grace_s",
                                               "max_retries"};

// A TOML value as the text `--set key=value` takes (strings quoted).
std::string valueText(const toml::node& node, const std::string& field) {
  if (auto v = node.as_string()) return "\"" + v->get() + "\"";
  if (auto v = node.as_integer()) return std::to_string(v->get());
  if (auto v = node.as_floating_point()) {
    std::ostringstream out;
    out << v->get();
    std::string text = out.str();
    if (text.find_first_of(".eE") == std::string::npos) text += ".0";
    return text;
  }
  if (auto v = node.as_boolean()) return v->get() ? "true" : "false";
  throw ConfigError(field, "must be a string, number or boolean");
}

template <typename T>
T get(const toml::table& table, const std::string& section, const std::string& key, T fallback) {
  const toml::node* node = table.get(key);
  if (node == nullptr) return fallback;
  const std::string field = section + "." + key;
  if constexpr (std::is_same_v<T, std::string>) {
    auto v = node->as_string();
    TESSERA_CHECK_CONFIG(v != nullptr, field, "must be a string");
    return v->get();
  } else if constexpr (std::is_same_v<T, bool>) {
    auto v = node->as_boolean();
    TESSERA_CHECK_CONFIG(v != nullptr, field, "must be true or false");
    return v->get();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (auto i = node->as_integer()) return static_cast<T>(i->get());
    auto v = node->as_floating_point();
    TESSERA_CHECK_CONFIG(v != nullptr, field, "must be a number");
    return static_cast<T>(v->get());
  } else {
    auto v = node->as_integer();
    TESSERA_CHECK_CONFIG(v != nullptr, field, "must be an integer");
    return static_cast<T>(v->get());
  }
}

void checkKnownKeys(const toml::table& table, const std::string& section, const std::set<std::string>& known) {
  for (const auto& [key, value] : table) {
    const std::string name(key.str());
    if (known.count(name) == 0) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      throw ConfigError(section + "." + name, "unknown key (valid: " + list + ")");
    }
  }
}

std::string resolveConfig(const std::string& config, const std::string& baseDir) {
  if (config.empty()) return config;
  const fs::path given(config);
  if (given.is_absolute() || fs::exists(given)) return given.string();
  // Relative to the plan's directory or one of its parents (a plan in
  // examples/chaos/ names "examples/configs/..." from the repository root).
  fs::path dir = baseDir.empty() ? fs::current_path() : fs::absolute(baseDir);
  for (int up = 0; up < 4 && !dir.empty(); ++up, dir = dir.parent_path()) {
    if (fs::exists(dir / given)) return (dir / given).lexically_normal().string();
    if (dir == dir.parent_path()) break;
  }
  throw ConfigError("job.config", "file '" + config + "' not found (relative paths are tried from the current "
                                  "directory, then the plan's directory and its parents)");
}

}  // namespace

std::string ChaosEvent::describe() const {
  std::ostringstream out;
  out << action << " node " << node;
  if (!rate.empty()) out << " to " << rate;
  if (atSeconds >= 0) out << " at " << atSeconds << " s";
  if (atStep >= 0) out << " at step " << atStep;
  return out.str();
}

int ChaosPlan::slotsUsed() const {
  int slots = nodes;
  for (const auto& e : events) slots = std::max(slots, e.node + 1);
  return slots;
}

ChaosPlan ChaosPlan::withoutFaults() const {
  ChaosPlan plain = *this;
  plain.events.clear();
  plain.soak = SoakPlan{};
  plain.nodeFaults.clear();
  return plain;
}

double parseRateBitsPerSecond(const std::string& rate) {
  static const std::regex pattern(R"(^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$)",
                                  std::regex::icase);
  std::smatch m;
  if (!std::regex_match(rate, m, pattern)) {
    throw InvalidArgument("cannot read rate '" + rate + "': use tc units, e.g. 100mbit, 1gbit, 500kbit, 10mbps");
  }
  double value = std::stod(m[1]);
  std::string unit = m[2];
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  if (unit.empty() || unit == "bit") return value;
  const bool bytes = unit.size() == 4 && unit.substr(1) == "bps";
  const char prefix = unit == "bps" ? ' ' : unit[0];
  // tc: k = 1000, m = 1000000, g = 1e9 ("kbit" is 1000 bit/s).
  const double scale = prefix == 'k' ? 1e3 : prefix == 'm' ? 1e6 : prefix == 'g' ? 1e9 : 1.0;
  return value * scale * (bytes || unit == "bps" ? 8.0 : 1.0);
}

ChaosPlan parseChaosPlan(const std::string& text, const std::string& baseDir, const std::string& name, bool isRoot) {
  toml::table root;
  try {
    root = toml::parse(text, name);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << name << ":" << e.source().begin.line << ":" << e.source().begin.column;
    throw InvalidArgument("cannot parse plan " + where.str() + ": " + std::string(e.description()));
  }
  checkKnownKeys(root, "plan", {"job", "network", "event", "soak", "elastic", "node"});
  ChaosPlan plan;
  plan.path = name;

  const toml::table* job = root["job"].as_table();
  TESSERA_CHECK_CONFIG(job != nullptr, "job", "missing [job] (at least config = \"path of a tessera-train TOML\")");
  {
    std::set<std::string> known = {"config", "steps", "overrides", "nodes", "min_nodes", "max_nodes",
                                   "nproc_per_node", "join_token", "timeout_s", "seed", "store", "max_restarts"};
    known.insert(kElasticJobKeys.begin(), kElasticJobKeys.end());
    checkKnownKeys(*job, "job", known);
  }
  plan.config = resolveConfig(get<std::string>(*job, "job", "config", ""), baseDir);
  TESSERA_CHECK_CONFIG(!plan.config.empty(), "job.config", "missing: give the tessera-train TOML to run");
  plan.steps = get<int64_t>(*job, "job", "steps", 0);
  TESSERA_CHECK_CONFIG(plan.steps >= 0, "job.steps", "must be >= 0 (0: the config's train.steps), got " << plan.steps);
  if (const toml::node* o = job->get("overrides")) {
    const toml::array* list = o->as_array();
    TESSERA_CHECK_CONFIG(list != nullptr, "job.overrides", "must be a list of \"section.key=value\" strings");
    for (const auto& item : *list) {
      auto s = item.as_string();
      TESSERA_CHECK_CONFIG(s != nullptr && s->get().find('=') != std::string::npos, "job.overrides",
                           "every entry must be a \"section.key=value\" string");
      plan.overrides.push_back(s->get());
    }
  }
  plan.nodes = get<int>(*job, "job", "nodes", 2);
  plan.minNodes = get<int>(*job, "job", "min_nodes", 1);
  plan.maxNodes = get<int>(*job, "job", "max_nodes", 0);
  plan.nprocPerNode = get<int>(*job, "job", "nproc_per_node", 1);
  plan.joinToken = get<bool>(*job, "job", "join_token", true);
  plan.timeoutSeconds = get<double>(*job, "job", "timeout_s", 900.0);
  plan.seed = get<uint64_t>(*job, "job", "seed", 1);
  plan.store = get<std::string>(*job, "job", "store", "tessera");
  plan.maxRestarts = get<int>(*job, "job", "max_restarts", 1000);
  TESSERA_CHECK_CONFIG(plan.store == "tessera" || plan.store == "etcd", "job.store",
                       "must be \"tessera\" (a tessera-store) or \"etcd\" (a 3-member etcd cluster), got '"
                           << plan.store << "'");
  TESSERA_CHECK_CONFIG(plan.maxRestarts >= 0, "job.max_restarts", "must be >= 0, got " << plan.maxRestarts);
  TESSERA_CHECK_CONFIG(plan.nodes >= 1, "job.nodes", "must be >= 1, got " << plan.nodes);
  TESSERA_CHECK_CONFIG(plan.minNodes >= 1 && plan.minNodes <= plan.nodes, "job.min_nodes",
                       "must be in 1..nodes (" << plan.nodes << "), got " << plan.minNodes);
  TESSERA_CHECK_CONFIG(plan.maxNodes == 0 || plan.maxNodes >= plan.nodes, "job.max_nodes",
                       "must be 0 (no limit) or >= nodes (" << plan.nodes << "), got " << plan.maxNodes);
  TESSERA_CHECK_CONFIG(plan.nprocPerNode >= 1, "job.nproc_per_node", "must be >= 1, got " << plan.nprocPerNode);
  TESSERA_CHECK_CONFIG(plan.timeoutSeconds > 0, "job.timeout_s", "must be > 0, got " << plan.timeoutSeconds);
  for (const auto& key : kElasticJobKeys) {
    if (const toml::node* v = job->get(key)) plan.elastic[key] = valueText(*v, "job." + key);
  }
  if (const toml::table* elastic = root["elastic"].as_table()) {
    for (const auto& [key, value] : *elastic) {
      plan.elastic[std::string(key.str())] = valueText(value, "elastic." + std::string(key.str()));
    }
  }
  if (const toml::node* nodes = root.get("node")) {
    const toml::array* list = nodes->as_array();
    TESSERA_CHECK_CONFIG(list != nullptr, "node", "use [[node]] tables (index = I, fault = \"...\")");
    for (const auto& item : *list) {
      const toml::table* t = item.as_table();
      TESSERA_CHECK_CONFIG(t != nullptr, "node", "use [[node]] tables (index = I, fault = \"...\")");
      checkKnownKeys(*t, "node", {"index", "fault"});
      const int index = get<int>(*t, "node", "index", -1);
      TESSERA_CHECK_CONFIG(index >= 0, "node.index", "missing or negative");
      plan.nodeFaults[index] = get<std::string>(*t, "node", "fault", "");
    }
  }

  if (const toml::table* net = root["network"].as_table()) {
    checkKnownKeys(*net, "network", {"mode", "rate"});
    plan.network = get<std::string>(*net, "network", "mode", "loopback");
    plan.rate = get<std::string>(*net, "network", "rate", "");
  }
  TESSERA_CHECK_CONFIG(plan.network == "loopback" || plan.network == "netns" || plan.network == "auto",
                       "network.mode", "must be loopback, netns or auto, got '" << plan.network << "'");
  if (plan.network == "auto") {
    plan.network = isRoot ? "netns" : "loopback";
    if (!isRoot) plan.rate.clear();  // "auto" falls back to loopback, which has no link to limit
  }
  TESSERA_CHECK_CONFIG(plan.network != "netns" || isRoot, "network.mode",
                       "netns needs root (network namespaces); run as root or use mode = \"loopback\"");
  if (!plan.rate.empty()) {
    TESSERA_CHECK_CONFIG(plan.network == "netns", "network.rate",
                         "a link rate needs mode = \"netns\" (loopback has no link to limit)");
    parseRateBitsPerSecond(plan.rate);  // throws for a bad unit
  }

  if (const toml::node* events = root.get("event")) {
    const toml::array* list = events->as_array();
    TESSERA_CHECK_CONFIG(list != nullptr, "event", "use [[event]] tables");
    for (const auto& item : *list) {
      const toml::table* t = item.as_table();
      TESSERA_CHECK_CONFIG(t != nullptr, "event", "use [[event]] tables");
      checkKnownKeys(*t, "event", {"at_s", "at_step", "action", "node", "rate"});
      ChaosEvent e;
      e.atSeconds = get<double>(*t, "event", "at_s", -1.0);
      e.atStep = get<int64_t>(*t, "event", "at_step", -1);
      e.action = get<std::string>(*t, "event", "action", "");
      e.node = get<int>(*t, "event", "node", -1);
      e.rate = get<std::string>(*t, "event", "rate", "");
      const std::string what = "event '" + e.action + "'";
      TESSERA_CHECK_CONFIG((e.atSeconds >= 0) != (e.atStep >= 0), "event.at_s",
                           what << ": give exactly one of at_s (seconds since the start) or at_step");
      TESSERA_CHECK_CONFIG(e.action != "slow", "event.action",
                           "slow is not an event: give the node a fault at start, [[node]] index = I, "
                           "fault = \"slow:rank=R,factor=F\"");
      TESSERA_CHECK_CONFIG(kActions.count(e.action) == 1, "event.action",
                           "unknown action '" << e.action
                                              << "' (valid: kill, kill_workers, restart, join, leave, partition, "
                                                 "heal, throttle)");
      TESSERA_CHECK_CONFIG(e.node >= 0, "event.node", what << ": missing node = <slot>");
      TESSERA_CHECK_CONFIG(plan.maxNodes == 0 || e.node < plan.maxNodes, "event.node",
                           what << ": node " << e.node << " is beyond max_nodes " << plan.maxNodes);
      TESSERA_CHECK_CONFIG(e.action == "join" || e.node < plan.nodes || [&] {
                             for (const auto& prior : plan.events) {
                               if (prior.action == "join" && prior.node == e.node) return true;
                             }
                             return false;
                           }(),
                           "event.node", what << ": node " << e.node << " is never started (nodes = " << plan.nodes
                                              << "; add a join event for it first)");
      TESSERA_CHECK_CONFIG(e.action != "join" || e.node >= plan.nodes, "event.node",
                           "join starts a new slot: node " << e.node << " is already one of the first " << plan.nodes
                                                           << " (use restart)");
      const bool needsLink = e.action == "partition" || e.action == "heal" || e.action == "throttle";
      TESSERA_CHECK_CONFIG(!needsLink || plan.network == "netns", "event.action",
                           what << " needs network.mode = \"netns\" (root): loopback has no link to cut or throttle");
      TESSERA_CHECK_CONFIG(e.action != "throttle" || !e.rate.empty(), "event.rate",
                           "throttle needs rate = \"10mbit\" (or \"off\")");
      if (e.action == "throttle" && e.rate != "off") parseRateBitsPerSecond(e.rate);
      plan.events.push_back(e);
    }
  }

  if (const toml::table* soak = root["soak"].as_table()) {
    checkKnownKeys(*soak, "soak",
                   {"kills", "mtbf_s", "restart_after_s", "start_after_s", "stop_when_done", "settle_s", "kinds",
                    "weights"});
    plan.soak.kills = get<int>(*soak, "soak", "kills", 0);
    plan.soak.mtbfSeconds = get<double>(*soak, "soak", "mtbf_s", 10.0);
    plan.soak.restartAfterSeconds = get<double>(*soak, "soak", "restart_after_s", 5.0);
    plan.soak.startAfterSeconds = get<double>(*soak, "soak", "start_after_s", 0.0);
    plan.soak.stopWhenDone = get<bool>(*soak, "soak", "stop_when_done", true);
    plan.soak.settleSeconds = get<double>(*soak, "soak", "settle_s", 30.0);
    if (const toml::node* kinds = soak->get("kinds")) {
      const toml::array* list = kinds->as_array();
      TESSERA_CHECK_CONFIG(list != nullptr && !list->empty(), "soak.kinds",
                           "must be a non-empty list of \"node\" and \"workers\"");
      plan.soak.kinds.clear();
      for (const auto& item : *list) {
        auto v = item.as_string();
        TESSERA_CHECK_CONFIG(v != nullptr && (v->get() == "node" || v->get() == "workers"), "soak.kinds",
                             "entries must be \"node\" (launcher and workers: a silent loss) or \"workers\" "
                             "(only the workers; the launcher restarts them)");
        plan.soak.kinds.push_back(v->get());
      }
    }
    if (const toml::node* weights = soak->get("weights")) {
      const toml::array* list = weights->as_array();
      TESSERA_CHECK_CONFIG(list != nullptr, "soak.weights", "must be a list of numbers, one per kind");
      for (const auto& item : *list) {
        const auto v = item.value<double>();
        TESSERA_CHECK_CONFIG(v.has_value() && *v >= 0, "soak.weights", "entries must be numbers >= 0");
        plan.soak.weights.push_back(*v);
      }
      TESSERA_CHECK_CONFIG(plan.soak.weights.size() == plan.soak.kinds.size(), "soak.weights",
                           "needs one weight per entry of soak.kinds (" << plan.soak.kinds.size() << "), got "
                                                                         << plan.soak.weights.size());
      double total = 0;
      for (double w : plan.soak.weights) total += w;
      TESSERA_CHECK_CONFIG(total > 0, "soak.weights", "at least one weight must be > 0");
    }
    TESSERA_CHECK_CONFIG(plan.soak.kills >= 0, "soak.kills", "must be >= 0");
    TESSERA_CHECK_CONFIG(plan.soak.mtbfSeconds > 0, "soak.mtbf_s", "must be > 0");
    TESSERA_CHECK_CONFIG(plan.soak.restartAfterSeconds >= 0, "soak.restart_after_s", "must be >= 0");
    TESSERA_CHECK_CONFIG(plan.soak.kills == 0 || plan.nodes > plan.minNodes, "soak.kills",
                         "a soak kills nodes while keeping min_nodes alive: needs nodes > min_nodes");
  }
  return plan;
}

ChaosPlan loadChaosPlan(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgument("cannot read plan '" + path + "' (check the path)");
  std::ostringstream text;
  text << in.rdbuf();
  return parseChaosPlan(text.str(), fs::path(path).parent_path().string(), path, geteuid() == 0);
}

}  // namespace tessera::chaos
