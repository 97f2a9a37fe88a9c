// tessera::init(): launch detection (launch_info.cc) -> store -> world
// communicator. Deliberately thin: each step's policy lives in the layer that
// owns it (the store in comm/store, the backends in comm/gloo and comm/mpi).
#include "tessera/launcher/init.h"

#include <unistd.h>

#include "tessera/comm/gloo.h"
#include "tessera/comm/mpi.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera {
namespace {

using launcher::EnvMap;
using launcher::LaunchInfo;

bool envSet(const EnvMap& env, const char* name) {
  auto it = env.find(name);
  return it != env.end() && !it->second.empty();
}

// The store every rank rendezvouses through. Under tessera-run each restart
// attempt gets its own key space, so keys a failed attempt left behind cannot
// satisfy the next attempt's waits.
comm::StorePtr openStore(const LaunchInfo& info, const InitOptions& options) {
  if (info.masterPort == 0) {
    // No address: a world of 1 (in-process keys suffice) or MPI, which needs no store.
    return info.worldSize == 1 ? comm::makeHashStore() : nullptr;
  }
  comm::TcpStoreOptions storeOptions;
  storeOptions.host = info.masterAddr;
  storeOptions.port = static_cast<uint16_t>(info.masterPort);
  storeOptions.isServer = info.rank == 0 && !info.storeHostedByLauncher;
  storeOptions.timeout = options.storeTimeout;
  auto store = std::make_shared<comm::TcpStore>(storeOptions);
  if (info.launchedBy != "tessera-run") return store;
  return comm::makePrefixStore("attempt" + std::to_string(info.restartCount), store);
}

// Gloo advertises 127.0.0.1 by default, which peers on other nodes cannot
// reach; across nodes fall back to this machine's host name, as torch does.
comm::GlooOptions glooOptions(const LaunchInfo& info, const InitOptions& options, const EnvMap& env) {
  comm::GlooOptions gloo;
  gloo.name = options.worldName;
  gloo.timeout = options.timeout;
  gloo.hostname = options.glooHostname;
  gloo.interface = options.glooInterface;
  const bool configured = !gloo.hostname.empty() || !gloo.interface.empty() ||
                          envSet(env, launcher::env::kGlooHostname) || envSet(env, launcher::env::kGlooInterface);
  if (!configured && info.multiNode()) {
    char name[256] = {};
    if (gethostname(name, sizeof(name) - 1) == 0) gloo.hostname = name;
  }
  return gloo;
}

comm::CommPtr makeWorld(const LaunchInfo& info, const InitOptions& options, const EnvMap& env,
                        const comm::StorePtr& store) {
  if (info.backend == "single") {
    comm::CommPtr world = comm::makeSingleRankCommunicator(options.worldName);
    world->setTimeout(options.timeout);
    return world;
  }
  if (info.backend == "mpi") {
    comm::MpiOptions mpi;
    mpi.name = options.worldName;
    mpi.timeout = options.timeout;
    comm::CommPtr world = comm::makeMpiWorldCommunicator(mpi);
    // MPI numbers ranks itself; a mismatch means the environment lied.
    TESSERA_CHECK(world->rank() == info.rank && world->size() == info.worldSize,
                  "MPI reports rank " << world->rank() << " of " << world->size() << " but the environment says "
                                      << info.describe() << ": was this process started by a different mpirun?");
    return world;
  }
  return comm::makeGlooCommunicator(store, options.worldName, info.rank, info.worldSize,
                                    glooOptions(info, options, env));
}

}  // namespace

void InitOptions::validate() const {
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "gloo" || backend == "mpi", "backend",
                       "must be auto, gloo or mpi, got '" << backend << "'");
  TESSERA_CHECK_CONFIG(timeout.count() > 0, "timeout", "must be positive, got " << timeout.count() << " ms");
  TESSERA_CHECK_CONFIG(storeTimeout.count() > 0, "storeTimeout",
                       "must be positive, got " << storeTimeout.count() << " ms");
  TESSERA_CHECK_CONFIG(!worldName.empty(), "worldName", "must not be empty (it names the world in errors)");
}

DistributedContext init(const InitOptions& options) { return init(options, launcher::currentEnvironment()); }

DistributedContext init(const InitOptions& options, const EnvMap& env) {
  options.validate();
  DistributedContext ctx;
  ctx.info = launcher::detectLaunch(env, options.backend, comm::mpiBackendBuilt());
  // Before anything can fail across ranks, so every later line says whose it is.
  setLogRank(ctx.info.rank);
  if (ctx.info.rank == 0) {
    TESSERA_LOG(kInfo) << "tessera::init: " << ctx.info.describe();
  } else {
    TESSERA_LOG(kDebug) << "tessera::init: " << ctx.info.describe();
  }
  ctx.store = openStore(ctx.info, options);
  ctx.world = makeWorld(ctx.info, options, env, ctx.store);
  return ctx;
}

}  // namespace tessera
