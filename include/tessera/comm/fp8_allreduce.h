// FP8 gradient communication (issue 18 §4, REFERENCE §8): an all-reduce and a
// reduce-scatter that put FP8 E4M3 codes on the wire under ONE scale shared
// by every rank, with fp32 accumulation. allReduceCompressed(kFp8) and
// reduceScatterCompressed(kFp8) (compression.h) are these functions with
// the default, overflow-free scale; this header adds FP8-LM's automatic
// scaling as an option, and the statistics of a call.
//
// The scale s (codes = E4M3(x * s), values = decode(codes) / s; saturating,
// tessera/core/numerics/fp8.h), a power of two, chosen collectively:
//   default ("no overflow"): all-reduce-max of the ranks' amax, then
//       s = 2^floor(log2(448 / (N * amax))), so every partial sum of N ranks
//       fits in E4M3's +-448 (up to the rounding of earlier hops, which
//       saturation absorbs). Costs log2(N) bits of range (FP8-LM's
//       "pre-scaling" would underflow, post-scaling overflow; this does
//       neither).
//   Fp8AutoScaler (FP8-LM, arXiv 2310.18313 §2.2): each rank's scale is
//       s_r = 2^floor(log2(mu * 448 / amax_r)) and the shared scale is the
//       minimum over ranks; mu (<= 1) is halved after a call where too many
//       FP8 values hit +-448, doubled after a window of calls without that.
//       Sums may saturate; that is what mu reacts to.
//
// Algorithm (comm/compression/fp8_allreduce.cc): one small fp64 all-reduce
// agrees on the scale, the element count and which ranks hold non-finite
// values; then the int8 ring's layout (2 * N chunks, two lanes in flight):
// a ring reduce-scatter where each hop decodes, adds its own fp32 values and
// re-encodes the partial sum; for the all-reduce, each rank then encodes its
// reduced chunk once, overwrites it with the decoded value, and a ring
// all-gather forwards those codes unchanged, so every rank ends bit-identical.
// Wire: the codes plus an 8-byte header per message (a quarter of the fp32
// ring's bytes). Tags: kInt8RingTagBase + 4 .. 7 (see int8_allreduce.h); at
// most one FP8 call in flight per communicator.
//
// Error bound (tests/comm/fp8_allreduce_test.cc): E4M3 keeps 3 mantissa bits,
// so each encoding rounds a partial sum P to within half an ulp, at most
// 2^-4 |P| (and 2^-10 / s for subnormals). An element is encoded N times
// (N - 1 partial sums, then the full sum; the reduce-scatter output N - 1
// times), each partial bounded by S = sum over ranks of |x_r| (times
// (1 + 2^-4)^(N-1) for earlier errors), so |result - exact sum| <=
// N * halfUlp(S * 1.0625^(N-1)) / s, a few percent of S. On Gaussian data
// the relative RMS error of the all-reduce is 3.2% (2 ranks) to 4.2% (4
// ranks), of the reduce-scatter 1.9% to 3.2% (the int8 ring's is 1.9-2.3%:
// E4M3's 3 mantissa bits cost more than 256 uniform bins over +-3 sigma on
// Gaussian data; FP8 keeps relative precision for small and outlying values).
//
// Errors, on every rank alike and before anything is sent: non-finite input
// (InvalidArgument naming the ranks; the tensor is unchanged), different
// element counts on different ranks, and amax so large (over ~1e38 / N) that
// the fp32 partial sums could overflow. A global amax of 0 gives exact zeros.
// A group of one returns at once (the tensor is its own sum and average;
// nothing is checked, encoded or counted); so does an empty tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "tessera/comm/communicator.h"

namespace tessera::comm {

// What one FP8 collective did; the same on every rank (except `saturated`
// of a reduce-scatter without a scaler: that counts this rank's part only).
struct Fp8CommStats {
  float scale = 0;        // the shared scale s (0: nothing was encoded, e.g. amax 0)
  float amax = 0;         // max |x| over every rank's input
  int64_t encoded = 0;    // FP8 values encoded by all ranks together (all-reduce: N * numel)
  int64_t saturated = 0;  // of those, how many are +-448 (hit the E4M3 maximum)
  double saturatedFraction() const { return encoded > 0 ? static_cast<double>(saturated) / encoded : 0.0; }
};

// FP8-LM's automatic scaling factor. Defaults are the paper's (§2.2): mu is
// halved when more than 0.001% of the values hit the FP8 maximum, and doubled
// after 1000 steps in a row at or below that rate.
struct Fp8AutoScaleConfig {
  double max_saturated_fraction = 1e-5;  // "overflow" above this fraction of saturated values; in [0, 1)
  int64_t stable_window = 1000;          // calls in a row without overflow before mu doubles; >= 1
  double initial_mu = 1.0;               // a power of two in [min_mu, 1]
  // mu never exceeds 1 (a rank's own amax would then saturate on its own)
  // nor drops below min_mu (2^-24: by then the scale is not the problem).
  double min_mu = 1.0 / (1 << 24);

  // Throws ConfigError naming prefix + the field and the accepted values.
  void validate(const std::string& prefix = "fp8_comm.") const;
};

// The auto-scaling state of ONE tensor stream (e.g. one DDP bucket): pass the
// same scaler to every call for that stream. Every rank holds its own copy;
// the copies stay identical because each call updates them from statistics
// every rank shares. Not thread-safe: at most one call in flight per scaler.
class Fp8AutoScaler {
 public:
  explicit Fp8AutoScaler(Fp8AutoScaleConfig config = {});  // validates config (ConfigError)

  const Fp8AutoScaleConfig& config() const { return config_; }
  double mu() const { return mu_; }
  // This rank's scale for amax: the largest power of two s with amax * s <= mu * 448
  // (2^126 for amax 0). The shared scale is the minimum over ranks.
  float scaleFor(float amax) const;

  // FP8-LM's rule, applied by the collectives after each call: an overflow
  // (saturated fraction > max_saturated_fraction) halves mu and restarts the
  // window; otherwise the window grows, and when it reaches stable_window mu
  // doubles (up to 1) and the window restarts.
  void update(const Fp8CommStats& stats);

  const Fp8CommStats& last() const { return last_; }     // the last call's statistics
  double lastSaturatedFraction() const { return last_.saturatedFraction(); }
  double overallSaturatedFraction() const;               // over every call so far
  int64_t calls() const { return calls_; }
  int64_t stableCalls() const { return stable_; }        // the current window
  int64_t halvings() const { return halvings_; }
  int64_t doublings() const { return doublings_; }

  // Training state (checkpoints, live recovery): mu and the window. The
  // statistics restart with a restored scaler.
  void restore(double mu, int64_t stableCalls);  // InvalidArgument for mu outside [min_mu, 1] or a negative window

 private:
  Fp8AutoScaleConfig config_;
  double mu_;
  int64_t stable_ = 0;
  int64_t calls_ = 0, halvings_ = 0, doublings_ = 0;
  int64_t totalSaturated_ = 0, totalEncoded_ = 0;
  Fp8CommStats last_;
};

// Collective over comm: in-place kSum / kAvg of a contiguous float32 CPU
// tensor (same numel on every rank) in FP8, as described above. scaler:
// nullptr for the default no-overflow scale, or this tensor stream's
// FP8-LM scaler (updated before return, identically on every rank).
// Returns the call's statistics. Throws InvalidArgument (bad dtype, op,
// tensor; non-finite values; numel mismatch; amax too large),
// CommError/TimeoutError from the communicator. kAvg divides the decoded sum
// by N on every rank alike.
Fp8CommStats fp8AllReduce(Communicator& comm, at::Tensor tensor, ReduceOp op, Fp8AutoScaler* scaler = nullptr,
                          CallOptions options = {});

// As fp8AllReduce, but returns at once and runs on a background thread. The
// caller keeps tensor and scaler alive and untouched until wait() returns;
// the rules of allReduceCompressedAsync (compression.h) apply. Unlike the
// int8 ring, the thread also issues collectives on comm (the scale
// agreement's allReduce): any collective the caller issues on comm before
// wait() would race with it, so overlap on a communicator of its own
// (comm->split), as streaming DiLoCo does.
WorkPtr fp8AllReduceAsync(CommPtr comm, at::Tensor tensor, ReduceOp op, Fp8AutoScaler* scaler = nullptr,
                          CallOptions options = {});

// Collective over comm: output = this rank's part (rank order, equal parts,
// as comm.reduceScatter) of the kSum / kAvg of input over the ranks, with the
// ring reduce-scatter above (each element encoded N - 1 times; the output
// is the fp32 accumulation, not re-encoded). input is not modified. input:
// contiguous float32 CPU, numel = size() * output.numel(); output:
// contiguous float32 CPU. Errors and scaler as fp8AllReduce. With a scaler
// (only), the saturation count takes one more tiny all-reduce so that every
// rank's statistics are the same.
Fp8CommStats fp8ReduceScatter(Communicator& comm, at::Tensor input, at::Tensor output, ReduceOp op,
                              Fp8AutoScaler* scaler = nullptr, CallOptions options = {});

}  // namespace tessera::comm
