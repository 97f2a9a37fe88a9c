// The smallest program against an installed tessera: a group of one,
// an all-reduce, a check. Prints "OK" on success; anything else is a failure
// of the install/export (headers, library, or its dependencies).
#include <ATen/ATen.h>

#include <cstdio>
#include <exception>

#include "tessera/comm/communicator.h"

int main() {
  try {
    tessera::comm::CommPtr comm = tessera::comm::makeSingleRankCommunicator("consumer");
    at::Tensor t = at::arange(8, at::kFloat);  // (8,)
    comm->allReduce(t, tessera::comm::ReduceOp::kSum);
    if (!t.equal(at::arange(8, at::kFloat)) || comm->stats().of(tessera::comm::OpKind::kAllReduce).calls != 1) {
      std::fprintf(stderr, "all-reduce on a group of one changed the tensor or was not counted\n");
      return 1;
    }
    std::printf("OK\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer failed: %s\n", e.what());
    return 1;
  }
}
