// Forming a group over a store with a chosen backend: the one call code above
// comm/ uses to make a communicator for processes that find each other through
// a Store (the elastic mesh's node and global groups today), so it names a
// backend instead of constructing one.
//
// Deliberately not here: the world of a launched job (launcher/init.h picks
// Gloo, MPI or a single rank from the environment), and sub-groups of an
// existing group (Communicator::split).
#pragma once

#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"

namespace tessera::comm {

struct GroupOptions {
  // "gloo" (CPU tensors over TCP; always built) or "nccl" (CUDA tensors; only
  // in builds with NCCL, see nccl.h). "mpi" and "single" cannot form a group
  // over a store: NotSupported.
  std::string backend = "gloo";
  // Name of the group in errors and logs; empty: the store prefix.
  std::string name;
  // How long the rendezvous waits for every rank; its error names the ranks
  // that did not arrive.
  Timeout timeout = kDefaultCommTimeout;
  // Default timeout of every operation of the group once formed;
  // kUseCommTimeout: the rendezvous timeout above.
  Timeout operationTimeout = kUseCommTimeout;
  // Gloo only: the address this rank binds and advertises, or the network
  // interface to bind instead (wins if set); see GlooOptions. Empty: Gloo's
  // defaults (TESSERA_GLOO_HOSTNAME / TESSERA_GLOO_IFNAME, else 127.0.0.1).
  std::string hostname;
  std::string interface;
  // NCCL only: this rank's CUDA device; -1: the calling thread's current one.
  int device = -1;
};

// Collective over the `size` processes that call it with the same store,
// `prefix` and size, each with a distinct `rank` in [0, size). The rendezvous
// runs under "prefix/" of the store, so a fresh prefix forms a fresh group.
// The caller owns the returned communicator; destroying it closes its
// connections (peers blocked on it fail instead of waiting out their timeout).
// Throws NotSupported for a backend that cannot form groups over a store or
// is not built (the message says which backends can), InvalidArgument for an
// unknown backend, a null store or a bad rank/size, TimeoutError naming the
// ranks that did not join within options.timeout, StoreError when the store is
// unreachable.
CommPtr makeStoreGroup(StorePtr store, const std::string& prefix, int rank, int size,
                       const GroupOptions& options = {});

}  // namespace tessera::comm
