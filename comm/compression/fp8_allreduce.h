// Private to comm/: the FP8 ring behind fp8AllReduce / fp8ReduceScatter
// (tessera/comm/fp8_allreduce.h documents the contract), and the pieces
// compression.cc shares with it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "comm/compression/int8_allreduce.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/compression.h"

namespace tessera::comm::detail {

// The FP8 ring's tags: kFp8RingTagBase + 0..3 (reduce-scatter lanes 0/1,
// all-gather lanes 0/1), next to the int8 ring's, so an int8 and an FP8 call
// never exchange each other's messages.
constexpr int kFp8RingTagBase = kInt8RingTagBase + 4;

// Collective over comm (size() > 1, numel > 0, arguments checked): the ring
// all-reduce of the tensor in place with codes = E4M3(x * 2^exponent)
// (saturating); average divides the decoded sum by size(). Returns the
// number of saturated codes encoded by all ranks (the same on every rank).
// CommError/TimeoutError from the communicator.
int64_t fp8RingAllReduce(Communicator& comm, at::Tensor tensor, int exponent, bool average, CallOptions options);

// Collective over comm (size() > 1, output.numel() > 0, arguments checked):
// the ring reduce-scatter of input (not modified) into output (this rank's
// part, fp32 accumulation). Returns the saturated codes along the chains of
// the chunks this rank owns (sum it over ranks for the total).
int64_t fp8RingReduceScatter(Communicator& comm, const at::Tensor& input, at::Tensor output, int exponent,
                             bool average, CallOptions options);

// Defined in compression.cc. Throws InvalidArgument naming `compression`
// unless tensor is a defined, contiguous float32 CPU tensor and op is kSum
// or kAvg.
void checkCompressedArguments(const Communicator& comm, const at::Tensor& tensor, ReduceOp op,
                              Compression compression);

// Defined in compression.cc. Runs body(*comm) on a background thread; wait()
// rethrows its error; destroying the handle joins the thread. `what` names
// the operation in timeout errors.
WorkPtr runCompressedInBackground(CommPtr comm, const std::string& what, std::function<void(Communicator&)> body,
                                  CallOptions options);

}  // namespace tessera::comm::detail
