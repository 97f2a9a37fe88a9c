// The multi-process test harness: a test spawns N real processes of the test
// binary itself, each of which runs a registered worker function as one rank.
//
//   TESSERA_WORKER(allreduce_sum) {           // runs in every spawned rank
//     auto comm = ctx.world();                 // a real Gloo/MPI group
//     ...; TESSERA_CHECK(ok, "details");       // throw => the rank fails
//   }
//   TEST(AllReduce, Gloo) {                    // runs in the gtest process
//     auto result = runWorkers("allreduce_sum", {.ranks = 4});
//     ASSERT_TRUE(result.ok()) << result.report();
//   }
//
// Gloo ranks rendezvous through a TCP store hosted by the test process (on an
// ephemeral loopback port); MPI ranks are started with mpirun. Each rank's
// stdout+stderr goes to a file the result holds, so a failure shows what every
// rank printed. Every run has a deadline after which all ranks are killed, so
// a hanging collective fails the test instead of hanging CI.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"

namespace tessera::testing {

struct WorkerContext {
  int rank = 0;
  int size = 1;
  std::string backend;                        // "gloo" or "mpi"
  std::map<std::string, std::string> args;    // RunOptions::args
  comm::StorePtr store;                       // TCP store client (gloo runs only)

  // The world communicator of the run's backend (collective). Call it once
  // per worker and keep the result: every call forms a NEW group under the
  // same store prefix, and a second one can wait forever for peers that
  // called it once.
  comm::CommPtr world(comm::Timeout timeout = std::chrono::seconds(60)) const;
  // args[key], or fallback when absent.
  std::string arg(const std::string& key, const std::string& fallback = "") const;
};

using WorkerFn = std::function<void(WorkerContext&)>;

// Registers fn under name; used by TESSERA_WORKER.
bool registerWorker(const std::string& name, WorkerFn fn);

struct RunOptions {
  int ranks = 2;
  std::string backend = "gloo";               // "gloo" or "mpi"
  std::chrono::seconds deadline{180};         // kill every rank after this
  std::map<std::string, std::string> args;    // passed to WorkerContext::args
};

struct RunResult {
  std::vector<int> exitCodes;                 // per rank; 128+signal if killed by a signal
  std::vector<std::string> outputs;           // per rank: everything it printed
  bool timedOut = false;
  std::string launchError;                    // set if the ranks could not be started

  bool ok() const;
  // Every rank's exit code and output, for assertion messages.
  std::string report() const;
};

// Spawns ranks of this binary running worker `name`; blocks until all exit or
// the deadline passes.
RunResult runWorkers(const std::string& name, const RunOptions& options);

// Whether this build has MPI (and mpirun is on PATH).
bool mpiAvailable();

// Call first in main(): in a spawned rank, runs its worker and returns the
// exit code; in the gtest process returns nullopt.
std::optional<int> maybeRunWorker(int argc, char** argv);

// Throws tessera::Error describing the first differing element unless the two
// tensors have equal dtype, shape and values (exact, or within atol+rtol*|b|).
void expectTensorsEqual(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                        double atol = 0, double rtol = 0);

}  // namespace tessera::testing

#define TESSERA_WORKER_CONCAT_(a, b) a##b
#define TESSERA_WORKER(name)                                                                 \
  static void tessera_worker_##name(::tessera::testing::WorkerContext& ctx);                 \
  static const bool TESSERA_WORKER_CONCAT_(tessera_worker_registered_, name) =               \
      ::tessera::testing::registerWorker(#name, &tessera_worker_##name);                     \
  static void tessera_worker_##name(::tessera::testing::WorkerContext& ctx)
