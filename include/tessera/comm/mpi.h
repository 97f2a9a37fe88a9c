// Creating MPI communicators (CPU tensors; processes started by mpirun).
#pragma once

#include <string>

#include "tessera/comm/communicator.h"

namespace tessera::comm {

struct MpiOptions {
  std::string name = "world";           // group name in errors and logs
  Timeout timeout = kDefaultCommTimeout;  // default timeout of every operation
  // Before each collective, ranks check that they all run the same operation
  // (op, dtype, size), so a mismatch is a clear CommError rather than garbage
  // or MPI_ERR_TRUNCATE. One small allgather per collective.
  // TESSERA_VERIFY_COLLECTIVES=0 turns it off.
  bool verifyCollectives = true;
};

// Whether this build of tessera includes the MPI backend.
bool mpiBackendBuilt();

// Initializes MPI if needed (MPI_THREAD_MULTIPLE; finalized at process exit)
// and wraps MPI_COMM_WORLD. Collective over every process mpirun started.
// Throws NotSupported when tessera was built without MPI.
CommPtr makeMpiWorldCommunicator(MpiOptions options = {});

}  // namespace tessera::comm
