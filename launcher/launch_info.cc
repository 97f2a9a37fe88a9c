// detectLaunch(): reading each launcher's environment variables into one
// LaunchInfo. Pure functions of an EnvMap, so every launcher's conventions
// are unit-tested (tests/launcher/launch_info_test.cc) without running it.
#include "tessera/launcher/launch_info.h"

#include <charconv>
#include <optional>
#include <sstream>

#include "tessera/core/error.h"

extern char** environ;

namespace tessera::launcher {
namespace {

const std::string* lookup(const EnvMap& env, const std::string& name) {
  auto it = env.find(name);
  return it == env.end() || it->second.empty() ? nullptr : &it->second;
}

bool envEquals(const EnvMap& env, const std::string& name, const std::string& expected) {
  const std::string* value = lookup(env, name);
  return value != nullptr && *value == expected;
}

// The whole value must be a decimal integer: "4x" or " 4" are typos, not 4.
std::optional<int> envInt(const EnvMap& env, const std::string& name) {
  const std::string* text = lookup(env, name);
  if (text == nullptr) return std::nullopt;
  int value = 0;
  const char* end = text->data() + text->size();
  auto [ptr, ec] = std::from_chars(text->data(), end, value);
  if (ec != std::errc() || ptr != end) {
    throw InvalidArgument(name + "='" + *text + "' is not an integer: set " + name +
                          " to a decimal number (or unset it)");
  }
  return value;
}

int requireInt(const EnvMap& env, const std::string& name, const std::string& why) {
  auto value = envInt(env, name);
  if (!value) throw InvalidArgument(name + " is not set, but " + why + ": export " + name + " as well");
  return *value;
}

// Rank-like variables: rank in [0, size).
void checkRank(const char* rankName, int rank, const char* sizeName, int size) {
  if (size < 1) {
    throw InvalidArgument(std::string(sizeName) + "=" + std::to_string(size) + " must be >= 1");
  }
  if (rank < 0 || rank >= size) {
    throw InvalidArgument(std::string(rankName) + "=" + std::to_string(rank) + " is out of range for " + sizeName +
                          "=" + std::to_string(size) + ": " + rankName + " must be in [0, " + std::to_string(size) +
                          "); check what the launcher exports");
  }
}

// Local size and node index for launchers that do not state them: assume
// every node runs the same number of processes, ranks numbered node by node.
void fillLocalDefaults(LaunchInfo& info, std::optional<int> localRank, std::optional<int> localSize,
                       std::optional<int> nodeRank) {
  info.localWorldSize = localSize.value_or(info.worldSize);
  if (info.localWorldSize < 1) {
    throw InvalidArgument("the local world size must be >= 1, got " + std::to_string(info.localWorldSize));
  }
  info.localRank = localRank.value_or(info.rank % info.localWorldSize);
  info.nodeRank = nodeRank.value_or(info.rank / info.localWorldSize);
}

// tessera-run and torchrun both export RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE and GROUP_RANK.
LaunchInfo fromRankVariables(const EnvMap& env, const std::string& launchedBy) {
  LaunchInfo info;
  info.launchedBy = launchedBy;
  const bool hasRank = lookup(env, env::kRank) != nullptr;
  info.worldSize = requireInt(env, env::kWorldSize,
                              hasRank ? "RANK is"
                                      : "the launcher did not say how many "
                                        "processes the job has");
  info.rank = requireInt(env, env::kRank, "WORLD_SIZE=" + std::to_string(info.worldSize) + " is");
  checkRank(env::kRank, info.rank, env::kWorldSize, info.worldSize);
  fillLocalDefaults(info, envInt(env, env::kLocalRank), envInt(env, env::kLocalWorldSize),
                    envInt(env, env::kGroupRank));
  checkRank(env::kLocalRank, info.localRank, env::kLocalWorldSize, info.localWorldSize);
  // torchrun's agent hosts a c10d TCPStore too, and says so with this flag.
  info.storeHostedByLauncher =
      envEquals(env, env::kStoreHosted, "1") || envEquals(env, "TORCHELASTIC_USE_AGENT_STORE", "True");
  info.restartCount = envInt(env, env::kRestartCount).value_or(0);
  return info;
}

// Open MPI states no node index; with mpirun's default by-slot mapping, ranks
// fill one node before the next, so rank / local size is the node.
LaunchInfo fromMpirun(const EnvMap& env) {
  LaunchInfo info;
  info.launchedBy = "mpirun";
  info.worldSize = requireInt(env, "OMPI_COMM_WORLD_SIZE", "mpirun started this process");
  info.rank = requireInt(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE is");
  checkRank("OMPI_COMM_WORLD_RANK", info.rank, "OMPI_COMM_WORLD_SIZE", info.worldSize);
  fillLocalDefaults(info, envInt(env, "OMPI_COMM_WORLD_LOCAL_RANK"), envInt(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
                    std::nullopt);
  checkRank("OMPI_COMM_WORLD_LOCAL_RANK", info.localRank, "OMPI_COMM_WORLD_LOCAL_SIZE", info.localWorldSize);
  return info;
}

LaunchInfo fromSlurm(const EnvMap& env) {
  LaunchInfo info;
  info.launchedBy = "slurm";
  info.worldSize = requireInt(env, "SLURM_NTASKS", "SLURM_PROCID is");
  info.rank = requireInt(env, "SLURM_PROCID", "SLURM_NTASKS is");
  checkRank("SLURM_PROCID", info.rank, "SLURM_NTASKS", info.worldSize);
  const std::optional<int> nodeId = envInt(env, "SLURM_NODEID");
  // SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node; otherwise the
  // per-node counts come compressed in SLURM_TASKS_PER_NODE.
  std::optional<int> localSize = envInt(env, "SLURM_NTASKS_PER_NODE");
  if (!localSize) {
    if (const std::string* list = lookup(env, "SLURM_TASKS_PER_NODE")) {
      localSize = parseSlurmTasksPerNode(*list, nodeId.value_or(0));
    }
  }
  fillLocalDefaults(info, envInt(env, "SLURM_LOCALID"), localSize, nodeId);
  checkRank("SLURM_LOCALID", info.localRank, "SLURM_NTASKS_PER_NODE", info.localWorldSize);
  return info;
}

LaunchInfo detectLauncher(const EnvMap& env) {
  if (envEquals(env, env::kLauncher, "tessera-run")) return fromRankVariables(env, "tessera-run");
  if (lookup(env, "OMPI_COMM_WORLD_SIZE")) return fromMpirun(env);
  if (lookup(env, "SLURM_PROCID") && lookup(env, "SLURM_NTASKS")) return fromSlurm(env);
  if (lookup(env, env::kRank) || lookup(env, env::kWorldSize)) return fromRankVariables(env, "env");
  return LaunchInfo{};
}

bool knownBackend(const std::string& name) {
  return name == "auto" || name == "gloo" || name == "mpi" || name == "nccl";
}

std::string resolveBackend(const LaunchInfo& info, const EnvMap& env, const std::string& requested, bool mpiBuilt,
                           bool cuda) {
  if (!knownBackend(requested)) {
    throw InvalidArgument("backend '" + requested + "' is not one of auto, gloo, mpi, nccl");
  }
  std::string backend = requested;
  // On a CUDA device only NCCL moves the tensors; tessera-run exports
  // TESSERA_BACKEND=gloo for its own store, which does not apply here.
  if (backend == "auto" && cuda) return info.worldSize == 1 ? "single" : "nccl";
  if (backend == "auto") {
    if (const std::string* fromEnv = lookup(env, env::kBackend)) backend = *fromEnv;
  }
  if (!knownBackend(backend)) {
    throw InvalidArgument(std::string(env::kBackend) + "='" + backend +
                          "' is not a backend: set it to gloo, mpi or nccl, or unset it to choose automatically");
  }
  if (backend == "auto") {
    if (info.worldSize == 1) return "single";
    return info.launchedBy == "mpirun" && mpiBuilt ? "mpi" : "gloo";
  }
  if (backend == "mpi" && info.launchedBy != "mpirun" && info.worldSize > 1) {
    throw InvalidArgument("backend mpi needs processes started by mpirun, but this one was started by " +
                          info.launchedBy + ": launch with `tessera-run --backend mpi` or `mpirun -np " +
                          std::to_string(info.worldSize) + "`, or use TESSERA_BACKEND=gloo");
  }
  return backend;
}

// Where the TCP store lives. Slurm jobs rarely export MASTER_*, so they fall
// back to the node srun was launched from and a port derived from the job id
// (the same on every task of the job, different between concurrent jobs).
void resolveStoreAddress(LaunchInfo& info, const EnvMap& env) {
  if (const std::string* addr = lookup(env, env::kMasterAddr)) {
    info.masterAddr = *addr;
  } else if (info.launchedBy == "slurm" && lookup(env, "SLURM_LAUNCH_NODE_IPADDR")) {
    info.masterAddr = env.at("SLURM_LAUNCH_NODE_IPADDR");
  } else if (!info.multiNode()) {
    info.masterAddr = "127.0.0.1";
  }
  info.masterPort = envInt(env, env::kMasterPort).value_or(0);
  if (lookup(env, env::kMasterPort) && (info.masterPort < 1 || info.masterPort > 65535)) {
    throw InvalidArgument("MASTER_PORT=" + env.at(env::kMasterPort) + " is not a usable port: use 1..65535");
  }
  if (info.masterPort == 0 && info.launchedBy == "slurm") {
    if (auto jobId = envInt(env, "SLURM_JOB_ID")) info.masterPort = 10000 + *jobId % 20000;
  }
  const bool overStore = info.backend == "gloo" || info.backend == "nccl";
  const bool needsStore = (overStore && info.worldSize > 1) || info.storeHostedByLauncher;
  if (!needsStore) return;
  if (info.masterPort == 0) {
    throw InvalidArgument("MASTER_PORT is not set, but a " + std::string(info.backend == "nccl" ? "NCCL" : "Gloo") +
                          " world of " + std::to_string(info.worldSize) +
                          " processes meets through a TCP store: export MASTER_PORT=<free port> (and "
                          "MASTER_ADDR=<host of rank 0>) on every rank, or start the job with tessera-run");
  }
  if (info.masterAddr.empty()) {
    throw InvalidArgument("MASTER_ADDR is not set, but the job spans nodes (" + std::to_string(info.localWorldSize) +
                          " of " + std::to_string(info.worldSize) +
                          " processes per node): export MASTER_ADDR=<host of rank 0> on every rank");
  }
}

}  // namespace

EnvMap currentEnvironment() {
  EnvMap env;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string text(*entry);
    const auto eq = text.find('=');
    if (eq != std::string::npos) env[text.substr(0, eq)] = text.substr(eq + 1);
  }
  return env;
}

std::string LaunchInfo::describe() const {
  std::ostringstream out;
  out << "rank " << rank << "/" << worldSize << " (local " << localRank << "/" << localWorldSize << ", node "
      << nodeRank << "), backend " << backend;
  if (masterPort != 0) {
    out << ", store " << masterAddr << ":" << masterPort << " hosted by "
        << (storeHostedByLauncher ? "the launcher" : "rank 0");
  }
  out << ", launched by " << launchedBy;
  if (restartCount > 0) out << " (restart " << restartCount << ")";
  return out.str();
}

LaunchInfo detectLaunch(const EnvMap& env, const std::string& requestedBackend, bool mpiBuilt, bool cuda) {
  LaunchInfo info = detectLauncher(env);
  info.backend = resolveBackend(info, env, requestedBackend, mpiBuilt, cuda);
  resolveStoreAddress(info, env);
  return info;
}

int parseSlurmTasksPerNode(const std::string& text, int nodeIndex) {
  // Grammar: item ("," item)*, item = count ["(x" repeat ")"].
  auto malformed = [&](const std::string& why) {
    return InvalidArgument("SLURM_TASKS_PER_NODE='" + text + "' " + why +
                           ": expected a list like '2(x3),1', or set SLURM_NTASKS_PER_NODE");
  };
  if (nodeIndex < 0) throw malformed("cannot be indexed by node " + std::to_string(nodeIndex));
  std::istringstream in(text);
  std::string item;
  int node = 0;
  while (std::getline(in, item, ',')) {
    int count = 0;
    int repeat = 1;
    const auto paren = item.find('(');
    const std::string countText = item.substr(0, paren);
    auto [ptr, ec] = std::from_chars(countText.data(), countText.data() + countText.size(), count);
    if (ec != std::errc() || ptr != countText.data() + countText.size() || count < 1) {
      throw malformed("has a bad count '" + countText + "'");
    }
    if (paren != std::string::npos) {
      const std::string tail = item.substr(paren);
      if (tail.size() < 4 || tail.compare(0, 2, "(x") != 0 || tail.back() != ')') {
        throw malformed("has a bad repeat '" + tail + "'");
      }
      const std::string repeatText = tail.substr(2, tail.size() - 3);
      auto [p2, e2] = std::from_chars(repeatText.data(), repeatText.data() + repeatText.size(), repeat);
      if (e2 != std::errc() || p2 != repeatText.data() + repeatText.size() || repeat < 1) {
        throw malformed("has a bad repeat '" + tail + "'");
      }
    }
    if (nodeIndex < node + repeat) return count;
    node += repeat;
  }
  throw malformed("lists only " + std::to_string(node) + " nodes, not node " + std::to_string(nodeIndex));
}

}  // namespace tessera::launcher
