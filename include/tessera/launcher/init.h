// tessera::init(): the one call that turns "this process was started by
// something" into a rank, a store and a world communicator.
//
//   int main() {
//     tessera::DistributedContext ctx = tessera::init();   // collective
//     ctx.world->allReduce(grad, tessera::comm::ReduceOp::kAvg);
//   }
//
// The same binary runs unchanged under tessera-run, mpirun, srun, a
// torchrun-style environment, or alone (a world of 1). What each launcher
// sets, and the order they are recognised in, is in launch_info.h.
// There is no global state: the context is a value the caller owns and passes
// where it is needed. The only process-wide effect is setLogRank(rank).
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"
#include "tessera/launcher/launch_info.h"

namespace tessera {

struct InitOptions {
  // "auto", "gloo", "mpi" or "nccl". An explicit one wins over the
  // TESSERA_BACKEND variable. "auto" on a CUDA `device`: NCCL for a world of
  // more than one (Gloo and MPI move CPU tensors; TESSERA_BACKEND is not
  // consulted), none for a world of 1. "auto" on the CPU: TESSERA_BACKEND if
  // set, else MPI under mpirun (when tessera was built with MPI), else Gloo.
  // "nccl" needs a CUDA device and a build with NCCL; it meets through the
  // same TCP store as Gloo (an in-process one for a world of 1).
  std::string backend = "auto";
  // Where this process computes: "cpu", "cuda" (the LOCAL_RANK-th CUDA
  // device of this node) or "cuda:N" (train.device). Resolved once the
  // launch is known (DistributedContext::device); an NCCL world binds it.
  std::string device = "cpu";
  // The names ConfigErrors give the two settings above (tessera-train passes
  // its keys, "parallel.backend" and "train.device").
  std::string backendKey = "backend";
  std::string deviceKey = "device";
  // Gloo's rendezvous timeout and the default timeout of every operation of
  // the world communicator.
  comm::Timeout timeout = comm::kDefaultCommTimeout;
  // How long a rank keeps retrying to reach the TCP store (ranks may start
  // before the store's host does), and the default of store get/wait calls.
  std::chrono::milliseconds storeTimeout = std::chrono::seconds(60);
  // Name of the world communicator in errors and logs, and the store prefix
  // its Gloo rendezvous runs under.
  std::string worldName = "world";
  // Address Gloo binds and advertises. Empty: TESSERA_GLOO_HOSTNAME if set;
  // else 127.0.0.1 on one node, or this machine's host name across nodes.
  std::string glooHostname;
  // Network interface Gloo binds instead of a host name (wins if set). Empty:
  // TESSERA_GLOO_IFNAME if set.
  std::string glooInterface;

  // Throws ConfigError naming the field when a value is out of range.
  void validate() const;
};

// What init() returns; owned by the caller. Members are declared so that the
// communicator is destroyed before the store it rendezvoused through.
struct DistributedContext {
  launcher::LaunchInfo info;
  // The rendezvous store, already namespaced for this run. TCP for Gloo
  // worlds (hosted by tessera-run, or by rank 0 of this job); in-process for a
  // world of 1; null under MPI unless MASTER_ADDR/MASTER_PORT are set.
  // When rank 0 hosts it, the store dies with rank 0's context: keep the
  // context alive until every rank is done with the store (a final barrier).
  comm::StorePtr store;
  // The world communicator; every rank of the job is in it.
  comm::CommPtr world;
  // With NCCL: a Gloo group of the same ranks over the same store (its own
  // prefix), for collectives over CPU tensors. Null otherwise; use host().
  comm::CommPtr hostWorld;
  // The resolved InitOptions::device (cuda:LOCAL_RANK for "cuda"); when
  // CUDA, also the calling thread's current CUDA device.
  c10::Device device = c10::Device(c10::kCPU);

  // The world for CPU tensors (agreement flags, checkpoint metadata, metrics
  // tables): hostWorld under NCCL, else `world` (whatever the caller made it,
  // e.g. wrapped with faults).
  const comm::CommPtr& host() const { return hostWorld ? hostWorld : world; }
  int rank() const { return info.rank; }
  int worldSize() const { return info.worldSize; }
};

// Collective over every process of the job. Validates `options`, reads this
// process's environment (launch_info.h), connects to or hosts the store,
// creates the world communicator and calls setLogRank(rank).
// Throws ConfigError for bad options (naming options.deviceKey when CUDA is
// asked for and this build or machine has none, or the index is out of
// range; options.backendKey for "nccl" on the CPU or without NCCL); InvalidArgument naming the variable for
// bad launch variables (RANK >= WORLD_SIZE, missing MASTER_PORT, ...);
// StoreError when the store cannot be reached or hosted; TimeoutError naming
// the missing ranks when they do not all arrive within options.timeout;
// NotSupported for backend "mpi" in a build without MPI.
DistributedContext init(const InitOptions& options = {});

// init() reading `env` instead of this process's environment (tests, tools
// that launch in-process).
DistributedContext init(const InitOptions& options, const launcher::EnvMap& env);

}  // namespace tessera
