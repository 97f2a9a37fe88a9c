// Linked instead of comm/nccl/ when tessera is built without CUDA + NCCL, so
// callers can link against makeNcclCommunicator everywhere and learn at run
// time (NotSupported) rather than at build time.
#include "tessera/comm/nccl.h"
#include "tessera/core/error.h"

namespace tessera::comm {

bool ncclBackendBuilt() { return false; }

int ncclDeviceCount() { return 0; }

CommPtr makeNcclCommunicator(StorePtr, const std::string&, int, int, NcclOptions) {
  throw NotSupported(
      "tessera was built without the NCCL backend: install the CUDA toolkit and NCCL (nccl.h and libnccl "
      "under /usr/local/cuda, or set CUDAToolkit_ROOT) and reconfigure with -DTESSERA_WITH_NCCL=AUTO, or use "
      "--backend gloo");
}

}  // namespace tessera::comm
