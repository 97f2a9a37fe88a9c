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
// FP8 scaling (`precision.fp8_comm_scaling`, Fp8Scaling; fp8 only):
//   safe: the FP8 ring's default shared scale, s = 2^floor(log2(448 / (N *
//         amax))): no partial sum of N ranks saturates (the default; today's
//         behaviour, bit for bit).
//   auto: FP8-LM's automatic scaling factor (comm/fp8_allreduce.h,
//         Fp8AutoScaler): the shared scale is the minimum over ranks of
//         2^floor(log2(mu * 448 / amax_r)), so up to log2(N) more bits of
//         range for small values, but partial sums may saturate at +-448;
//         mu halves after a call whose saturated fraction exceeds the
//         threshold and doubles after a window of calls without. The caller
//         owns one scaler per tensor stream (a DDP bucket, an FSDP unit's
//         reduce-scatter, its replicate all-reduce) and passes it to every
//         call for that stream.
// Either way the calls report their Fp8CommStats (values encoded, values
// saturated), which DDP and FSDP sum into GradientFp8Stats per synced step.
//
// What this deliberately does not do: compressing parameter all-gathers, or
// saving mu in checkpoints (a restored run restarts mu at its initial value).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/comm/fp8_allreduce.h"

namespace tessera::parallel {

enum class GradientComm { kFp32, kBf16, kFp8 };
const char* toString(GradientComm mode);  // "fp32", "bf16", "fp8"
// Throws ConfigError naming `field` and the valid values ("fp32", "bf16", "fp8").
GradientComm parseGradientComm(const std::string& value, const std::string& field = "parallel.grad_comm");

// How fp8 gradient communication picks its shared scale (file comment).
enum class Fp8Scaling { kSafe, kAuto };
const char* toString(Fp8Scaling scaling);  // "safe", "auto"
// Throws ConfigError naming `field` and the valid values ("safe", "auto").
Fp8Scaling parseFp8Scaling(const std::string& value, const std::string& field = "precision.fp8_comm_scaling");

// The FP8 overflow figures of a strategy's gradient communication, over one
// synced step or summed over steps. All zero when grad_comm is not fp8 (and
// minMu / maxMu also under fp8 scaling "safe").
struct GradientFp8Stats {
  int64_t calls = 0;      // FP8 collectives (DDP buckets, FSDP reduce-scatters and replicate all-reduces)
  int64_t encoded = 0;    // FP8 values those calls encoded, all ranks together (Fp8CommStats::encoded)
  int64_t saturated = 0;  // of those, how many hit +-448 (Fp8CommStats::saturated; see each strategy for
                          // whose: the same on every rank except FSDP's "safe" reduce-scatter, this rank's part)
  // Scaling "auto": the smallest and largest mu over the strategy's scalers
  // after the step (after the last step counted, for a sum). 0 otherwise.
  double minMu = 0;
  double maxMu = 0;

  // saturated / encoded; 0 when nothing was encoded. The overflow rate.
  double saturatedFraction() const { return encoded > 0 ? static_cast<double>(saturated) / encoded : 0.0; }
  void count(const comm::Fp8CommStats& call);  // one call's figures
  void countMu(double mu);                     // one scaler's mu into [minMu, maxMu]
  // Sums the counts; the mu range becomes `later`'s when it has one (mu is a
  // state, not a quantity: a sum over steps reports the latest).
  GradientFp8Stats& operator+=(const GradientFp8Stats& later);
};

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
// fp8 only (ignored otherwise): `scaler` is the stream's Fp8AutoScaler for
// scaling "auto" (null: "safe"), updated by the call identically on every
// rank; `stats` (may be null) receives the call's figures. The caller keeps
// both alive and untouched until wait() returns (the background thread
// writes them; wait() makes them visible).
// Throws InvalidArgument at the call for a tensor the mode cannot carry;
// wait() rethrows the communicator's errors (and the FP8 ring's
// InvalidArgument for non-finite values, on every rank alike).
comm::WorkPtr allReduceGradientAsync(const comm::CommPtr& comm, at::Tensor flat, GradientComm mode,
                                     comm::WorkPtr after = nullptr, comm::Fp8AutoScaler* scaler = nullptr,
                                     comm::Fp8CommStats* stats = nullptr);

// Collective over comm: output (contiguous, input.numel() / size() elements)
// = this rank's part (rank order) of the average of `input` over the ranks,
// bit-identical on whichever rank holds it. fp32 and bf16: asynchronous
// through comm's queue (as above; keep input and output alive and untouched
// until wait()). fp8: comm::reduceScatterCompressed(kFp8, kAvg) runs on the
// calling thread before this returns (so its own collectives keep the calling
// thread's order among the caller's other collectives on comm, e.g. FSDP's
// all-gathers) and the handle is already complete; its errors throw here.
// fp8 only: `scaler` and `stats` as for allReduceGradientAsync, both done
// with when this returns. Without a scaler, stats->saturated counts this
// rank's part only (the FP8 ring's rule: with one, an extra tiny all-reduce
// makes it every rank's).
comm::WorkPtr reduceScatterGradientAsync(const comm::CommPtr& comm, at::Tensor input, at::Tensor output,
                                         GradientComm mode, comm::Fp8AutoScaler* scaler = nullptr,
                                         comm::Fp8CommStats* stats = nullptr);

}  // namespace tessera::parallel
