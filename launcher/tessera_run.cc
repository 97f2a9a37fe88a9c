// tessera-run: starts the workers of a tessera job on this node, like torchrun.
//
//   tessera-run --nproc-per-node 4 ./train --steps 100
//
// Gloo (default): node 0's tessera-run hosts the TCP store for the whole job;
// each node starts its workers with the variables tessera::init() reads
// (launch_info.h), prefixes their output with "[rank N] ", and stops the job
// when one fails. MPI: hands the workers to `mpirun -np N` and supervises it.
// Elastic (--nnodes MIN:MAX): runs one node of a job whose nodes may leave
// and join, through a tessera store (elastic_node.h).
// What it does not do: the elastic protocol itself (parallel/elastic, run by
// the workers), or scheduling across machines (one tessera-run per node).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <sstream>
#include <thread>

#include "launcher/elastic_node.h"
#include "launcher/job_board.h"
#include "launcher/run_options.h"
#include "launcher/supervisor.h"
#include "launcher/worker_process.h"
#include "tessera/comm/mpi.h"
#include "tessera/comm/store.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/launcher/launch_info.h"

namespace tessera::launcher {
namespace {

// Workers' pipes are created after this: if tessera-run started with a closed
// stdin/stdout/stderr, a pipe could land on fd 0-2 and be clobbered by dup2.
void ensureStandardFds() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
  }
}

// The one line a user reads first: who runs where, and through which store.
std::string summaryLine(const RunOptions& options, const Endpoint& store, const std::string& threads) {
  std::ostringstream out;
  if (options.nnodes > 1) {
    const int firstRank = options.nodeRank * options.nprocPerNode;
    out << "node " << options.nodeRank << " of " << options.nnodes << ": ranks " << firstRank << "-"
        << firstRank + options.nprocPerNode - 1 << " of ";
  }
  out << "world size " << options.worldSize() << " (" << plural(static_cast<size_t>(options.nnodes), "node") << " x "
      << plural(static_cast<size_t>(options.nprocPerNode), "worker") << "), backend gloo, store tcp://" << store.host
      << ":" << store.port << (options.nodeRank == 0 ? " hosted here" : " on node 0");
  if (!threads.empty()) out << ", OMP_NUM_THREADS=" << threads;
  out << "; running " << joinWords(options.command);
  return out.str();
}

SupervisorOptions supervisorOptions(const RunOptions& options) {
  SupervisorOptions out;
  out.gracePeriod = std::chrono::milliseconds(static_cast<int64_t>(options.gracePeriodSeconds * 1000));
  out.maxRestarts = options.maxRestarts;
  out.tailLines = static_cast<size_t>(options.tailLines);
  return out;
}

// The workers of one attempt on this node: ranks nodeRank*N .. nodeRank*N+N-1.
std::vector<WorkerSpec> glooWorkers(const RunOptions& options, const EnvMap& base, const Endpoint& store, int attempt) {
  std::vector<WorkerSpec> workers;
  for (int local = 0; local < options.nprocPerNode; ++local) {
    const int rank = options.nodeRank * options.nprocPerNode + local;
    EnvMap env = base;
    env[env::kRank] = std::to_string(rank);
    env[env::kWorldSize] = std::to_string(options.worldSize());
    env[env::kLocalRank] = std::to_string(local);
    env[env::kLocalWorldSize] = std::to_string(options.nprocPerNode);
    env[env::kGroupRank] = std::to_string(options.nodeRank);
    env[env::kMasterAddr] = store.host;
    env[env::kMasterPort] = std::to_string(store.port);
    env[env::kBackend] = "gloo";
    env[env::kLauncher] = "tessera-run";
    env[env::kStoreHosted] = "1";
    env[env::kRestartCount] = std::to_string(attempt);
    const std::string label = "rank " + std::to_string(rank);
    workers.push_back({label, "[" + label + "] ", options.command, toEnvEntries(env)});
  }
  return workers;
}

int runWithGloo(const RunOptions& options) {
  Endpoint endpoint = options.storeEndpoint();
  const bool hostsStore = options.nodeRank == 0;
  comm::TcpStoreOptions storeOptions;
  storeOptions.host = endpoint.host;
  storeOptions.port = static_cast<uint16_t>(endpoint.port);
  storeOptions.isServer = hostsStore;
  storeOptions.timeout = std::chrono::milliseconds(static_cast<int64_t>(options.rdzvTimeoutSeconds * 1000));
  // Node 0: lives until the job ends, so workers (and restarts) can always rendezvous.
  auto store = std::make_shared<comm::TcpStore>(storeOptions);
  endpoint.port = store->port();  // the real one when --master-port 0

  EnvMap base = currentEnvironment();
  const std::string threads = shareCores(base, options.nprocPerNode);
  // Workers write through our pipes, so they cannot see the terminal; tell
  // them a person is watching, so that progress lines are printed.
  if (isatty(STDERR_FILENO) && base.count("TESSERA_PROGRESS") == 0) base["TESSERA_PROGRESS"] = "1";
  say(summaryLine(options, endpoint, threads));

  SignalPipe signals;
  std::optional<JobBoard> board;
  if (options.nnodes > 1) board.emplace(store, options.nodeRank, options.nnodes);
  Supervisor supervisor(
      supervisorOptions(options), [&](int attempt) { return glooWorkers(options, base, endpoint, attempt); }, signals,
      board ? &*board : nullptr);
  return supervisor.run().exitCode;
}

int runWithMpirun(const RunOptions& options) {
  EnvMap env = currentEnvironment();
  const std::string mpirun = findProgram("mpirun", env.count("PATH") ? env["PATH"] : "");
  if (mpirun.empty()) {
    say("--backend mpi needs mpirun, which is not on PATH: install openmpi-bin (scripts/setup.sh) or use "
        "--backend gloo");
    return 1;
  }
  if (!comm::mpiBackendBuilt()) {
    say("--backend mpi: this tessera was built without MPI; install libopenmpi-dev (scripts/setup.sh), "
        "reconfigure with -DTESSERA_WITH_MPI=ON, or use --backend gloo");
    return 1;
  }
  // Our own variables from an enclosing launch would override what mpirun says (launch_info.h).
  for (const char* stale : {env::kLauncher, env::kStoreHosted, env::kRestartCount, env::kRank, env::kWorldSize,
                            env::kLocalRank, env::kLocalWorldSize, env::kGroupRank}) {
    env.erase(stale);
  }
  env[env::kBackend] = "mpi";
  const std::string threads = shareCores(env, options.nprocPerNode);
  std::vector<std::string> argv = {mpirun, "--oversubscribe"};
  // Containers and CI often run as root, which Open MPI refuses without this.
  if (geteuid() == 0) argv.push_back("--allow-run-as-root");
  for (const std::string& arg :
       {std::string("-np"), std::to_string(options.nprocPerNode), std::string("-x"), std::string(env::kBackend)}) {
    argv.push_back(arg);
  }
  if (!threads.empty()) argv.insert(argv.end(), {"-x", "OMP_NUM_THREADS"});
  argv.insert(argv.end(), options.command.begin(), options.command.end());
  say("world size " + std::to_string(options.nprocPerNode) + ", backend mpi: running " + joinWords(argv));

  SignalPipe signals;
  Supervisor supervisor(
      supervisorOptions(options),
      [&](int) {
        return std::vector<WorkerSpec>{{"mpirun", "", argv, toEnvEntries(env)}};
      },
      signals, nullptr);
  return supervisor.run().exitCode;
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  using namespace tessera::launcher;
  ensureStandardFds();
  tessera::setLogRank(-1);
  auto parsed = parseRunOptions(argc, argv);
  if (const int* exitCode = std::get_if<int>(&parsed)) return *exitCode;
  const RunOptions& options = std::get<RunOptions>(parsed);
  try {
    if (options.elastic) return runElasticNode(options);
    return options.backend == "mpi" ? runWithMpirun(options) : runWithGloo(options);
  } catch (const std::exception& e) {
    say(std::string("error: ") + e.what());
    return 1;
  }
}
