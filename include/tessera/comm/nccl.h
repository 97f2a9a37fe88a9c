// Creating NCCL communicators (CUDA tensors; one process per GPU).
//
// This header needs no CUDA or NCCL headers, so code that merely may use the
// NCCL backend compiles everywhere; ncclBackendBuilt() says at run time
// whether this build of tessera has it.
//
// NCCL differences from the contracts in communicator.h:
// - Tensors must be CUDA tensors on the communicator's device.
// - Operations are enqueued on the communicator's own CUDA stream, which is
//   ordered with the legacy default stream (libtorch's default): work the
//   caller issued on the default stream before the call is seen by the
//   operation, and default-stream work issued after it sees its result.
//   Work on other streams must be synchronized by the caller.
// - send/recv ignore tags (NCCL has none): the k-th send from rank a to rank
//   b matches the k-th recv on b from a. They share the stream with the
//   collectives, so two ranks that both send to each other before receiving
//   deadlock; order them (even ranks send first) or use allToAll.
// - Traffic stats (ring model) are recorded when wait() or isCompleted()
//   first sees an operation finished: an operation never waited for is not
//   counted.
// - Creating a group and split() are bounded by the timeout (a store
//   rendezvous runs first and names the ranks that did not arrive); an
//   operation that stops making progress is aborted (ncclCommAbort) when its
//   timeout passes, in Work::wait().
#pragma once

#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"

namespace tessera::comm {

struct NcclOptions {
  // Name of the group in errors and logs ("world", "world/tp").
  std::string name = "world";
  // Timeout of the rendezvous and the default timeout of every operation.
  Timeout timeout = kDefaultCommTimeout;
  // CUDA device of this rank; -1: the calling thread's current device. Every
  // tensor passed to the communicator must live on it. NCCL rejects two ranks
  // of one group on the same device.
  int device = -1;
};

// Whether this build of tessera includes the NCCL backend.
bool ncclBackendBuilt();

// CUDA devices visible to this process: 0 when there are none, when the
// driver is missing, or when tessera was built without NCCL. Never throws.
int ncclDeviceCount();

// Collective over `size` processes: each calls this with the same store,
// prefix and size and a distinct rank. Rank 0 creates the NCCL unique id and
// publishes it under "prefix/" of the store, so a fresh prefix forms a fresh
// group. Throws NotSupported when tessera was built without NCCL or no CUDA
// device is visible, InvalidArgument for a bad rank or device, TimeoutError
// naming the ranks that did not join within options.timeout, CommError when
// NCCL fails.
CommPtr makeNcclCommunicator(StorePtr store, const std::string& prefix, int rank, int size,
                             NcclOptions options = {});

}  // namespace tessera::comm
