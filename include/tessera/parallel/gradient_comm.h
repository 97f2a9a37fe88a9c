// Gradient communication precision for data parallelism (issue 18 §4):
// `parallel.grad_comm = "fp32" | "bf16" | "fp8"`, and the two collectives DDP
// and FSDP run with it -- the average of a flat fp32 gradient (DDP's buckets,
// FSDP's hybrid replicate all-reduce) and FSDP's gradient reduce-scatter. One
// place decides how each precision travels, so DDP and FSDP cannot differ.
//
//   fp32: the communicator's own kAvg collective, exactly as before (the
//         result is bit-identical to calling comm->allReduceAsync(flat, kAvg)).
//   bf16: the fp32 gradient is rounded to bfloat16 (RNE), summed in bfloat16
//         by the communicator (each ring hop widens to fp32, adds, and rounds
//         once: comm/reduce_kernels.cc; Gloo, MPI and NCCL all sum bfloat16),
//         widened back to fp32 and divided by size() in fp32. Half the bytes.
//         Error per element against the exact average of the ranks' fp32
//         gradients g_r: at most about u * sum_r |g_r|, u = 2^-8 (one rounding
//         of each input and one of each of the n - 1 partial sums, each within
//         u of a value bounded by sum_r |g_r|, over n).
//   fp8:  the FP8 ring of comm/compression.h (Compression::kFp8, kAvg): E4M3
//         codes under one shared power-of-two scale per call, fp32
//         accumulation, every rank bit-identical; a quarter of the bytes. CPU
//         float32 only (Gloo, MPI). Its error bound is the ring's (see
//         comm/compression.h and the FP8 ring's header).
//
// Every rank ends with bit-identical values in every mode.
//
// What this deliberately does not do: FP8-LM's automatic scaling factor (an
// option of the FP8 ring itself), or compressing parameter all-gathers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "tessera/comm/communicator.h"

namespace tessera::parallel {

enum class GradientComm { kFp32, kBf16, kFp8 };
const char* toString(GradientComm mode);  // "fp32", "bf16", "fp8"
// Throws ConfigError naming `field` and the valid values ("fp32", "bf16", "fp8").
GradientComm parseGradientComm(const std::string& value, const std::string& field = "parallel.grad_comm");

// Bytes one gradient element occupies on the wire: 4, 2 or 1 (fp8's per-call
// scale and message headers are not counted). What DDP/FSDP stats count.
int64_t gradientWireBytes(GradientComm mode);

// Throws InvalidArgument naming `what` when `mode` cannot carry `tensor`:
// bf16 and fp8 need float32, fp8 also a CPU tensor (the FP8 ring runs over
// send/recv on Gloo or MPI). fp32 accepts anything the communicator does.
void checkGradientCommTensor(GradientComm mode, const at::Tensor& tensor, const std::string& what);

// Collective over comm: `flat` (contiguous; float32 unless mode is fp32)
// becomes the average over comm's ranks, bit-identical on every rank. Returns
// at once; until wait() returns the caller must not touch `flat`.
//
// fp32 and bf16 go through comm's own queue (issue order, as any async
// collective). fp8 runs on a background thread that first waits for `after`
// (ignoring its error, which is its own waiter's) -- pass the previous fp8
// call's handle on the same comm, because the FP8 ring uses fixed tags and
// allows one call in flight per communicator. The FP8 ring also issues small
// collectives of its own (an all-reduce-max of the amaxes) from that thread:
// no other thread may issue collectives on comm until wait() returns.
// (`after` is ignored for fp32 and bf16.) Every mode's handle must be
// waited on: for bf16, wait() writes the result into `flat`, and
// isCompleted() only says that the transfer is done.
// Throws InvalidArgument at the call for a tensor the mode cannot carry;
// wait() rethrows the communicator's errors (and the FP8 ring's
// InvalidArgument for non-finite values, on every rank alike).
comm::WorkPtr allReduceGradientAsync(const comm::CommPtr& comm, at::Tensor flat, GradientComm mode,
                                     comm::WorkPtr after = nullptr);

// Collective over comm: output (contiguous, input.numel() / size() elements)
// = this rank's part (rank order) of the average of `input` over the ranks,
// bit-identical on whichever rank holds it. fp32 and bf16: asynchronous
// through comm's queue (as above; keep input and output alive and untouched
// until wait()). fp8: comm::reduceScatterCompressed(kFp8, kAvg) runs on the
// calling thread before this returns (so its own collectives keep the calling
// thread's order among the caller's other collectives on comm, e.g. FSDP's
// all-gathers) and the handle is already complete; its errors throw here.
comm::WorkPtr reduceScatterGradientAsync(const comm::CommPtr& comm, at::Tensor input, at::Tensor output,
                                         GradientComm mode);

}  // namespace tessera::parallel
