// LaunchInfo: who started this process and where it sits in the job.
//
// Every way of starting tessera workers (tessera-run, mpirun, Slurm's srun, a
// torchrun-style environment, or a plain single process) describes rank,
// world size and rendezvous address in its own environment variables. This
// header turns one set of environment variables into one LaunchInfo, as a pure
// function of a map, so each launcher's conventions are unit-tested without
// being that launcher. It does not create stores or communicators; that is
// tessera::init() (init.h).
//
// Detection order, first match wins (and why):
//   1. TESSERA_LAUNCHER=tessera-run: our own launcher. Checked first because
//      `srun tessera-run ...` leaves SLURM_* in every worker's environment.
//   2. OMPI_COMM_WORLD_SIZE: Open MPI's mpirun.
//   3. SLURM_PROCID + SLURM_NTASKS: srun.
//   4. RANK / WORLD_SIZE: torchrun or a hand-written environment.
//   5. none of these: a single process, world of 1.
#pragma once

#include <map>
#include <string>

namespace tessera::launcher {

// Environment variables as name -> value.
using EnvMap = std::map<std::string, std::string>;

// The environment of this process (environ), as an EnvMap.
EnvMap currentEnvironment();

// Names of the variables tessera-run sets in each worker and init() reads.
// One list, so the launcher and the worker cannot drift apart.
namespace env {
inline constexpr const char* kRank = "RANK";
inline constexpr const char* kWorldSize = "WORLD_SIZE";
inline constexpr const char* kLocalRank = "LOCAL_RANK";
inline constexpr const char* kLocalWorldSize = "LOCAL_WORLD_SIZE";
inline constexpr const char* kGroupRank = "GROUP_RANK";  // the node's rank (torchrun's name)
inline constexpr const char* kMasterAddr = "MASTER_ADDR";
inline constexpr const char* kMasterPort = "MASTER_PORT";
inline constexpr const char* kBackend = "TESSERA_BACKEND";    // gloo | mpi | nccl
inline constexpr const char* kLauncher = "TESSERA_LAUNCHER";  // "tessera-run" under tessera-run
// "1" when a launcher hosts the TCP store at MASTER_ADDR:MASTER_PORT, so rank 0
// must connect to it instead of hosting one itself.
inline constexpr const char* kStoreHosted = "TESSERA_STORE_HOSTED";
// How many times tessera-run restarted the workers (0 on the first attempt).
inline constexpr const char* kRestartCount = "TESSERA_RESTART_COUNT";
// Gloo's address overrides, read by the Gloo backend (comm/gloo.h).
inline constexpr const char* kGlooHostname = "TESSERA_GLOO_HOSTNAME";
inline constexpr const char* kGlooInterface = "TESSERA_GLOO_IFNAME";
}  // namespace env

// The port tessera-run and init() use when none is given (torchrun's).
inline constexpr int kDefaultMasterPort = 29500;

struct LaunchInfo {
  int rank = 0;            // this process's rank in the world, in [0, worldSize)
  int worldSize = 1;       // number of processes in the job
  int localRank = 0;       // rank among the processes of this node, in [0, localWorldSize)
  int localWorldSize = 1;  // processes on this node
  int nodeRank = 0;        // index of this node in the job
  // Resolved backend: "gloo", "mpi", "nccl", or "single" (a world of 1 with no backend).
  std::string backend = "single";
  std::string masterAddr;  // host of the TCP store; empty when no store is needed
  int masterPort = 0;      // port of the TCP store; 0 when no store is needed
  // Who started us: "tessera-run", "mpirun", "slurm", "env" or "single".
  std::string launchedBy = "single";
  // A launcher (tessera-run, torchrun's agent) hosts the TCP store; every rank,
  // rank 0 included, connects as a client. Otherwise rank 0 hosts it.
  bool storeHostedByLauncher = false;
  // tessera-run's restart attempt (0 first); keeps each attempt's store keys apart.
  int restartCount = 0;

  // Whether the job spans more than one node (rendezvous must not use loopback).
  bool multiNode() const { return localWorldSize < worldSize; }
  // One line for logs: "rank 5/8 (local 1/4, node 1), backend gloo, store
  // 10.0.0.1:29500 hosted by rank 0, launched by slurm".
  std::string describe() const;
};

// Reads the launch from `env` (see the detection order above) and resolves the
// backend. `requestedBackend` is InitOptions::backend: "gloo", "mpi" or
// "nccl" win; "auto" is "single" for a world of 1, else "nccl" when `cuda`
// (the process computes on a CUDA device; TESSERA_BACKEND is not consulted),
// else TESSERA_BACKEND if set, else "mpi" under mpirun when `mpiBuilt`, else
// "gloo". Whether NCCL is built and the device is CUDA is init()'s check.
// Pure: reads nothing but its arguments.
// Throws InvalidArgument naming the variable and the fix when a value is not
// an integer, out of range (RANK >= WORLD_SIZE, ...), half of a pair is
// missing (RANK without WORLD_SIZE), or the store address is missing for a
// Gloo world of more than one process.
LaunchInfo detectLaunch(const EnvMap& env, const std::string& requestedBackend, bool mpiBuilt, bool cuda = false);

// Slurm's compressed tasks-per-node list ("2(x3),1": nodes 0-2 run 2 tasks,
// node 3 runs 1): the count of node `nodeIndex`. Throws InvalidArgument naming
// SLURM_TASKS_PER_NODE when the text is malformed or too short.
int parseSlurmTasksPerNode(const std::string& text, int nodeIndex);

}  // namespace tessera::launcher
