// makeStoreGroup: a backend's name to the backend's store-based constructor.
#include "tessera/comm/store_group.h"

#include "tessera/comm/gloo.h"
#include "tessera/comm/nccl.h"
#include "tessera/core/error.h"

namespace tessera::comm {

CommPtr makeStoreGroup(StorePtr store, const std::string& prefix, int rank, int size, const GroupOptions& options) {
  const std::string& name = options.name.empty() ? prefix : options.name;
  CommPtr group;
  if (options.backend == "gloo") {
    GlooOptions gloo;
    gloo.name = name;
    gloo.hostname = options.hostname;
    gloo.interface = options.interface;
    gloo.timeout = options.timeout;
    group = makeGlooCommunicator(std::move(store), prefix, rank, size, gloo);
  } else if (options.backend == "nccl") {
    NcclOptions nccl;
    nccl.name = name;
    nccl.timeout = options.timeout;
    nccl.device = options.device;
    group = makeNcclCommunicator(std::move(store), prefix, rank, size, nccl);  // NotSupported when not built
  } else if (options.backend == "mpi" || options.backend == "single") {
    throw NotSupported("group \"" + name + "\": the " + options.backend +
                       " backend cannot form a group over a store (MPI groups come from mpirun's world and "
                       "split(); a single-rank group needs no rendezvous): use backend \"gloo\" or \"nccl\"");
  } else {
    throw InvalidArgument("group \"" + name + "\": unknown backend \"" + options.backend +
                          "\" (groups over a store: \"gloo\", or \"nccl\" in builds with NCCL)");
  }
  if (options.operationTimeout != kUseCommTimeout) group->setTimeout(options.operationTimeout);
  return group;
}

}  // namespace tessera::comm
