// Linked instead of comm/gloo/ when tessera is built without Gloo
// (TESSERA_WITH_GLOO=OFF, or neither libgloo-dev nor gloo headers inside
// libtorch were found: a GPU machine with only PyTorch's wheel), so callers
// link everywhere and learn at run time (NotSupported) what is missing.
#include "tessera/comm/gloo.h"
#include "tessera/core/error.h"

namespace tessera::comm {

bool glooBackendBuilt() { return false; }

CommPtr makeGlooCommunicator(StorePtr, const std::string& prefix, int, int, GlooOptions) {
  throw NotSupported("tessera was built without the Gloo backend (TESSERA_WITH_GLOO=OFF, or Gloo not found when "
                     "it was configured), so group '" + prefix +
                     "' cannot be created on it: use parallel.backend = \"nccl\" with train.device = \"cuda\" "
                     "(or --backend mpi), or install libgloo-dev and reconfigure");
}

}  // namespace tessera::comm
