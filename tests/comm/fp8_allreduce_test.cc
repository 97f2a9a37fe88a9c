// The FP8 all-reduce and reduce-scatter (tessera/comm/fp8_allreduce.h) and
// FP8-LM's auto-scaler.
//
// Collective tests run real Gloo processes. Every rank draws each rank's
// input from a seed, so it computes the exact fp64 sum of all inputs itself
// and checks the FP8 result against it with the error bound derived below;
// results are all-gathered to check that every rank holds the same bytes.
//
// The bound. E4M3 has 3 mantissa bits: rounding a value v (in scaled units,
// v = x * s) to nearest costs at most half an ulp, 2^(floor(log2 |v|) - 4),
// and at most 2^-10 below the smallest normal 2^-6 (half the subnormal
// spacing 2^-9). The ring encodes each element's partial sums: N - 1 of them
// in the reduce-scatter, plus the full sum once for the all-gather. Every
// partial is at most S = s * sum_r |x_r| grown by the earlier hops' errors
// (each at most 2^-4 of the partial), so at most S * 1.0625^(E - 1) for E
// encodings, and
//     |result - exact| <= E * halfUlp(S * 1.0625^(E - 1)) / s   (+ fp32 slack)
// as long as no partial passes 448 (saturation; asserted: 0 saturated codes).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tessera/comm/compression.h"
#include "tessera/comm/fp8_allreduce.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tests/harness/multiprocess.h"

namespace tessera::comm {
namespace {

// Rank `rank`'s Gaussian input of `numel` values for run `seed`.
std::vector<float> gaussian(uint64_t seed, int rank, int64_t numel) {
  std::mt19937_64 gen(seed * 1000003 + static_cast<uint64_t>(rank));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(numel));
  for (float& x : v) x = normal(gen);
  return v;
}

at::Tensor toTensor(const std::vector<float>& v) {
  return at::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, at::kFloat).clone();
}

// Half an E4M3 ulp at magnitude v (scaled units), see the bound above.
double halfUlpE4M3(double v) {
  if (v < std::ldexp(1.0, -6)) return std::ldexp(1.0, -10);
  int e = 0;
  std::frexp(v, &e);  // v in [2^(e-1), 2^e)
  return std::ldexp(1.0, e - 1 - 4);
}

// The default scale, written out: 2^floor(log2(448 / (N * amax))).
double expectedScale(int ranks, double amax) { return std::exp2(std::floor(std::log2(448.0 / (ranks * amax)))); }

// Every rank's inputs and the exact (fp64) sums and absolute sums.
struct Reference {
  std::vector<double> sum, absSum;
  double amax = 0;
  Reference(uint64_t seed, int ranks, int64_t numel) : sum(numel, 0.0), absSum(numel, 0.0) {
    for (int r = 0; r < ranks; ++r) {
      const auto x = gaussian(seed, r, numel);
      for (int64_t i = 0; i < numel; ++i) {
        sum[i] += x[i];
        absSum[i] += std::abs(x[i]);
        amax = std::max(amax, static_cast<double>(std::abs(x[i])));
      }
    }
  }
};

// Checks |actual[i] - sum[offset + i] / divide| against the bound for E
// encodings at scale s; returns the largest error / bound ratio.
double checkBound(const at::Tensor& actual, const Reference& ref, int64_t offset, double divide, int encodings,
                  double scale, const std::string& what) {
  const float* a = actual.data_ptr<float>();
  const double growth = std::pow(1.0625, encodings - 1);
  double worst = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double s = ref.absSum[offset + i];
    const double bound = (encodings * halfUlpE4M3(s * scale * growth) / scale + 1e-6 * s) / divide;
    const double err = std::abs(a[i] - ref.sum[offset + i] / divide);
    TESSERA_CHECK(err <= bound, what << ": element " << offset + i << " = " << a[i] << ", exact "
                                     << ref.sum[offset + i] / divide << ", error " << err << " > bound " << bound);
    worst = std::max(worst, err / bound);
  }
  return worst;
}

double relativeRmsError(const at::Tensor& actual, const Reference& ref, int64_t offset, double divide) {
  const float* a = actual.data_ptr<float>();
  double err = 0, norm = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double e = ref.sum[offset + i] / divide;
    err += (a[i] - e) * (a[i] - e);
    norm += e * e;
  }
  return norm > 0 ? std::sqrt(err / norm) : std::sqrt(err);
}

// Throws unless every rank of comm holds the same bytes in t.
void expectIdenticalOnAllRanks(Communicator& comm, const at::Tensor& t, const std::string& what) {
  auto gathered = at::empty({comm.size() * t.numel()}, at::kFloat);
  comm.allGather(t, gathered);
  const size_t bytes = static_cast<size_t>(t.numel()) * sizeof(float);
  for (int r = 0; r < comm.size(); ++r) {
    TESSERA_CHECK(std::memcmp(gathered.data_ptr<float>() + r * t.numel(), t.data_ptr<float>(), bytes) == 0,
                  what << ": rank " << r << " ended with different bytes than rank " << comm.rank());
  }
}

// Relative RMS error on Gaussian data: each E4M3 encoding costs ~2.6% RMS
// of the value encoded (3 mantissa bits), applied to partials of 1 .. N
// inputs and the full sum. Measured (seeds below): all-reduce 3.24%, 3.74%,
// 4.19% on 2, 3, 4 ranks; reduce-scatter (no final encoding) 1.87%, 2.65%,
// 3.24%. The bounds leave ~10% headroom.
double rmsBound(int ranks) { return ranks <= 2 ? 0.036 : ranks == 3 ? 0.041 : 0.046; }
double reduceScatterRmsBound(int ranks) { return ranks <= 2 ? 0.021 : ranks == 3 ? 0.029 : 0.036; }

// ---------- in-process ----------

TEST(Fp8AllReduce, ParseAndPrint) {
  EXPECT_EQ(parseCompression("fp8"), Compression::kFp8);
  EXPECT_STREQ(toString(Compression::kFp8), "fp8");
  try {
    parseCompression("fp4", "diloco.compression");
    FAIL() << "fp4 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("none, int8, fp8"), std::string::npos) << e.what();
  }
}

TEST(Fp8AllReduce, RejectsBadArguments) {
  auto comm = makeSingleRankCommunicator();
  EXPECT_THROW(allReduceCompressed(*comm, at::ones({4}, at::kDouble), ReduceOp::kSum, Compression::kFp8),
               InvalidArgument);
  EXPECT_THROW(fp8AllReduce(*comm, at::ones({4}), ReduceOp::kMax), InvalidArgument);
  EXPECT_THROW(fp8AllReduceAsync(comm, at::ones({4, 4}).t(), ReduceOp::kSum), InvalidArgument);
  EXPECT_THROW(fp8ReduceScatter(*comm, at::ones({4}), at::ones({3}), ReduceOp::kSum), InvalidArgument);
  EXPECT_THROW(reduceScatterCompressed(*comm, at::ones({4}), at::ones({4}), ReduceOp::kSum, Compression::kInt8),
               InvalidArgument);
}

TEST(Fp8AllReduce, GroupOfOneReturnsAtOnce) {
  auto comm = makeSingleRankCommunicator();
  auto t = toTensor(gaussian(5, 0, 33));
  const auto before = t.clone();
  const Fp8CommStats stats = fp8AllReduce(*comm, t, ReduceOp::kAvg);
  EXPECT_TRUE(at::equal(t, before));
  EXPECT_EQ(stats.encoded, 0);
  allReduceCompressedAsync(comm, t, ReduceOp::kSum, Compression::kFp8)->wait();
  EXPECT_TRUE(at::equal(t, before));
  auto out = at::zeros({33});
  reduceScatterCompressed(*comm, t, out, ReduceOp::kSum, Compression::kFp8);
  EXPECT_TRUE(at::equal(out, before));
}

TEST(Fp8AutoScaler, HalvesOnOverflowAndDoublesAfterTheWindow) {
  Fp8AutoScaleConfig config;
  config.max_saturated_fraction = 0.01;
  config.stable_window = 3;
  config.initial_mu = 0.5;
  Fp8AutoScaler scaler(config);
  auto call = [&](int64_t saturated) {
    Fp8CommStats stats;
    stats.encoded = 1000;
    stats.saturated = saturated;
    scaler.update(stats);
    return scaler.mu();
  };
  EXPECT_EQ(call(11), 0.25);   // 1.1% > 1%: halve
  EXPECT_EQ(call(10), 0.25);   // 1.0% is not above the rate: stable 1
  EXPECT_EQ(call(0), 0.25);    // stable 2
  EXPECT_EQ(call(50), 0.125);  // overflow restarts the window
  EXPECT_EQ(call(0), 0.125);
  EXPECT_EQ(call(0), 0.125);
  EXPECT_EQ(call(0), 0.25);  // 3 stable calls: double
  EXPECT_EQ(scaler.stableCalls(), 0);
  for (int i = 0; i < 6; ++i) call(0);
  EXPECT_EQ(scaler.mu(), 1.0);  // capped at 1
  for (int i = 0; i < 3; ++i) call(0);
  EXPECT_EQ(scaler.mu(), 1.0);
  EXPECT_EQ(scaler.halvings(), 2);
  EXPECT_EQ(scaler.doublings(), 3);
  EXPECT_EQ(scaler.calls(), 16);
  EXPECT_DOUBLE_EQ(scaler.lastSaturatedFraction(), 0.0);
  EXPECT_DOUBLE_EQ(scaler.overallSaturatedFraction(), (11 + 10 + 50) / 16000.0);
  // scaleFor: the largest power of two with amax * s <= mu * 448.
  EXPECT_EQ(scaler.scaleFor(1.0f), 256.0f);
  EXPECT_EQ(scaler.scaleFor(448.0f), 1.0f);
  EXPECT_EQ(scaler.scaleFor(448.5f), 0.5f);
  scaler.restore(0.125, 2);
  EXPECT_EQ(scaler.scaleFor(1.0f), 32.0f);
  EXPECT_EQ(call(0), 0.25);
  EXPECT_THROW(scaler.restore(0.3, 0), InvalidArgument);
  Fp8AutoScaleConfig bad;
  bad.initial_mu = 2;
  EXPECT_THROW(Fp8AutoScaler{bad}, ConfigError);
  bad = {};
  bad.stable_window = 0;
  EXPECT_THROW(bad.validate("ddp.fp8."), ConfigError);
}

// ---------- on real processes ----------

// Gaussian inputs: the bound, RMS error, the scale, identical bytes, wire bytes.
TESSERA_WORKER(fp8_gaussian) {
  at::set_num_threads(1);
  auto comm = ctx.world();
  const int n = ctx.size;
  const uint64_t seed = std::stoull(ctx.arg("seed", "1"));
  for (const int64_t numel : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{100003}}) {
    const Reference ref(seed + numel, n, numel);
    for (const ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      const std::string what = "fp8 " + std::string(toString(op)) + " of " + std::to_string(numel) + " on " +
                               std::to_string(n) + " ranks";
      auto t = toTensor(gaussian(seed + numel, ctx.rank, numel));
      comm->resetStats();
      const Fp8CommStats stats = fp8AllReduce(*comm, t, op);
      const auto wire = comm->stats();
      if (numel == 0) continue;
      TESSERA_CHECK(stats.scale == expectedScale(n, ref.amax), what << ": scale " << stats.scale << ", expected "
                                                                     << expectedScale(n, ref.amax));
      TESSERA_CHECK(stats.saturated == 0 && stats.encoded == n * numel, what << ": " << stats.saturated << " of "
                                                                             << stats.encoded << " saturated");
      const double divide = op == ReduceOp::kAvg ? n : 1;
      const double worst = checkBound(t, ref, 0, divide, n, stats.scale, what);
      const double rms = relativeRmsError(t, ref, 0, divide);
      expectIdenticalOnAllRanks(*comm, t, what);
      if (numel < 1000) continue;
      TESSERA_CHECK(rms <= rmsBound(n), what << ": relative RMS error " << rms << " > " << rmsBound(n));
      // fp32 ring: 2 (N-1)/N * 4 bytes per value; fp8: a quarter, plus 8-byte headers.
      const double fp32Bytes = 2.0 * (n - 1) / n * 4.0 * numel;
      const double sent = static_cast<double>(wire.of(OpKind::kSend).bytesSent);
      TESSERA_CHECK(sent >= 0.25 * fp32Bytes - 4 && sent < 0.2502 * fp32Bytes,
                    what << ": sent " << sent << " bytes, expected a quarter of " << fp32Bytes);
      std::printf("%s: relative RMS error %.4f, worst error/bound %.3f, %.0f bytes sent (fp32 ring %.0f)\n",
                  what.c_str(), rms, worst, sent, fp32Bytes);
    }
  }
  // Reduce-scatter: against the fp64 sum (N - 1 encodings) and comm.reduceScatter.
  const int64_t part = 25013;
  const Reference ref(seed + 99, n, n * part);
  for (const ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
    const std::string what = "fp8 reduce-scatter " + std::string(toString(op)) + " on " + std::to_string(n) + " ranks";
    const auto input = toTensor(gaussian(seed + 99, ctx.rank, n * part));
    const auto inputBefore = input.clone();
    auto output = at::empty({part}), exact32 = at::empty({part});
    comm->resetStats();
    const Fp8CommStats stats = fp8ReduceScatter(*comm, input, output, op);
    const double sent = static_cast<double>(comm->stats().of(OpKind::kSend).bytesSent);
    comm->reduceScatter(input.clone(), exact32, op);
    TESSERA_CHECK(at::equal(input, inputBefore), what << ": the input was modified");
    TESSERA_CHECK(stats.scale == expectedScale(n, ref.amax), what << ": scale " << stats.scale);
    const double divide = op == ReduceOp::kAvg ? n : 1;
    const double worst = checkBound(output, ref, ctx.rank * part, divide, n - 1, stats.scale, what);
    // comm.reduceScatter is the exact sum up to fp32 rounding: within the same bound (+ its slack).
    const double growth = std::pow(1.0625, n - 2);
    for (int64_t i = 0; i < part; ++i) {
      const double s = ref.absSum[ctx.rank * part + i];
      const double bound = ((n - 1) * halfUlpE4M3(s * stats.scale * growth) / stats.scale + 2e-6 * s) / divide;
      const double err = std::abs(output.data_ptr<float>()[i] - exact32.data_ptr<float>()[i]);
      TESSERA_CHECK(err <= bound, what << ": element " << i << " differs from comm.reduceScatter by " << err);
    }
    const double fp32Bytes = (n - 1.0) / n * 4.0 * n * part;
    TESSERA_CHECK(sent >= 0.25 * fp32Bytes - 4 && sent < 0.2502 * fp32Bytes,
                  what << ": sent " << sent << " bytes, expected a quarter of " << fp32Bytes);
    const double rms = relativeRmsError(output, ref, ctx.rank * part, divide);
    TESSERA_CHECK(rms <= reduceScatterRmsBound(n), what << ": relative RMS error " << rms);
    std::printf("%s: relative RMS error %.4f, worst error/bound %.3f, %.0f bytes sent (fp32 %.0f)\n", what.c_str(),
                rms, worst, sent, fp32Bytes);
  }
}

TEST(Fp8AllReduce, GaussianTwoRanks) {
  auto result = testing::runWorkers("fp8_gaussian", {.ranks = 2, .args = {{"seed", "11"}}});
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

TEST(Fp8AllReduce, GaussianThreeRanks) {
  auto result = testing::runWorkers("fp8_gaussian", {.ranks = 3, .args = {{"seed", "12"}}});
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

TEST(Fp8AllReduce, GaussianFourRanks) {
  auto result = testing::runWorkers("fp8_gaussian", {.ranks = 4, .args = {{"seed", "13"}}});
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

// Exact cases, zeros, non-finite input, sizes, too-large values, async.
TESSERA_WORKER(fp8_exact_and_errors) {
  at::set_num_threads(1);
  auto comm = ctx.world();
  const int n = ctx.size;  // 3
  constexpr int64_t kNumel = 1001;

  // 384 on every rank: s = 2^floor(log2(448 / 1152)) = 1/4, so each 96 and
  // every partial sum (192, 288) are E4M3 codes: the sum 1152 comes back
  // exactly. Without the N in the scale (s = 1) the partial 768 would
  // saturate at 448.
  auto big = at::full({kNumel}, 384.0f);
  Fp8CommStats stats = fp8AllReduce(*comm, big, ReduceOp::kSum);
  TESSERA_CHECK(stats.scale == 0.25f && stats.saturated == 0, "scale " << stats.scale << ", saturated "
                                                                       << stats.saturated);
  TESSERA_CHECK(at::equal(big, at::full({kNumel}, 1152.0f)), "384 * 3 came back as " << big.max().item<float>());
  // Each rank (r + 1) * 0.5 with the sign alternating: representable partials, exact sum and average.
  auto small = at::arange(kNumel).remainder(2).mul(-2).add(1).mul(0.5f * (ctx.rank + 1)).to(at::kFloat);
  auto expected = at::arange(kNumel).remainder(2).mul(-2).add(1).mul(0.5f * n * (n + 1) / 2).to(at::kFloat);
  auto avg = small.clone();
  allReduceCompressed(*comm, small, ReduceOp::kSum, Compression::kFp8);
  TESSERA_CHECK(at::equal(small, expected), "alternating halves: " << (small - expected).abs().max().item<float>());
  allReduceCompressed(*comm, avg, ReduceOp::kAvg, Compression::kFp8);
  TESSERA_CHECK(at::equal(avg, expected / n), "alternating halves, avg");

  // All zeros: exact zeros, no scale.
  auto zeros = at::zeros({kNumel});
  stats = fp8AllReduce(*comm, zeros, ReduceOp::kAvg);
  TESSERA_CHECK(at::equal(zeros, at::zeros({kNumel})) && stats.scale == 0, "zeros did not stay zeros");

  // Non-finite input on the last rank: every rank throws naming it; tensors unchanged.
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    auto t = toTensor(gaussian(21, ctx.rank, kNumel));
    if (ctx.rank == n - 1) t[kNumel / 2].fill_(bad);
    const auto before = t.clone();
    bool threw = false;
    try {
      fp8AllReduce(*comm, t, ReduceOp::kSum);
    } catch (const InvalidArgument& e) {
      threw = true;
      TESSERA_CHECK(std::string(e.what()).find("rank(s) " + std::to_string(n - 1) + " found NaN or Inf") !=
                        std::string::npos,
                    "unclear error: " << e.what());
    }
    TESSERA_CHECK(threw, "rank " << ctx.rank << " did not throw for a " << bad << " on rank " << n - 1);
    TESSERA_CHECK(at::equal(t.nan_to_num(0, 0, 0), before.nan_to_num(0, 0, 0)), "the tensor changed");
    // The reduce-scatter too.
    auto out = at::empty({kNumel / n});
    threw = false;
    try {
      fp8ReduceScatter(*comm, t.narrow(0, 0, kNumel / n * n), out, ReduceOp::kSum);
    } catch (const InvalidArgument&) {
      threw = true;
    }
    TESSERA_CHECK(threw, "rank " << ctx.rank << ": the reduce-scatter did not throw for a " << bad);
  }
  // Values whose fp32 partial sums could overflow: an error on every rank.
  auto huge = at::full({kNumel}, 3e38f);
  bool threw = false;
  try {
    fp8AllReduce(*comm, huge, ReduceOp::kSum);
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()).find("could overflow") != std::string::npos;
  }
  TESSERA_CHECK(threw, "3e38 on " << n << " ranks was not refused");
  // Different sizes: a clear error, not a hang.
  auto uneven = at::ones({ctx.rank == 0 ? 0 : 1000 + ctx.rank});
  try {
    fp8AllReduce(*comm, uneven, ReduceOp::kSum);
    TESSERA_CHECK(false, "tensors of different sizes were accepted");
  } catch (const InvalidArgument& e) {
    TESSERA_CHECK(std::string(e.what()).find("every rank must pass the same size") != std::string::npos, e.what());
  }
  // Async equals blocking, through both entry points; the communicator still works.
  const auto x = toTensor(gaussian(31, ctx.rank, 4099));
  auto blocking = x.clone(), async = x.clone(), viaCompression = x.clone();
  fp8AllReduce(*comm, blocking, ReduceOp::kAvg);
  WorkPtr work = fp8AllReduceAsync(comm, async, ReduceOp::kAvg);
  work->wait();
  TESSERA_CHECK(work->isCompleted() && at::equal(async, blocking), "async fp8 differs from blocking");
  allReduceCompressedAsync(comm, viaCompression, ReduceOp::kAvg, Compression::kFp8)->wait();
  TESSERA_CHECK(at::equal(viaCompression, blocking), "allReduceCompressedAsync(kFp8) differs");
  auto ones = at::ones({5});
  comm->allReduce(ones);
  TESSERA_CHECK(at::equal(ones, at::full({5}, static_cast<float>(n))), "communicator broken afterwards");
}

TEST(Fp8AllReduce, ExactCasesAndErrorsThreeRanks) {
  auto result = testing::runWorkers("fp8_exact_and_errors", {.ranks = 3});
  ASSERT_TRUE(result.ok()) << result.report();
}

// FP8-LM's rule on 2 ranks with a constant 1.0 everywhere: at mu = 1 the scale
// is 256, the partial 256 fits but the sum 512 saturates (half of the 2 *
// numel encodings), so mu halves; at mu = 1/2 the sum 256 fits.
TESSERA_WORKER(fp8_auto_scaler) {
  at::set_num_threads(1);
  auto comm = ctx.world();
  const int n = ctx.size;
  Fp8AutoScaleConfig config;
  config.max_saturated_fraction = 1e-3;
  config.stable_window = 2;
  Fp8AutoScaler scaler(config);
  constexpr int64_t kNumel = 3001;
  const std::vector<double> expectedMu = {0.5, 0.5, 1.0, 0.5};      // after each call
  const std::vector<double> expectedFraction = {0.5, 0.0, 0.0, 0.5};
  for (size_t call = 0; call < expectedMu.size(); ++call) {
    auto t = at::ones({kNumel});
    const double mu = scaler.mu();
    const Fp8CommStats stats = fp8AllReduce(*comm, t, ReduceOp::kSum, &scaler);
    TESSERA_CHECK(stats.scale == 256 * mu, "call " << call << ": scale " << stats.scale << " at mu " << mu);
    TESSERA_CHECK(scaler.mu() == expectedMu[call] && scaler.lastSaturatedFraction() == expectedFraction[call],
                  "call " << call << ": mu " << scaler.mu() << ", saturated " << scaler.lastSaturatedFraction());
    const float expectedValue = mu == 1 ? 448.0f / 256 : 2.0f;  // saturated sum, or exact
    TESSERA_CHECK(at::equal(t, at::full({kNumel}, expectedValue)), "call " << call << ": " << t[0].item<float>());
  }
  TESSERA_CHECK(scaler.overallSaturatedFraction() == 0.25, "overall " << scaler.overallSaturatedFraction());
  TESSERA_CHECK(scaler.halvings() == 2 && scaler.doublings() == 1, "halvings/doublings");
  // The default scale never saturates on the same data: 2^floor(log2(448 / 2)) = 128.
  auto t = at::ones({kNumel});
  const Fp8CommStats safe = fp8AllReduce(*comm, t, ReduceOp::kSum);
  TESSERA_CHECK(safe.scale == 128 && safe.saturated == 0 && at::equal(t, at::full({kNumel}, 2.0f)), "default");

  // The shared scale is the minimum of the ranks' scales: rank r's amax is
  // 2^r * 1.5, so its own scale is 2^floor(log2(448 / 1.5)) / 2^r and the
  // minimum is the last rank's.
  Fp8AutoScaler fresh(config);
  auto x = toTensor(gaussian(41, ctx.rank, 5000)).clamp(-1, 1);
  x[17].fill_(std::ldexp(1.5f, ctx.rank));
  const float own = fresh.scaleFor(std::ldexp(1.5f, ctx.rank));
  auto mine = at::full({1}, own), least = mine.clone();
  comm->allReduce(least, ReduceOp::kMin);
  const Fp8CommStats shared = fp8AllReduce(*comm, x, ReduceOp::kSum, &fresh);
  TESSERA_CHECK(shared.scale == least.item<float>() && shared.scale == std::ldexp(256.0f, -(n - 1)),
                "shared scale " << shared.scale << ", min over ranks " << least.item<float>() << ", own " << own);
  // A reduce-scatter moves every rank's scaler alike: it sums the ranks'
  // saturation counts. Part 0's chain starts on rank 1 (ring chunk 1), whose
  // 10 values 1.75 encode to exactly 448 at scale 256 (1.75 * 256): 10
  // saturated codes, seen first by rank 0 only; 10 / (2 * 3001) > 1e-3 halves mu.
  Fp8AutoScaler rs(config);
  auto in = at::ones({n * kNumel}), out = at::empty({kNumel});
  if (ctx.rank == 1) in.narrow(0, 0, 10).fill_(1.75f);
  const Fp8CommStats rsStats = fp8ReduceScatter(*comm, in, out, ReduceOp::kSum, &rs);
  TESSERA_CHECK(rsStats.scale == 256 && rsStats.saturated == 10 && rsStats.encoded == n * kNumel * (n - 1),
                "reduce-scatter: scale " << rsStats.scale << ", saturated " << rsStats.saturated << " of "
                                         << rsStats.encoded);
  TESSERA_CHECK(rs.mu() == 0.5 && rs.halvings() == 1, "reduce-scatter: mu " << rs.mu());
  const float first = ctx.rank == 0 ? 2.75f : 2.0f;
  TESSERA_CHECK(out[0].item<float>() == first && out[kNumel - 1].item<float>() == 2.0f, "reduce-scatter values");
}

TEST(Fp8AutoScaler, HalvingDoublingAndSharedMinimumTwoRanks) {
  auto result = testing::runWorkers("fp8_auto_scaler", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::comm
