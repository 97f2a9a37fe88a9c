// Linked instead of comm/mpi/ when tessera is built without MPI.
#include "tessera/comm/mpi.h"
#include "tessera/core/error.h"

namespace tessera::comm {

bool mpiBackendBuilt() { return false; }

CommPtr makeMpiWorldCommunicator(MpiOptions) {
  throw NotSupported(
      "tessera was built without the MPI backend: install libopenmpi-dev (scripts/setup.sh) and reconfigure with "
      "-DTESSERA_WITH_MPI=AUTO, or use --backend gloo");
}

}  // namespace tessera::comm
