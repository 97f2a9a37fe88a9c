// Compressed all-reduce: the int8 ring of PRIME/INTELLECT-1 (REFERENCE §4)
// and the FP8 ring of issue 18 (fp8_allreduce.h: E4M3 codes under one shared
// scale, FP8-LM's auto-scaling as an option), selectable per call or per
// optimizer (`compression = "none" | "int8" | "fp8"`). The text below is
// the int8 ring's; fp8_allreduce.h has the FP8 ring's error bound and errors.
//
// int8 algorithm (any communicator with send/recv; CPU tensors: Gloo, MPI):
// the flat fp32 tensor is split into 2 * size chunks; a ring reduce-scatter
// (each hop: uint8 codes + a 256-entry fp32 table of bucket means; the
// receiver dequantizes by table lookup and accumulates in fp32, two chunks in
// flight) then each rank re-quantizes its reduced chunk and overwrites it with
// the dequantized values; a ring all-gather forwards codes + table unchanged.
// So every rank ends with bit-identical values, and the wire carries about a
// quarter of the fp32 bytes. The error is that of uniform 256-bin
// quantization over +-3 sigma (about 1.5% relative RMS on Gaussian data,
// mostly from the clamped tails), applied to each partial sum on its way
// round the ring: relative RMS error vs the exact sum on Gaussian inputs
// ~1.54% * sqrt((n + 1) / 2), i.e. 1.9% on 2 ranks, 2.2% on 3, 2.3% on 4
// (tests/comm/compression_test.cc checks 2.0%, 2.35%, 2.55%).
//
// Non-finite input (NaN, Inf) on any rank, or a float32 partial sum that
// overflows: every rank throws InvalidArgument naming the rank(s) that found
// such values, after the collective completes (a flag travels in every
// message header, so no rank is left waiting); the tensor's contents are then
// unspecified (finite). A single huge finite outlier is not an error: its
// chunk's sigma grows with it, the outlier keeps its own bin (its value comes
// back through the bucket mean) and the chunk's other values collapse towards
// their bin means, so the output stays finite but loses their detail.
//
// Tags: the int8 ring sends on tags 8388352..8388355 (2^23 - 256 + 0..3) of
// the communicator, the FP8 ring on 8388356..8388359; user send/recv on the
// same communicator must not use them (MPI libraries accept at least 2^23 - 1
// in practice, the standard only 32767).
//
// A group of one returns at once (the tensor is its own sum and average;
// nothing is checked or quantized); so does an empty tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "tessera/comm/communicator.h"

namespace tessera::comm {

// kFp8: the FP8 ring (fp8_allreduce.h): E4M3 codes with one shared
// power-of-two scale per call, chosen so no partial sum can overflow.
enum class Compression { kNone, kInt8, kFp8 };
const char* toString(Compression compression);  // "none", "int8", "fp8"
// Throws ConfigError naming `field` and the valid values.
Compression parseCompression(const std::string& value, const std::string& field = "compression");

// Collective over comm: in-place kSum or kAvg of a contiguous float32 CPU
// tensor, on every rank (same numel everywhere; int8 runs on the calling
// thread and keeps up to about half the tensor's bytes in message buffers). kNone is exactly
// comm.allReduce(tensor, op). Throws InvalidArgument for another op or dtype
// (naming it) and for non-finite values (above), CommError/TimeoutError from
// the communicator. Bytes show in comm.stats() under send/recv for int8 and
// fp8 (fp8 also runs one small allReduce first, to agree on the scale).
// kAvg divides the decoded sum by size() on every rank alike.
void allReduceCompressed(Communicator& comm, at::Tensor tensor, ReduceOp op, Compression compression,
                         CallOptions options = {});

// As above, but returns at once; the all-reduce runs on a background thread
// (kNone: comm->allReduceAsync). Until wait() returns the caller must not
// touch `tensor` nor issue other operations on `comm` from another thread in
// a different order on different ranks -- give overlapping traffic its own
// communicator (comm->split). Argument errors throw at the call; wait()
// rethrows the others. Destroying the handle waits for the thread.
// At most one int8 and one fp8 call may be in flight per communicator: each
// ring uses fixed tags, so two would exchange each other's messages.
WorkPtr allReduceCompressedAsync(CommPtr comm, at::Tensor tensor, ReduceOp op, Compression compression,
                                 CallOptions options = {});

// Collective over comm: output = this rank's part (rank order, equal parts)
// of the kSum / kAvg of `input` over the ranks, with `compression` on the
// wire (FSDP's compressed gradient reduce-scatter). input: contiguous float32
// CPU, numel = size() * output.numel(); output: contiguous float32 CPU.
// kNone is exactly comm.reduceScatter(input, output, op). kFp8: a ring
// reduce-scatter of E4M3 codes under one shared scale (fp8_allreduce.h),
// fp32 accumulation. kInt8: InvalidArgument (not offered: use kFp8).
// Errors as allReduceCompressed.
void reduceScatterCompressed(Communicator& comm, at::Tensor input, at::Tensor output, ReduceOp op,
                             Compression compression, CallOptions options = {});

}  // namespace tessera::comm
