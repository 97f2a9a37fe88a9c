// Private to comm/: the int8 ring all-reduce behind allReduceCompressed
// (tessera/comm/compression.h documents the contract).
#pragma once

#include <ATen/core/Tensor.h>

#include "tessera/comm/communicator.h"

namespace tessera::comm::detail {

// The point-to-point tags the int8 ring uses, kInt8RingTagBase + 0..3
// (reduce-scatter lanes 0/1, all-gather lanes 0/1). Just below 2^23, the
// smallest MPI_TAG_UB among common MPI libraries (Open MPI's UCX layer), and
// far above the small tags user code picks; user send/recv must not use them.
// Consecutive all-reduces may share tags: messages of one (peer, tag) arrive
// in order, and every rank issues the same sequence.
constexpr int kInt8RingTagBase = (1 << 23) - 256;

// Collective over comm (size() > 1): in-place sum or average of a contiguous
// float32 CPU tensor, checked by the caller. Throws InvalidArgument on every
// rank when any rank saw non-finite values; CommError/TimeoutError from the
// communicator.
void int8RingAllReduce(Communicator& comm, at::Tensor tensor, bool average, CallOptions options);

}  // namespace tessera::comm::detail
