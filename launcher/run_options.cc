// tessera-run's flags (CLI11) and their validation. See run_options.h.
#include "launcher/run_options.h"

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "launcher/worker_process.h"
#include "tessera/core/error.h"

// Like TESSERA_CHECK_ARG, minus the file:line that means nothing to a CLI user.
#define REQUIRE_FLAG(cond, msg)              \
  do {                                       \
    if (!(cond)) {                           \
      std::ostringstream problem_;           \
      problem_ << msg;                       \
      throw InvalidArgument(problem_.str()); \
    }                                        \
  } while (0)

namespace tessera::launcher {
namespace {

const char* const kFooter = R"(Examples:
  tessera-run --nproc-per-node 4 ./train --steps 100
  tessera-run --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500 --nproc-per-node 8 ./train
  tessera-run --backend mpi --nproc-per-node 4 ./train      (runs mpirun -np 4 ./train)
  tessera-store --port 29400 &                              (elastic: the store, outliving every node)
  tessera-run --nnodes 2:4 --nproc-per-node 2 --rdzv-endpoint store:29400 --max-restarts 3 tessera-train --config c.toml
  tessera-run --nnodes 2:4 --rdzv-backend etcd --rdzv-endpoint e1:2379,e2:2379,e3:2379 --rdzv-id job7 \
      --rdzv-conf user=tessera,password_file=etcd.pw tessera-train --config c.toml   (elastic, etcd as the store)

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT and TESSERA_BACKEND; tessera::init() reads them.
Elastic mode (--nnodes MIN:MAX) runs one node of a job whose nodes may leave
and join: the node takes a slot (--node-rank, else the next free one from the
store), restarts its workers after a failure (--max-restarts) or when they
were dropped from the job (exit code 75) -- at most --max-restarts times in
all, whatever the cause -- and reports membership changes. A second node with
the --node-rank of a live one, or one beyond MAX live nodes, is refused at once.
Workers also get TESSERA_ELASTIC=1, TESSERA_RDZV_BACKEND, TESSERA_RDZV_ENDPOINT,
TESSERA_RDZV_ID, TESSERA_NODE_SLOT, TESSERA_NODE_INCARNATION, TESSERA_NNODES,
TESSERA_ADVERTISE_HOST, and TESSERA_STORE_ADDR (tessera backend) or
TESSERA_ETCD_USER / TESSERA_ETCD_PASSWORD_FILE (etcd with auth). The store
(--rdzv-backend) is a tessera store by default: `tessera-store --port P`
(recommended: it outlives every node), or --host-store (it lives as long as
this tessera-run); or an etcd v3 cluster (--rdzv-backend etcd, --rdzv-endpoint
lists its members), which has no single point of failure. --rdzv-id keys every
record, so a job restarted on the same store under a new id starts afresh.
The join secret comes from --join-token-file, else TESSERA_JOIN_TOKEN_FILE or
TESSERA_JOIN_TOKEN; etcd's own user and password from --rdzv-conf, else
TESSERA_ETCD_USER and TESSERA_ETCD_PASSWORD_FILE.
Exit code: 0 when every worker exits 0; 1 when one fails; 2 on bad flags;
128+N when tessera-run is stopped by signal N.)";

void addFlags(CLI::App& app, RunOptions& o, std::string& nnodesText, std::string& rdzvConfText) {
  app.add_option("--nproc-per-node,--nproc_per_node", o.nprocPerNode, "Workers to start on this node")
      ->capture_default_str();
  app.add_option("--nnodes", nnodesText,
                 "Nodes in the job (one tessera-run per node): N, or MIN:MAX for an elastic job")
      ->capture_default_str();
  app.add_option("--node-rank,--node_rank", o.nodeRank,
                 "This node's index; node 0 hosts the store. Elastic: the node's slot (default: the next free one)")
      ->capture_default_str();
  auto* rdzv = app.add_option("--rdzv-endpoint,--rdzv_endpoint", o.rdzvEndpoint,
                              "host:port of the store node 0 hosts (instead of --master-addr/--master-port); "
                              "elastic with --rdzv-backend etcd: the etcd members, h1:2379,h2:2379,h3:2379");
  auto* addr =
      app.add_option("--master-addr,--master_addr", o.masterAddr, "Host of node 0's store")->capture_default_str();
  auto* port = app.add_option("--master-port,--master_port", o.masterPort,
                              "Port of node 0's store; 0 picks a free one (one node only)")
                   ->capture_default_str();
  rdzv->excludes(addr)->excludes(port);
  app.add_option("--backend", o.backend, "gloo: start workers here; mpi: start them with mpirun")
      ->capture_default_str();
  app.add_option("--max-restarts,--max_restarts", o.maxRestarts,
                 "Restart all workers this many times after a failure (one node, or elastic; elastic: restarts "
                 "after evictions count too)")
      ->capture_default_str();
  app.add_option("--grace-period", o.gracePeriodSeconds, "Seconds between SIGTERM and SIGKILL when stopping workers")
      ->capture_default_str();
  app.add_option("--rdzv-timeout,--rdzv_timeout", o.rdzvTimeoutSeconds, "Seconds nodes > 0 (elastic: every node) wait for the store")
      ->capture_default_str();
  app.add_option("--tail-lines", o.tailLines, "Lines of a failed worker's output to repeat")->capture_default_str();
  app.add_option("--join-token-file,--join_token_file", o.joinTokenFile,
                 "Elastic: file holding the job's join secret (default: $TESSERA_JOIN_TOKEN_FILE, "
                 "$TESSERA_JOIN_TOKEN)");
  app.add_option("--advertise-host,--advertise_host", o.advertiseHost,
                 "Elastic: the address other nodes reach this node's workers at")
      ->capture_default_str();
  app.add_option("--rdzv-backend,--rdzv_backend", o.rdzvBackend,
                 "Elastic: the store, tessera (a tessera store) or etcd (an etcd v3 cluster)")
      ->capture_default_str();
  app.add_option("--rdzv-id,--rdzv_id", o.rdzvId,
                 "Elastic: the run id; keys every record, so a job restarted on the same store under a new id "
                 "does not meet the previous run's records");
  app.add_option("--rdzv-conf,--rdzv_conf", rdzvConfText,
                 "Elastic, etcd: user=U,password_file=F (default: $TESSERA_ETCD_USER, $TESSERA_ETCD_PASSWORD_FILE)");
  app.add_flag("--host-store,--host_store", o.hostStore,
               "Elastic: host the store on the --rdzv-endpoint port for as long as this tessera-run lives "
               "(a standalone tessera-store, which outlives every node, is better)");
}

// CLI11's usage line would say "[OPTIONS]" and hide that a program follows.
class UsageFormatter : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App*, std::string) const override {
    return "Usage: tessera-run [flags] PROGRAM [ARGS...]\n";
  }
};

std::variant<RunOptions, int> usageError(const CLI::App& app, const std::string& problem) {
  std::cerr << "tessera-run: " << problem << "\n\n" << app.help() << std::flush;
  return 2;
}

}  // namespace

Endpoint parseEndpoint(const std::string& text, const std::string& flag) {
  const auto bad = [&](const std::string& why) {
    return InvalidArgument(flag + " '" + text + "' " + why + ": give host:port, e.g. node0:29500 or [::1]:29500");
  };
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) throw bad("is not host:port");
  std::string host = text.substr(0, colon);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') throw bad("has an unclosed [ ]");
    host = host.substr(1, host.size() - 2);
  } else if (host.find(':') != std::string::npos) {
    throw bad("has an IPv6 address without [ ]");
  }
  const std::string portText = text.substr(colon + 1);
  int port = -1;
  auto [ptr, ec] = std::from_chars(portText.data(), portText.data() + portText.size(), port);
  if (portText.empty() || ec != std::errc() || ptr != portText.data() + portText.size() || port < 0 || port > 65535) {
    throw bad("has port '" + portText + "', not a number in 0..65535");
  }
  return {host, port};
}

Endpoint RunOptions::storeEndpoint() const {
  if (!rdzvEndpoint.empty()) return rdzvEndpoints().front();
  return {masterAddr, masterPort};
}

std::vector<Endpoint> RunOptions::rdzvEndpoints() const {
  if (rdzvEndpoint.empty()) return {{masterAddr, masterPort}};
  std::vector<Endpoint> out;
  size_t begin = 0;
  while (true) {
    const size_t comma = rdzvEndpoint.find(',', begin);
    const std::string item = rdzvEndpoint.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    REQUIRE_FLAG(!item.empty(), "--rdzv-endpoint '" << rdzvEndpoint
                                                    << "' has an empty entry: give host:port[,host:port...], "
                                                       "e.g. e1:2379,e2:2379,e3:2379");
    out.push_back(parseEndpoint(item, "--rdzv-endpoint"));
    if (comma == std::string::npos) return out;
    begin = comma + 1;
  }
}

void parseRdzvConf(const std::string& text, RunOptions& options) {
  size_t begin = 0;
  while (begin <= text.size() && !text.empty()) {
    const size_t comma = text.find(',', begin);
    const std::string item = text.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    const size_t eq = item.find('=');
    REQUIRE_FLAG(eq != std::string::npos && eq > 0,
                 "--rdzv-conf entry '" << item << "' is not key=value: give user=U,password_file=F");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    REQUIRE_FLAG(!value.empty(), "--rdzv-conf " << key << "= is empty: give a value");
    if (key == "user") {
      options.etcdUser = value;
    } else if (key == "password_file") {
      options.etcdPasswordFile = value;
    } else {
      REQUIRE_FLAG(false, "--rdzv-conf has unknown key '" << key << "' (known: user, password_file)");
    }
    if (comma == std::string::npos) break;
    begin = comma + 1;
  }
}

void parseNnodes(const std::string& text, RunOptions& options) {
  const auto bad = [&](const std::string& why) {
    return InvalidArgument("--nnodes '" + text + "' " + why +
                           ": give N (a fixed job of N nodes) or MIN:MAX (an elastic job), e.g. 2 or 1:4");
  };
  const auto number = [&](const std::string& part) {
    int value = 0;
    auto [ptr, ec] = std::from_chars(part.data(), part.data() + part.size(), value);
    if (part.empty() || ec != std::errc() || ptr != part.data() + part.size()) throw bad("is not a number");
    return value;
  };
  const auto colon = text.find(':');
  if (colon == std::string::npos) {
    options.elastic = false;
    options.nnodes = number(text);
    return;
  }
  if (text.find(':', colon + 1) != std::string::npos) throw bad("has more than one ':'");
  options.elastic = true;
  options.minNodes = number(text.substr(0, colon));
  options.maxNodes = number(text.substr(colon + 1));
  options.nnodes = options.maxNodes;
}

void RunOptions::validate() const {
  REQUIRE_FLAG(nprocPerNode >= 1, "--nproc-per-node must be >= 1, got " << nprocPerNode);
  if (elastic) {
    const std::string range = std::to_string(minNodes) + ":" + std::to_string(maxNodes);
    REQUIRE_FLAG(minNodes >= 1, "--nnodes " << range << ": MIN must be >= 1, got " << minNodes);
    REQUIRE_FLAG(minNodes <= maxNodes,
                 "--nnodes " << range << ": MIN must be <= MAX (MIN:MAX, e.g. " << maxNodes << ":" << minNodes << ")");
    REQUIRE_FLAG(!nodeRankGiven || (nodeRank >= 0 && nodeRank < maxNodes),
                 "--node-rank " << nodeRank << " is out of range for --nnodes " << range << ": use 0.." << maxNodes - 1
                                << " (the node slots), or leave it out to take the next free slot");
    REQUIRE_FLAG(backend == "gloo", "--nnodes MIN:MAX (elastic) works with --backend gloo only");
    REQUIRE_FLAG(!advertiseHost.empty(), "--advertise-host is empty: give the address other nodes reach this one at");
    REQUIRE_FLAG(rdzvBackend == "tessera" || rdzvBackend == "etcd",
                 "--rdzv-backend must be tessera or etcd, got '" << rdzvBackend << "'");
    REQUIRE_FLAG(rdzvId.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") ==
                     std::string::npos,
                 "--rdzv-id '" << rdzvId
                               << "' may hold letters, digits, '-', '_' and '.' only (it prefixes store keys)");
    if (rdzvBackend == "etcd") {
      REQUIRE_FLAG(!rdzvEndpoint.empty(),
                   "--rdzv-backend etcd needs --rdzv-endpoint listing the etcd members, e.g. e1:2379,e2:2379,e3:2379");
      REQUIRE_FLAG(!hostStore, "--host-store hosts a tessera store; with --rdzv-backend etcd the store is the etcd "
                               "cluster, which runs on its own: drop --host-store");
      REQUIRE_FLAG(etcdPasswordFile.empty() || !etcdUser.empty(),
                   "etcd auth: a password file (" << etcdPasswordFile
                                                  << ") without a user: give --rdzv-conf user=U or TESSERA_ETCD_USER");
      REQUIRE_FLAG(etcdUser.empty() || !etcdPasswordFile.empty(),
                   "etcd auth: user '" << etcdUser
                                       << "' without a password: give --rdzv-conf password_file=F or "
                                          "TESSERA_ETCD_PASSWORD_FILE");
    } else {
      REQUIRE_FLAG(rdzvEndpoints().size() == 1,
                   "--rdzv-endpoint '" << rdzvEndpoint
                                       << "' lists several endpoints; the tessera backend takes one host:port "
                                          "(a list is for --rdzv-backend etcd)");
      REQUIRE_FLAG(etcdUser.empty() && etcdPasswordFile.empty(),
                   "--rdzv-conf user/password_file are etcd's: use them with --rdzv-backend etcd (the tessera "
                   "store is guarded by --join-token-file)");
    }
  } else {
    REQUIRE_FLAG(nnodes >= 1, "--nnodes must be >= 1, got " << nnodes);
    REQUIRE_FLAG(nodeRank >= 0 && nodeRank < nnodes,
                 "--node-rank " << nodeRank << " is out of range for --nnodes " << nnodes << ": use 0.." << nnodes - 1);
    REQUIRE_FLAG(!hostStore, "--host-store works with --nnodes MIN:MAX (elastic) only");
    REQUIRE_FLAG(joinTokenFile.empty(), "--join-token-file works with --nnodes MIN:MAX (elastic) only");
    REQUIRE_FLAG(rdzvBackend == "tessera", "--rdzv-backend " << rdzvBackend
                                                             << " works with --nnodes MIN:MAX (elastic) only; a fixed "
                                                                "job rendezvouses through node 0's store");
    REQUIRE_FLAG(rdzvId.empty(), "--rdzv-id works with --nnodes MIN:MAX (elastic) only");
    REQUIRE_FLAG(etcdUser.empty() && etcdPasswordFile.empty(),
                 "--rdzv-conf works with --nnodes MIN:MAX --rdzv-backend etcd only");
    REQUIRE_FLAG(rdzvEndpoints().size() == 1,
                 "--rdzv-endpoint '" << rdzvEndpoint << "' lists several endpoints; a fixed job takes one host:port");
  }
  REQUIRE_FLAG(backend == "gloo" || backend == "mpi", "--backend must be gloo or mpi, got '" << backend << "'");
  REQUIRE_FLAG(backend != "mpi" || nnodes == 1,
               "--backend mpi starts one mpirun on this node; for several nodes run mpirun with a hostfile");
  REQUIRE_FLAG(maxRestarts >= 0, "--max-restarts must be >= 0, got " << maxRestarts);
  REQUIRE_FLAG(maxRestarts == 0 || nnodes == 1 || elastic,
               "--max-restarts works with --nnodes 1 or MIN:MAX only (restarting one node of a fixed job alone "
               "would desynchronise it)");
  REQUIRE_FLAG(gracePeriodSeconds >= 0, "--grace-period must be >= 0 seconds, got " << gracePeriodSeconds);
  REQUIRE_FLAG(rdzvTimeoutSeconds > 0, "--rdzv-timeout must be > 0 seconds, got " << rdzvTimeoutSeconds);
  REQUIRE_FLAG(tailLines >= 0, "--tail-lines must be >= 0, got " << tailLines);
  const std::string flag = rdzvEndpoint.empty() ? "--master-port" : "--rdzv-endpoint";
  for (const Endpoint& store : rdzvEndpoints()) {
    REQUIRE_FLAG(store.port >= 0 && store.port <= 65535, flag << " " << store.port << " is not a port: use 0..65535");
    REQUIRE_FLAG(!store.host.empty(), "the store host is empty: give --master-addr or --rdzv-endpoint host:port");
    REQUIRE_FLAG(store.port != 0 || !elastic,
                 flag << " 0 (any free port) does not work with --nnodes MIN:MAX: every node, and every node that "
                         "joins later, must know the store's port");
  }
  const Endpoint store = storeEndpoint();
  REQUIRE_FLAG(store.port != 0 || nnodes == 1,
               flag << " 0 (any free port) works with --nnodes 1 only: other nodes could not learn the port");
  REQUIRE_FLAG(!command.empty(), "missing the program to run: tessera-run [flags] PROGRAM [ARGS...]");
  // Parsing stops at the first word it does not know, so a misspelt flag arrives here as the "program".
  REQUIRE_FLAG(command[0].empty() || command[0][0] != '-',
               "unknown flag '" << command[0] << "' (tessera-run's flags go before the program; see --help)");
  const char* path = std::getenv("PATH");
  REQUIRE_FLAG(!findProgram(command[0], path ? path : "").empty(),
               "program '" << command[0] << "' not found or not executable (give its path, or put it on PATH)");
}

std::variant<RunOptions, int> parseRunOptions(int argc, char** argv) {
  RunOptions options;
  std::string nnodesText = "1";
  std::string rdzvConfText;
  CLI::App app("tessera-run: start the workers of a tessera job on this node", "tessera-run");
  app.formatter(std::make_shared<UsageFormatter>());
  app.footer(kFooter);
  addFlags(app, options, nnodesText, rdzvConfText);
  // Everything from the first positional on is the worker's command line,
  // flags included: `tessera-run -n 2 ./train --lr 1` passes --lr to train.
  app.prefix_command();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help() << std::flush;
    return 0;
  } catch (const CLI::ParseError& e) {
    return usageError(app, e.what());
  }
  options.command = app.remaining();
  if (!options.command.empty() && options.command.front() == "--") options.command.erase(options.command.begin());
  try {
    parseNnodes(nnodesText, options);
    parseRdzvConf(rdzvConfText, options);
    // etcd's credentials from the environment where --rdzv-conf gives none
    // (only for etcd: a tessera job ignores them, they may be set for another job).
    if (options.rdzvBackend == "etcd") {
      const char* user = std::getenv("TESSERA_ETCD_USER");
      const char* file = std::getenv("TESSERA_ETCD_PASSWORD_FILE");
      if (options.etcdUser.empty() && user != nullptr) options.etcdUser = user;
      if (options.etcdPasswordFile.empty() && file != nullptr) options.etcdPasswordFile = file;
    }
    options.nodeRankGiven = app.count("--node-rank") > 0;
    options.validate();
  } catch (const Error& e) {
    return usageError(app, e.what());
  }
  return options;
}

}  // namespace tessera::launcher
