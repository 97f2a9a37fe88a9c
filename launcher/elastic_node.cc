// tessera-run's elastic mode: store connection, slot and incarnations, the
// workers' environment, and the membership reporter. See elastic_node.h.
#include "launcher/elastic_node.h"

#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "launcher/node_slot.h"
#include "launcher/supervisor.h"
#include "launcher/worker_process.h"
#include "tessera/comm/net.h"
#include "tessera/comm/rendezvous.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"
#include "tessera/launcher/launch_info.h"
#include "tessera/parallel/elastic.h"

namespace tessera::launcher {
namespace {

using std::chrono::milliseconds;

// Store keys of the launcher's half of the elastic contract (elastic.h);
// the slot records are node_slot.h's.
constexpr const char* kMembershipKey = "elastic/membership";
std::string incarnationKey(int slot) { return "elastic/incarnation/" + std::to_string(slot); }
std::string deadKey(const std::string& member) { return "elastic/dead/" + member; }

// The elastic.h contract's variables (launch_info.h holds the fixed-mode ones).
constexpr const char* kElasticVar = "TESSERA_ELASTIC";
constexpr const char* kStoreAddrVar = "TESSERA_STORE_ADDR";
constexpr const char* kNodeSlotVar = "TESSERA_NODE_SLOT";
constexpr const char* kIncarnationVar = "TESSERA_NODE_INCARNATION";
constexpr const char* kNnodesVar = "TESSERA_NNODES";
constexpr const char* kAdvertiseHostVar = "TESSERA_ADVERTISE_HOST";
constexpr const char* kJoinTokenFileVar = "TESSERA_JOIN_TOKEN_FILE";
constexpr const char* kRdzvBackendVar = "TESSERA_RDZV_BACKEND";
constexpr const char* kRdzvEndpointVar = "TESSERA_RDZV_ENDPOINT";
constexpr const char* kRdzvIdVar = "TESSERA_RDZV_ID";
constexpr const char* kEtcdUserVar = "TESSERA_ETCD_USER";
constexpr const char* kEtcdPasswordFileVar = "TESSERA_ETCD_PASSWORD_FILE";

milliseconds fromSeconds(double seconds) { return milliseconds(static_cast<int64_t>(seconds * 1000)); }

std::string hostPort(const Endpoint& endpoint) {
  const bool v6 = endpoint.host.find(':') != std::string::npos;
  return (v6 ? "[" + endpoint.host + "]" : endpoint.host) + ":" + std::to_string(endpoint.port);
}

// A store call that may meet the store restarting or a link blinking: retried
// until `deadline`, then the last error is thrown.
template <typename Call>
auto retryStore(Call call, Deadline deadline) -> decltype(call()) {
  while (true) {
    try {
      return call();
    } catch (const AuthError&) {
      throw;
    } catch (const Error&) {
      if (deadline.expired()) throw;
    }
    std::this_thread::sleep_for(std::min(milliseconds(500), deadline.remaining()));
  }
}

// Where this node's join secret came from, for the refusal message.
std::string secretSource(const RunOptions& options) {
  if (!options.joinTokenFile.empty()) return "this node read it from --join-token-file " + options.joinTokenFile;
  if (const char* file = std::getenv("TESSERA_JOIN_TOKEN_FILE"); file != nullptr && *file != '\0') {
    return std::string("this node read it from TESSERA_JOIN_TOKEN_FILE=") + file;
  }
  if (const char* token = std::getenv("TESSERA_JOIN_TOKEN"); token != nullptr && *token != '\0') {
    return "this node took it from TESSERA_JOIN_TOKEN";
  }
  return "this node was given none";
}

// The job's store, described for messages: "tcp://h:p" or "etcd h1:2379,h2:2379 (run id J)".
std::string storeName(const RunOptions& options) {
  std::string name;
  for (const Endpoint& endpoint : options.rdzvEndpoints()) name += (name.empty() ? "" : ",") + hostPort(endpoint);
  name = options.rdzvBackend == "etcd" ? "etcd " + name : "tcp://" + name;
  return options.rdzvId.empty() ? name : name + " (run id " + options.rdzvId + ")";
}

// The store's client, with the startup failures users meet turned into
// messages that name the fix.
comm::StorePtr connectToStore(const comm::RendezvousOptions& rdzv, const RunOptions& options) {
  const bool etcd = options.rdzvBackend == "etcd";
  try {
    return comm::connectRendezvousStore(rdzv);
  } catch (const AuthError& e) {
    if (etcd) {
      throw AuthError(std::string("refused by etcd at ") + options.rdzvEndpoint + ": " + e.what() +
                      "; give etcd's user and password with --rdzv-conf user=U,password_file=F or "
                      "TESSERA_ETCD_USER / TESSERA_ETCD_PASSWORD_FILE");
    }
    throw AuthError("refused by the store at " + hostPort(options.storeEndpoint()) +
                    ": wrong join token; give the job's secret with --join-token-file, TESSERA_JOIN_TOKEN_FILE or "
                    "TESSERA_JOIN_TOKEN (" + secretSource(options) + ")");
  } catch (const InvalidArgument&) {
    throw;
  } catch (const Error& e) {
    if (etcd) {
      throw StoreError(std::string(e.what()) + "; check that the etcd cluster at " + options.rdzvEndpoint +
                       " is up and has quorum, check --rdzv-endpoint, or wait longer with --rdzv-timeout");
    }
    throw StoreError(std::string(e.what()) + "; start the store with `tessera-store --port " +
                     std::to_string(options.storeEndpoint().port) +
                     "` (or pass --host-store to one node), check --rdzv-endpoint, or wait longer with --rdzv-timeout");
  }
}

std::string listText(const nlohmann::json& values) {
  std::string out = "[";
  for (const auto& value : values) {
    out += out.size() > 1 ? ", " : "";
    out += value.is_string() ? value.get<std::string>() : value.dump();
  }
  return out + "]";
}

// Polls "elastic/membership" every `interval` on its own thread (its own
// client: a blocking get must not hold the supervisor's connection) and says
// one line per change. An unreachable store pauses the reports, no more.
class MembershipReporter {
 public:
  MembershipReporter(comm::RendezvousOptions options, milliseconds interval)
      : options_(std::move(options)), interval_(interval), thread_([this] { loop(); }) {}
  ~MembershipReporter() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  MembershipReporter(const MembershipReporter&) = delete;
  MembershipReporter& operator=(const MembershipReporter&) = delete;

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      lock.unlock();
      pollOnce();
      lock.lock();
      wake_.wait_for(lock, interval_, [this] { return stopping_; });
    }
  }

  void pollOnce() {
    std::string text;
    try {
      if (!store_) store_ = comm::connectRendezvousStore(options_);
      if (!store_->check({kMembershipKey})) return;
      text = store_->getString(kMembershipKey, options_.requestTimeout);
      if (unreachable_) say("membership reports resumed: the store is reachable again");
      unreachable_ = false;
    } catch (const std::exception& e) {
      store_.reset();  // reconnect from scratch next round
      if (!unreachable_) say(std::string("membership reports paused: ") + e.what() + "; retrying every second");
      unreachable_ = true;
      return;
    }
    if (text == lastText_) return;
    lastText_ = text;
    std::string line;
    try {
      line = describeMembership(text);
    } catch (const Error& e) {
      line = "elastic/membership holds something unexpected (" + std::string(e.what()) + ")";
    }
    if (line != lastLine_) say(line);
    lastLine_ = line;
  }

  const comm::RendezvousOptions options_;
  const milliseconds interval_;
  comm::StorePtr store_;  // used by the reporter thread only
  bool unreachable_ = false;
  std::string lastText_;
  std::string lastLine_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once everything above is ready
};

struct NodePlan {
  const RunOptions& options;
  Endpoint store;             // tessera backend: the store; etcd: the first member
  int slot = 0;
  std::string joinTokenFile;  // absolute; "" when none was given by flag
  std::string etcdPasswordFile;  // absolute; "" without etcd auth
  EnvMap base;
};

std::string absolutePath(const std::string& path) {
  return path.empty() ? path : std::filesystem::absolute(path).string();
}

std::vector<WorkerSpec> elasticWorkers(const NodePlan& plan, int incarnation, int attempt) {
  const RunOptions& options = plan.options;
  std::vector<WorkerSpec> workers;
  for (int local = 0; local < options.nprocPerNode; ++local) {
    EnvMap env = plan.base;
    env[kElasticVar] = "1";
    // The store the launcher uses; the workers must use the same (these win
    // over the [elastic] config's rdzv_* keys).
    std::string endpoints;
    for (const Endpoint& endpoint : options.rdzvEndpoints()) {
      endpoints += (endpoints.empty() ? "" : ",") + hostPort(endpoint);
    }
    env[kRdzvBackendVar] = options.rdzvBackend;
    env[kRdzvEndpointVar] = endpoints;
    env[kRdzvIdVar] = options.rdzvId;
    for (const char* stale : {kStoreAddrVar, kEtcdUserVar, kEtcdPasswordFileVar, env::kMasterAddr, env::kMasterPort}) {
      env.erase(stale);
    }
    if (options.rdzvBackend == "tessera") {
      env[kStoreAddrVar] = hostPort(plan.store);
      env[env::kMasterAddr] = plan.store.host;
      env[env::kMasterPort] = std::to_string(plan.store.port);
    } else if (!options.etcdUser.empty()) {
      env[kEtcdUserVar] = options.etcdUser;
      env[kEtcdPasswordFileVar] = plan.etcdPasswordFile;
    }
    env[kNodeSlotVar] = std::to_string(plan.slot);
    env[kIncarnationVar] = std::to_string(incarnation);
    env[kNnodesVar] = std::to_string(options.minNodes) + ":" + std::to_string(options.maxNodes);
    env[kAdvertiseHostVar] = options.advertiseHost;
    if (!plan.joinTokenFile.empty()) env[kJoinTokenFileVar] = plan.joinTokenFile;
    env[env::kRank] = std::to_string(plan.slot * options.nprocPerNode + local);
    env[env::kWorldSize] = std::to_string(options.maxNodes * options.nprocPerNode);
    env[env::kLocalRank] = std::to_string(local);
    env[env::kLocalWorldSize] = std::to_string(options.nprocPerNode);
    env[env::kGroupRank] = std::to_string(plan.slot);
    env[env::kBackend] = "gloo";
    env[env::kLauncher] = "tessera-run";
    env[env::kStoreHosted] = "1";
    env[env::kRestartCount] = std::to_string(attempt);
    const std::string label = "node " + std::to_string(plan.slot) + " rank " + std::to_string(local);
    workers.push_back({label, "[" + label + "] ", options.command, toEnvEntries(env)});
  }
  return workers;
}

}  // namespace

std::string describeMembership(const std::string& json) {
  try {
    const nlohmann::json doc = nlohmann::json::parse(json);
    if (!doc.is_object() || !doc.contains("epoch") || !doc.contains("members")) {
      throw InvalidArgument("not a membership: expected an object with \"epoch\" and \"members\", got " + json);
    }
    const auto list = [&](const char* name) {
      const auto found = doc.find(name);
      if (found == doc.end()) return nlohmann::json::array();
      if (!found->is_array()) throw InvalidArgument("\"" + std::string(name) + "\" is not a list in " + json);
      return *found;
    };
    // A joiner is published with its source ({"member", "source"}; a pair
    // or a plain name is read too); the joiner's name is what a user reads.
    nlohmann::json joined = nlohmann::json::array();
    for (const auto& joiner : doc.contains("joiners") ? list("joiners") : list("joined")) {
      if (joiner.is_array() && !joiner.empty()) {
        joined.push_back(joiner.front());
      } else if (joiner.is_object() && joiner.contains("member")) {
        joined.push_back(joiner["member"]);
      } else if (joiner.is_object() && joiner.contains("joiner")) {
        joined.push_back(joiner["joiner"]);
      } else {
        joined.push_back(joiner);
      }
    }
    const auto number = [&](const char* name) {
      const auto found = doc.find(name);
      return found == doc.end() ? std::string("?") : found->dump();
    };
    std::string line = "membership epoch " + number("epoch") + " at outer step " + number("outer_step") +
                       ": nodes " + listText(list("members")) + "; joined " + listText(joined) + "; dropped " +
                       listText(list("dropped"));
    const auto stop = doc.find("stop");
    if (stop != doc.end() && stop->is_string() && !stop->get<std::string>().empty()) {
      line += "; the job stops: " + stop->get<std::string>();
    }
    return line;
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(std::string("not a membership: ") + e.what());
  }
}

int runElasticNode(const RunOptions& options) {
  const Endpoint endpoint = options.storeEndpoint();
  const std::string secret = options.joinTokenFile.empty() ? comm::net::loadJoinSecret()
                                                           : comm::net::loadJoinSecretFile(options.joinTokenFile);

  // Declared first, so it outlives every client of this process.
  std::unique_ptr<comm::StoreServer> hostedStore;
  if (options.hostStore) {
    comm::StoreServerOptions serverOptions;
    serverOptions.host = "0.0.0.0";
    serverOptions.port = static_cast<uint16_t>(endpoint.port);
    serverOptions.secret = secret;
    try {
      hostedStore = std::make_unique<comm::StoreServer>(serverOptions);
    } catch (const Error& e) {
      throw CommError(std::string("--host-store: ") + e.what() +
                      "; if a tessera-store or another node already serves the job's store there, drop --host-store");
    }
  }

  comm::RendezvousOptions rdzv;
  rdzv.backend = options.rdzvBackend;
  for (const Endpoint& e : options.rdzvEndpoints()) rdzv.endpoints.push_back(hostPort(e));
  rdzv.runId = options.rdzvId;
  rdzv.secret = secret;
  if (options.rdzvBackend == "etcd" && !options.etcdUser.empty()) {
    rdzv.user = options.etcdUser;
    // Same rules as the join secret's file: trailing newline dropped, empty refused.
    rdzv.password = comm::net::loadJoinSecretFile(options.etcdPasswordFile);
  }
  rdzv.timeout = fromSeconds(options.rdzvTimeoutSeconds);
  comm::StorePtr store = connectToStore(rdzv, options);

  NodePlan plan{options, endpoint, 0, absolutePath(options.joinTokenFile), absolutePath(options.etcdPasswordFile),
                currentEnvironment()};
  // Quick and bounded clients for the background threads: they retry on their own.
  comm::RendezvousOptions background = rdzv;
  background.timeout = milliseconds(2000);
  background.requestTimeout = milliseconds(2000);
  NodeSlot::Options slotOptions;
  slotOptions.minNodes = options.minNodes;
  slotOptions.maxNodes = options.maxNodes;
  slotOptions.wantedSlot = options.nodeRankGiven ? options.nodeRank : -1;
  slotOptions.storeName = storeName(options);
  // Refuses a second launcher of a live slot, and one beyond MAX live nodes, at once.
  NodeSlot slot(store, [background] { return comm::connectRendezvousStore(background); }, slotOptions);
  plan.slot = slot.slot();
  const std::string threads = shareCores(plan.base, options.nprocPerNode);
  if (isatty(STDERR_FILENO) && plan.base.count("TESSERA_PROGRESS") == 0) plan.base["TESSERA_PROGRESS"] = "1";

  std::ostringstream summary;
  const int firstRank = plan.slot * options.nprocPerNode;
  summary << "elastic node " << plan.slot << " (" << options.minNodes << " to " << options.maxNodes
          << " nodes): ranks " << firstRank << "-" << firstRank + options.nprocPerNode - 1 << " of world size "
          << options.worldSize() << ", store " << storeName(options)
          << (hostedStore ? " hosted here (it stops with this tessera-run)" : "");
  if (!threads.empty()) summary << ", OMP_NUM_THREADS=" << threads;
  summary << "; running " << joinWords(options.command);
  say(summary.str());

  MembershipReporter reporter(background, milliseconds(1000));

  std::string member;  // the running incarnation's "<slot>.<incarnation>"
  SupervisorOptions supervisorOptions;
  supervisorOptions.gracePeriod = fromSeconds(options.gracePeriodSeconds);
  supervisorOptions.maxRestarts = options.maxRestarts;
  supervisorOptions.tailLines = static_cast<size_t>(options.tailLines);
  supervisorOptions.evictedExitCode = parallel::kExitEvicted;
  supervisorOptions.evictedMessage = "node " + std::to_string(plan.slot) + " was dropped from the job; rejoining";
  // Fast failure detection: the others drop this member at once instead of
  // waiting for its heartbeat to age (elastic.h). Through a client with short
  // bounds: in a store outage the node is stopped and restarted without
  // waiting for the store (the heartbeat then tells the others).
  comm::StorePtr marker;
  supervisorOptions.onWorkerFailed = [&](const std::string& how) {
    try {
      if (!marker) marker = comm::connectRendezvousStore(background);
      marker->setString(deadKey(member), how);
      say("marked member " + member + " dead in the store (" + deadKey(member) + ")");
    } catch (const std::exception& e) {
      marker.reset();
      say("could not mark member " + member + " dead in the store (" + e.what() +
          "); the others will find out when its heartbeat stops");
    }
  };
  supervisorOptions.mustStop = [&slot] { return slot.lost(); };
  SignalPipe signals;
  Supervisor supervisor(
      supervisorOptions,
      [&](int attempt) {
        const std::string key = incarnationKey(plan.slot);
        const int incarnation = static_cast<int>(
            retryStore([&] { return store->add(key, 1); }, Deadline(fromSeconds(options.rdzvTimeoutSeconds))) - 1);
        member = std::to_string(plan.slot) + "." + std::to_string(incarnation);
        say("node " + std::to_string(plan.slot) + " incarnation " + std::to_string(incarnation) + ": starting " +
            plural(static_cast<size_t>(options.nprocPerNode), "worker"));
        return elasticWorkers(plan, incarnation, attempt);
      },
      signals, nullptr);
  return supervisor.run().exitCode;
}

}  // namespace tessera::launcher
