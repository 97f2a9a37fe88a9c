// The FP8 ring (issue 18 §4): the int8 ring's structure (int8_allreduce.cc,
// REFERENCE §4) with E4M3 codes under one shared power-of-two scale instead
// of per-chunk tables, plus the scale agreement, the public entry points and
// FP8-LM's auto-scaler (tessera/comm/fp8_allreduce.h).
//
// Layout. The flat tensor is cut into N near-equal parts in rank order (the
// reduce-scatter's output parts); each part is halved into lane 0 and lane 1:
// two independent rings, stepped alternately so one lane's transfer is on
// the wire while the other's chunk is decoded and re-encoded. Ring chunk i
// of a lane is that lane's half of part i - 1, so after the reduce-scatter
// (where rank r ends holding ring chunk r + 1, as in the int8 ring) rank r
// holds part r.
//
// One lane, rank r (indices mod N):
//   reduce-scatter, step s = 0 .. N-2: send ring chunk r-s (encoded: our own
//     input at s = 0, else the partial sum just formed), receive chunk
//     r-s-1, form input + decoded (fp32) for it.
//   all-reduce only: encode the reduced chunk r+1 once, send it, overwrite
//     it with its decoded value; all-gather, step s = 0 .. N-2: receive chunk
//     r-s, forward the message unchanged, decode it. Every rank decodes the
//     same bytes: bit-identical results.
//
// Message (one per hop), a uint8 tensor: [saturated: uint64] [codes: uint8 x chunk].
// `saturated` counts the codes at +-448 along the chunk's chain so far
// (each hop adds its own); all-gather messages carry the chain's total, so
// every rank learns every chain's count: the statistic FP8-LM's mu reacts
// to, identical on all ranks without another collective.
//
// Non-finite values and overflow are settled before the ring by the scale
// agreement (one fp64 all-reduce-max), so, unlike the int8 ring, no rank can
// fail mid-ring and the messages need no error flags.
#include "comm/compression/fp8_allreduce.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <sstream>
#include <vector>

#include "tessera/comm/fp8_allreduce.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/numerics/fp8.h"

namespace tessera::comm {
namespace detail {
namespace {

using numerics::Fp8Format;
using numerics::Overflow;

constexpr int kLanes = 2;
constexpr int64_t kHeaderBytes = sizeof(uint64_t);
constexpr uint8_t kE4M3MaxMagnitude = 0x7E;  // S.1111.110 = 448

int mod(int a, int n) { return ((a % n) + n) % n; }

// Codes at +-448.
int64_t countSaturated(const uint8_t* codes, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (codes[i] & 0x7F) == kE4M3MaxMagnitude;
  return count;
}

class Fp8Message {
 public:
  Fp8Message() = default;
  explicit Fp8Message(int64_t codes) : bytes_(at::empty({kHeaderBytes + codes}, at::kByte)) {}

  const at::Tensor& bytes() const { return bytes_; }
  uint64_t saturated() const {
    uint64_t v;
    std::memcpy(&v, bytes_.data_ptr<uint8_t>(), sizeof(v));
    return v;
  }
  void setSaturated(uint64_t v) { std::memcpy(bytes_.data_ptr<uint8_t>(), &v, sizeof(v)); }
  uint8_t* codes() { return bytes_.data_ptr<uint8_t>() + kHeaderBytes; }

 private:
  at::Tensor bytes_;
};

class Fp8Ring {
 public:
  // All-reduce: input == data (in place), output unused. Reduce-scatter:
  // data == nullptr; input read-only, output this rank's part.
  Fp8Ring(Communicator& comm, const float* input, float* data, float* output, int64_t numel, int exponent,
          bool average, CallOptions options)
      : comm_(comm),
        input_(input),
        data_(data),
        output_(output),
        numel_(numel),
        n_(comm.size()),
        rank_(comm.rank()),
        scale_(std::ldexp(1.0f, exponent)),
        inverse_(std::ldexp(1.0f, -exponent)),
        average_(average),
        options_(options) {}

  // The all-reduce; returns the saturated codes of every rank.
  int64_t allReduce() {
    reduceScatter();
    allGather();
    return static_cast<int64_t>(total_);
  }

  // The reduce-scatter; returns the saturated codes of this rank's chains.
  int64_t reduceScatterOnly() {
    scratch_.resize(static_cast<size_t>(part(rank_).length));
    reduceScatter();
    if (average_) divideByRanks(output_, part(rank_).length);
    return static_cast<int64_t>(total_);
  }

 private:
  struct Chunk {
    int64_t start;
    int64_t length;
  };

  // Part p of N near-equal parts, in rank order.
  Chunk part(int p) const {
    const int64_t base = numel_ / n_, extra = numel_ % n_;
    return {p * base + std::min<int64_t>(p, extra), base + (p < extra ? 1 : 0)};
  }
  // Lane `lane`'s ring chunk i: that lane's half of part i - 1.
  Chunk chunk(int lane, int i) const {
    const Chunk p = part(mod(i - 1, n_));
    const int64_t first = (p.length + 1) / 2;
    return lane == 0 ? Chunk{p.start, first} : Chunk{p.start + first, p.length - first};
  }
  // kAvg: the decoded sum divided by N (correctly rounded, the same on every rank).
  void divideByRanks(float* x, int64_t length) const {
    const float ranks = static_cast<float>(n_);
    for (int64_t i = 0; i < length; ++i) x[i] /= ranks;
  }
  // The final values of a chunk from its all-gather codes.
  void decodeOutput(Fp8Message& m, const Chunk& c) {
    numerics::decodeFp8(m.codes(), c.length, inverse_, data_ + c.start, Fp8Format::kE4M3);
    if (average_) divideByRanks(data_ + c.start, c.length);
  }
  bool isOwn(const Chunk& c) const {
    const Chunk own = part(rank_);
    return c.start >= own.start && c.start + c.length <= own.start + own.length;
  }

  // A message holding E4M3(src * scale) and the chain's count so far plus ours.
  Fp8Message encode(const float* src, int64_t length, uint64_t carried) const {
    Fp8Message m(length);
    numerics::encodeFp8(src, length, scale_, m.codes(), Fp8Format::kE4M3, Overflow::kSaturate);
    m.setSaturated(carried + static_cast<uint64_t>(countSaturated(m.codes(), length)));
    return m;
  }

  // input + decoded partial sum, in fp32: in place for the all-reduce; for
  // the reduce-scatter in the output (this rank's part) or a scratch buffer
  // (a chunk passed on), leaving the input untouched.
  const float* accumulate(const Chunk& c, Fp8Message& got) {
    float* dst;
    if (data_ != nullptr) {
      dst = data_ + c.start;
    } else {
      dst = isOwn(c) ? output_ + (c.start - part(rank_).start) : scratch_.data();
      std::memcpy(dst, input_ + c.start, static_cast<size_t>(c.length) * sizeof(float));
    }
    numerics::decodeFp8Accumulate(got.codes(), c.length, inverse_, dst, Fp8Format::kE4M3);
    return dst;
  }

  WorkPtr send(Fp8Message& m, int tag) {
    return comm_.sendAsync(m.bytes(), mod(rank_ + 1, n_), kFp8RingTagBase + tag, options_);
  }
  WorkPtr recv(Fp8Message& m, int tag) {
    return comm_.recvAsync(m.bytes(), mod(rank_ - 1, n_), kFp8RingTagBase + tag, options_);
  }

  void reduceScatter() {
    const int steps = n_ - 1;
    // Two buffers per lane and direction: step s uses s % 2, so a buffer is
    // reused only after the transfer of step s - 2 finished.
    std::array<std::array<Fp8Message, 2>, kLanes> out, in;
    std::array<std::array<WorkPtr, 2>, kLanes> sends, recvs;
    for (int lane = 0; lane < kLanes; ++lane) {
      in[lane][0] = Fp8Message(chunk(lane, mod(rank_ - 1, n_)).length);
      recvs[lane][0] = recv(in[lane][0], lane);
      const Chunk own = chunk(lane, rank_);
      out[lane][0] = encode(input_ + own.start, own.length, 0);
      sends[lane][0] = send(out[lane][0], lane);
    }
    for (int s = 0; s < steps; ++s) {
      const int cur = s % 2, next = (s + 1) % 2;
      const bool more = s + 1 < steps;
      for (int lane = 0; lane < kLanes; ++lane) {
        recvs[lane][cur]->wait();
        const Chunk target = chunk(lane, mod(rank_ - s - 1, n_));
        if (more) {
          in[lane][next] = Fp8Message(chunk(lane, mod(rank_ - s - 2, n_)).length);
          recvs[lane][next] = recv(in[lane][next], lane);
        }
        Fp8Message& got = in[lane][cur];
        const uint64_t carried = got.saturated();
        const float* sum = accumulate(target, got);
        if (more) {
          if (sends[lane][next]) sends[lane][next]->wait();
          out[lane][next] = encode(sum, target.length, carried);
          sends[lane][next] = send(out[lane][next], lane);
        } else if (data_ != nullptr) {
          // This lane's chunk is fully reduced: its all-gather starts now,
          // while the other lane's last transfer may still be running.
          startAllGather(lane, carried);
        } else {
          total_ += carried;
        }
      }
    }
    for (auto& laneSends : sends) {
      for (auto& work : laneSends) {
        if (work) work->wait();
      }
    }
  }

  // Encodes this rank's reduced chunk of `lane`, sends it on, and only then
  // overwrites the chunk with its decoded values (off the peer's critical path).
  void startAllGather(int lane, uint64_t carried) {
    AllGatherLane& ag = ag_[lane];
    ag.messages.resize(n_);
    const Chunk own = chunk(lane, mod(rank_ + 1, n_));
    Fp8Message& ours = ag.messages[0];
    ours = encode(data_ + own.start, own.length, carried);
    total_ += ours.saturated();
    ag.messages[1] = Fp8Message(chunk(lane, rank_).length);
    ag.pendingRecv = recv(ag.messages[1], kLanes + lane);
    ag.sends.push_back(send(ours, kLanes + lane));
    decodeOutput(ours, own);
  }

  void allGather() {
    const int steps = n_ - 1;
    for (int s = 0; s < steps; ++s) {
      const bool more = s + 1 < steps;
      for (int lane = 0; lane < kLanes; ++lane) {
        AllGatherLane& ag = ag_[lane];
        ag.pendingRecv->wait();
        if (more) {
          ag.messages[s + 2] = Fp8Message(chunk(lane, mod(rank_ - s - 1, n_)).length);
          ag.pendingRecv = recv(ag.messages[s + 2], kLanes + lane);
        }
        Fp8Message& got = ag.messages[s + 1];
        if (more) ag.sends.push_back(send(got, kLanes + lane));  // forward first: the next rank waits for it
        total_ += got.saturated();
        const Chunk target = chunk(lane, mod(rank_ - s, n_));
        decodeOutput(got, target);
      }
    }
    for (auto& ag : ag_) {
      for (auto& work : ag.sends) work->wait();
    }
  }

  Communicator& comm_;
  const float* input_;
  float* data_;
  float* output_;
  int64_t numel_;
  int n_;
  int rank_;
  float scale_, inverse_;
  bool average_;
  CallOptions options_;
  uint64_t total_ = 0;          // saturated codes seen (see allReduce / reduceScatterOnly)
  std::vector<float> scratch_;  // reduce-scatter: a partial sum on its way to the next rank

  // One lane's all-gather: message k = 0 is ours, k = s + 1 the one received
  // at step s, kept until its forward completes.
  struct AllGatherLane {
    std::vector<Fp8Message> messages;
    std::vector<WorkPtr> sends;
    WorkPtr pendingRecv;
  };
  std::array<AllGatherLane, kLanes> ag_;
};

}  // namespace

int64_t fp8RingAllReduce(Communicator& comm, at::Tensor tensor, int exponent, bool average, CallOptions options) {
  float* data = tensor.data_ptr<float>();
  return Fp8Ring(comm, data, data, nullptr, tensor.numel(), exponent, average, options).allReduce();
}

int64_t fp8RingReduceScatter(Communicator& comm, const at::Tensor& input, at::Tensor output, int exponent,
                             bool average, CallOptions options) {
  return Fp8Ring(comm, input.data_ptr<float>(), nullptr, output.data_ptr<float>(), input.numel(), exponent, average,
                 options)
      .reduceScatterOnly();
}

}  // namespace detail

// --- The scale agreement and the public entry points. ---

namespace {

constexpr double kE4M3Max = 448.0;
// Scales stay within [2^-118, 2^126]: 2^126 and its inverse are normal
// floats, and below 2^-118 the fp32 partial sums (each at most
// 2 * 448 / s: a decoded partial plus one input) could overflow.
constexpr int kMaxExponent = 126;
constexpr int kMinExponent = -118;

// Largest k <= kMaxExponent with value * 2^k <= limit (value >= 0; exact:
// value and limit are doubles, ldexp is exact).
int largestExponent(double value, double limit) {
  if (value == 0) return kMaxExponent;
  int e = 0;
  std::frexp(limit / value, &e);
  int k = e - 1;
  while (std::ldexp(value, k) > limit) --k;
  while (std::ldexp(value, k + 1) <= limit) ++k;
  return std::min(k, kMaxExponent);
}

// max |x| over x, and whether any x is NaN or Inf, in one integer pass:
// |x|'s bits order like |x|, and NaN/Inf are the bits >= 0x7f800000.
float localAmax(const float* x, int64_t n, bool* nonFinite) {
  int32_t most = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    bits &= 0x7fffffff;
    most = bits > most ? bits : most;
  }
  *nonFinite = most >= 0x7f800000;
  float amax;
  std::memcpy(&amax, &most, sizeof(amax));
  return *nonFinite ? 0.0f : amax;
}

struct Agreement {
  int exponent = 0;
  float amax = 0;
};

// Collective: one fp64 all-reduce-max of [amax, numel, -numel, -exponent_r,
// nonfinite_0 .. nonfinite_{N-1}], then the same checks on every rank.
// mu < 0: the default no-overflow scale; else FP8-LM's, from mu.
Agreement agreeOnScale(Communicator& comm, const float* x, int64_t numel, double mu, CallOptions options,
                       const std::string& what) {
  const int n = comm.size();
  bool nonFinite = false;
  const float amax = localAmax(x, numel, &nonFinite);
  at::Tensor v = at::zeros({4 + n}, at::kDouble);
  double* p = v.data_ptr<double>();
  p[0] = amax;
  p[1] = static_cast<double>(numel);
  p[2] = -static_cast<double>(numel);
  p[3] = -(mu < 0 ? largestExponent(double{amax} * n, kE4M3Max) : largestExponent(amax, mu * kE4M3Max));
  p[4 + comm.rank()] = nonFinite ? 1.0 : 0.0;
  comm.allReduce(v, ReduceOp::kMax, options);
  TESSERA_CHECK_ARG(p[1] == -p[2], what << ": ranks passed " << static_cast<int64_t>(-p[2]) << " to "
                                        << static_cast<int64_t>(p[1]) << " elements (this rank " << numel
                                        << "); every rank must pass the same size");
  std::ostringstream bad;
  for (int q = 0, found = 0; q < n; ++q) {
    if (p[4 + q] != 0) bad << (found++ ? ", " : "") << q;
  }
  TESSERA_CHECK_ARG(bad.str().empty(), what << ": rank(s) " << bad.str()
                                            << " found NaN or Inf values in their input; the tensor is unchanged. "
                                               "Find the source of the non-finite values (e.g. skip the step) "
                                               "or use compression 'none'");
  Agreement agreed{static_cast<int>(-p[3]), static_cast<float>(p[0])};
  TESSERA_CHECK_ARG(agreed.amax == 0 || agreed.exponent >= kMinExponent,
                    what << ": values up to " << agreed.amax << " on " << n
                         << " ranks: their float32 partial sums could overflow. Scale the tensor down or use "
                            "compression 'none'");
  return agreed;
}

std::string describe(const Communicator& comm, const char* operation) {
  return std::string("fp8 ") + operation + " on group '" + comm.name() + "'";
}

}  // namespace

void Fp8AutoScaleConfig::validate(const std::string& prefix) const {
  auto powerOfTwo = [](double v) {
    int e = 0;
    return v > 0 && std::isfinite(v) && std::frexp(v, &e) == 0.5;
  };
  TESSERA_CHECK_CONFIG(max_saturated_fraction >= 0 && max_saturated_fraction < 1, prefix + "max_saturated_fraction",
                       "must be in [0, 1), got " << max_saturated_fraction << " (FP8-LM: 1e-5)");
  TESSERA_CHECK_CONFIG(stable_window >= 1, prefix + "stable_window",
                       "must be >= 1, got " << stable_window << " (FP8-LM: 1000)");
  TESSERA_CHECK_CONFIG(powerOfTwo(min_mu) && min_mu <= 1, prefix + "min_mu",
                       "must be a power of two in (0, 1], got " << min_mu);
  TESSERA_CHECK_CONFIG(powerOfTwo(initial_mu) && initial_mu >= min_mu && initial_mu <= 1, prefix + "initial_mu",
                       "must be a power of two in [min_mu, 1] = [" << min_mu << ", 1], got " << initial_mu);
}

Fp8AutoScaler::Fp8AutoScaler(Fp8AutoScaleConfig config) : config_(config), mu_(config.initial_mu) {
  config_.validate();
}

float Fp8AutoScaler::scaleFor(float amax) const {
  return std::ldexp(1.0f, largestExponent(amax, mu_ * kE4M3Max));
}

void Fp8AutoScaler::update(const Fp8CommStats& stats) {
  last_ = stats;
  ++calls_;
  totalSaturated_ += stats.saturated;
  totalEncoded_ += stats.encoded;
  if (stats.saturatedFraction() > config_.max_saturated_fraction) {
    if (mu_ > config_.min_mu) {
      mu_ /= 2;
      ++halvings_;
    }
    stable_ = 0;
    return;
  }
  if (++stable_ < config_.stable_window) return;
  stable_ = 0;
  if (mu_ < 1) {
    mu_ *= 2;
    ++doublings_;
  }
}

double Fp8AutoScaler::overallSaturatedFraction() const {
  return totalEncoded_ > 0 ? static_cast<double>(totalSaturated_) / totalEncoded_ : 0.0;
}

void Fp8AutoScaler::restore(double mu, int64_t stableCalls) {
  int e = 0;
  TESSERA_CHECK_ARG(mu >= config_.min_mu && mu <= 1 && std::frexp(mu, &e) == 0.5,
                    "Fp8AutoScaler::restore: mu must be a power of two in [" << config_.min_mu << ", 1], got " << mu);
  TESSERA_CHECK_ARG(stableCalls >= 0 && stableCalls < config_.stable_window,
                    "Fp8AutoScaler::restore: the window must be in [0, " << config_.stable_window << "), got "
                                                                        << stableCalls);
  mu_ = mu;
  stable_ = stableCalls;
  calls_ = halvings_ = doublings_ = totalSaturated_ = totalEncoded_ = 0;
  last_ = {};
}

Fp8CommStats fp8AllReduce(Communicator& comm, at::Tensor tensor, ReduceOp op, Fp8AutoScaler* scaler,
                          CallOptions options) {
  detail::checkCompressedArguments(comm, tensor, op, Compression::kFp8);
  Fp8CommStats stats;
  // One rank: the sum and the average are the tensor itself. Nothing to send.
  if (comm.size() == 1) return stats;
  const Agreement agreed = agreeOnScale(comm, tensor.data_ptr<float>(), tensor.numel(), scaler ? scaler->mu() : -1.0,
                                        options, describe(comm, "all-reduce"));
  if (tensor.numel() == 0) return stats;
  stats.amax = agreed.amax;
  if (agreed.amax == 0) {
    tensor.zero_();  // every rank holds zeros: so does the sum (and no scale exists)
  } else {
    stats.scale = std::ldexp(1.0f, agreed.exponent);
    stats.encoded = tensor.numel() * comm.size();
    stats.saturated = detail::fp8RingAllReduce(comm, tensor, agreed.exponent, op == ReduceOp::kAvg, options);
  }
  if (scaler != nullptr) scaler->update(stats);
  return stats;
}

WorkPtr fp8AllReduceAsync(CommPtr comm, at::Tensor tensor, ReduceOp op, Fp8AutoScaler* scaler, CallOptions options) {
  TESSERA_CHECK_ARG(comm != nullptr, "fp8AllReduceAsync needs a communicator, got null");
  detail::checkCompressedArguments(*comm, tensor, op, Compression::kFp8);  // bad arguments throw here, at the call
  const std::string what = describe(*comm, "all-reduce");
  return detail::runCompressedInBackground(
      std::move(comm), what,
      [tensor = std::move(tensor), op, scaler, options](Communicator& c) { fp8AllReduce(c, tensor, op, scaler, options); },
      options);
}

Fp8CommStats fp8ReduceScatter(Communicator& comm, at::Tensor input, at::Tensor output, ReduceOp op,
                              Fp8AutoScaler* scaler, CallOptions options) {
  detail::checkCompressedArguments(comm, input, op, Compression::kFp8);
  detail::checkCompressedArguments(comm, output, op, Compression::kFp8);
  const std::string what = describe(comm, "reduce-scatter");
  const int n = comm.size();
  TESSERA_CHECK_ARG(input.numel() == n * output.numel(),
                    what << ": input has " << input.numel() << " elements, output " << output.numel()
                         << "; input must hold size() * output.numel() = " << n * output.numel());
  Fp8CommStats stats;
  if (n == 1) {
    output.view({-1}).copy_(input.view({-1}));  // its own sum and average
    return stats;
  }
  const Agreement agreed =
      agreeOnScale(comm, input.data_ptr<float>(), input.numel(), scaler ? scaler->mu() : -1.0, options, what);
  if (input.numel() == 0) return stats;
  stats.amax = agreed.amax;
  if (agreed.amax == 0) {
    output.zero_();
  } else {
    stats.scale = std::ldexp(1.0f, agreed.exponent);
    stats.encoded = input.numel() * (n - 1);  // each element of the sum, N - 1 hops
    stats.saturated =
        detail::fp8RingReduceScatter(comm, input, output, agreed.exponent, op == ReduceOp::kAvg, options);
    if (scaler != nullptr) {
      // Each rank saw only its own chains: sum them, so every scaler moves alike.
      at::Tensor count = at::full({1}, static_cast<double>(stats.saturated), at::kDouble);
      comm.allReduce(count, ReduceOp::kSum, options);
      stats.saturated = static_cast<int64_t>(count.item<double>());
    }
  }
  if (scaler != nullptr) scaler->update(stats);
  return stats;
}

}  // namespace tessera::comm
