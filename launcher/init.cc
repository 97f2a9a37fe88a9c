// tessera::init(): launch detection (launch_info.cc) -> store -> world
// communicator. Deliberately thin: each step's policy lives in the layer that
// owns it (the store in comm/store, the backends in comm/gloo and comm/mpi).
#include "tessera/launcher/init.h"

#include <unistd.h>

#include "tessera/comm/gloo.h"
#include "tessera/comm/mpi.h"
#include "tessera/comm/nccl.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/train/train_config.h"

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
                        const comm::StorePtr& store, c10::Device device) {
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
  if (info.backend == "nccl") {
    comm::NcclOptions nccl;
    nccl.name = options.worldName;
    nccl.timeout = options.timeout;
    nccl.device = device.index();
    return comm::makeNcclCommunicator(store, options.worldName, info.rank, info.worldSize, nccl);
  }
  return comm::makeGlooCommunicator(store, options.worldName, info.rank, info.worldSize,
                                    glooOptions(info, options, env));
}

// NCCL takes CUDA tensors only; the CPU-side agreements (checkpoints,
// metrics tables) get a Gloo group of the same ranks, under its own prefix.
comm::CommPtr makeHostWorld(const LaunchInfo& info, const InitOptions& options, const EnvMap& env,
                            const comm::StorePtr& store) {
  if (info.backend != "nccl") return nullptr;  // DistributedContext::host() is the world itself
  if (info.worldSize == 1) return comm::makeSingleRankCommunicator(options.worldName + "-host");
  // A build without Gloo (PyTorch's wheel only) has no CPU group: host() is
  // then the NCCL world, and a CPU-tensor agreement fails naming the tensor's
  // device. Its users (checkpoints, the MoE load table) are off there anyway.
  if (!comm::glooBackendBuilt()) return nullptr;
  const std::string name = options.worldName + "-host";
  comm::GlooOptions gloo = glooOptions(info, options, env);
  gloo.name = name;
  return comm::makeGlooCommunicator(store, name, info.rank, info.worldSize, gloo);
}

// The backend against the device, before any communicator exists: the same
// error on every rank. (tessera-train checked the config already; this is
// for TESSERA_BACKEND and other callers of init().)
void checkBackendFitsDevice(const LaunchInfo& info, const InitOptions& options, c10::Device device) {
  if (info.backend == "nccl") {
    TESSERA_CHECK_CONFIG(device.is_cuda(), options.backendKey,
                         "the backend is \"nccl\", which moves CUDA tensors, but " << options.deviceKey << " is \""
                             << options.device << "\": set " << options.deviceKey << " = \"cuda\"");
    TESSERA_CHECK_CONFIG(comm::ncclBackendBuilt(), options.backendKey,
                         "the backend is \"nccl\", but this build of tessera has no NCCL: install the CUDA "
                         "toolkit and NCCL and reconfigure with -DTESSERA_WITH_NCCL=ON");
  } else if (device.is_cuda() && info.backend != "single") {
    throw ConfigError(options.backendKey, "the backend is \"" + info.backend + "\", which moves CPU tensors, but " +
                                              options.deviceKey + " is \"" + options.device + "\": use \"nccl\" or \"auto\"");
  }
}

}  // namespace

void InitOptions::validate() const {
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "gloo" || backend == "mpi" || backend == "nccl", backendKey,
                       "must be auto, gloo, mpi or nccl, got '" << backend << "'");
  parseDeviceSpec(device, deviceKey);
  TESSERA_CHECK_CONFIG(timeout.count() > 0, "timeout", "must be positive, got " << timeout.count() << " ms");
  TESSERA_CHECK_CONFIG(storeTimeout.count() > 0, "storeTimeout",
                       "must be positive, got " << storeTimeout.count() << " ms");
  TESSERA_CHECK_CONFIG(!worldName.empty(), "worldName", "must not be empty (it names the world in errors)");
}

DistributedContext init(const InitOptions& options) { return init(options, launcher::currentEnvironment()); }

DistributedContext init(const InitOptions& options, const EnvMap& env) {
  options.validate();
  DistributedContext ctx;
  ctx.info = launcher::detectLaunch(env, options.backend, comm::mpiBackendBuilt(),
                                    parseDeviceSpec(options.device, options.deviceKey).cuda);
  // Before anything can fail across ranks, so every later line says whose it is.
  setLogRank(ctx.info.rank);
  if (ctx.info.rank == 0) {
    TESSERA_LOG(kInfo) << "tessera::init: " << ctx.info.describe();
  } else {
    TESSERA_LOG(kDebug) << "tessera::init: " << ctx.info.describe();
  }
  ctx.device = resolveDevice(options.device, ctx.info.localRank, options.deviceKey);  // local: the same on every rank
  checkBackendFitsDevice(ctx.info, options, ctx.device);
  ctx.store = openStore(ctx.info, options);
  ctx.world = makeWorld(ctx.info, options, env, ctx.store, ctx.device);
  ctx.hostWorld = makeHostWorld(ctx.info, options, env, ctx.store);  // collective (Gloo rendezvous)
  return ctx;
}

}  // namespace tessera
