// Creating Gloo communicators (CPU tensors over TCP).
#pragma once

#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"

namespace tessera::comm {

struct GlooOptions {
  // Name of the group in errors and logs ("world", "elastic/epoch3").
  std::string name = "world";
  // Address this rank's sockets bind to and advertise. Empty: the
  // TESSERA_GLOO_HOSTNAME env var if set, else 127.0.0.1 (single machine).
  std::string hostname;
  // Network interface to bind instead of a hostname (TESSERA_GLOO_IFNAME); wins if set.
  std::string interface;
  // Before each collective, ranks exchange a 48-byte description of it (op,
  // dtype, size, root, counts) so that a mismatch is a clear CommError on every
  // rank instead of a crash inside Gloo. Costs one small allgather per
  // collective (tens of microseconds on a LAN). TESSERA_VERIFY_COLLECTIVES=0
  // turns it off.
  bool verifyCollectives = true;
  // Timeout of the rendezvous and the default timeout of every operation.
  Timeout timeout = kDefaultCommTimeout;
};

// Collective over `size` processes: each calls this with the same store,
// prefix and size and a distinct rank. Rendezvous happens under "prefix/" of
// the store, so a fresh prefix forms a fresh group (how the elastic mesh
// re-forms). Throws TimeoutError naming the ranks that did not join within
// options.timeout, StoreError if the store is unreachable.
// Whether this build of tessera includes the Gloo backend (TESSERA_WITH_GLOO;
// without it makeGlooCommunicator throws NotSupported naming the option).
bool glooBackendBuilt();

CommPtr makeGlooCommunicator(StorePtr store, const std::string& prefix, int rank, int size,
                             GlooOptions options = {});

}  // namespace tessera::comm
