// Gradient communication in fp32 / bf16 / fp8 (gradient_comm.h) through DDP
// and FSDP, over real Gloo processes. The reference is independent of both:
// each rank computes its local fp32 gradient with torch::autograd::grad on a
// plain copy of the model, the ranks' gradients are all-gathered, and the
// exact average (fp64) and the per-element sum of magnitudes S = sum_r |g_r|
// give each mode's error bound, derived from its roundings:
//   bf16: every input and every one of the n - 1 partial sums is rounded once
//         to bf16 (unit roundoff u = 2^-8) and each is bounded by S, so the
//         sum is within n * u * S and the average within u * S.
//   fp8:  the ring encodes each partial sum (n encodings per element with the
//         all-gather) in E4M3 under one scale 2^e <= 448 / (n * amax), so none
//         saturates; each encoding is within 2^-4 of the value relatively or
//         2^-10 / 2^e absolutely (subnormals), and 1 / 2^e < 2 n amax / 448:
//         the average is within 2^-4 * S + 2^-9 * n * amax / 448.
// Both get 1% slack for the partial sums' own growth. fp32 must equal (g0 +
// g1) / 2 exactly on two ranks (the sum of two floats does not depend on the
// order, so that is the fp32 path's result whatever the bucketing).
#include <gtest/gtest.h>

#include <torch/autograd.h>
#include <torch/nn.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tessera/comm/compression.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/parallel/ddp.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/gradient_comm.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

constexpr int64_t kIn = 128;
constexpr int64_t kHidden = 256;
constexpr int64_t kOut = 64;
constexpr int64_t kRows = 16;

// Everything the bounds need about one flat gradient, from every rank's copy.
struct Reference {
  at::Tensor average;   // (P,) fp64, the exact average over ranks
  at::Tensor absSum;    // (P,) fp64, sum over ranks of |g_r|
  double amax = 0;      // max over ranks and elements of |g_r|
  at::Tensor perRank;   // (n, P) fp32, every rank's gradient
};

// Collective over comm: every rank's `local` (fp32, (P,)) gathered.
Reference referenceOf(const comm::CommPtr& comm, const at::Tensor& local) {
  const int n = comm->size();
  at::Tensor all = at::empty({n * local.numel()}, at::kFloat);
  comm->allGather(local.contiguous(), all);
  Reference ref;
  ref.perRank = all.view({n, local.numel()});
  const at::Tensor wide = ref.perRank.to(at::kDouble);
  ref.average = wide.sum(0) / n;
  ref.absSum = wide.abs().sum(0);
  ref.amax = wide.abs().max().item<double>();
  return ref;
}

// The per-element error bound of `mode` (file comment), (P,) fp64.
at::Tensor boundOf(GradientComm mode, const Reference& ref, int n) {
  switch (mode) {
    case GradientComm::kFp32: return ref.absSum * 1e-6 + 1e-30;
    case GradientComm::kBf16: return ref.absSum * (1.01 * std::ldexp(1.0, -8)) + 1e-30;
    case GradientComm::kFp8:
      return ref.absSum * (1.01 * std::ldexp(1.0, -4)) + 1.01 * std::ldexp(1.0, -9) * n * ref.amax / 448.0 + 1e-30;
  }
  return ref.absSum;
}

// Throws naming the worst element when `got` (fp32) leaves the bound.
void checkWithinBound(const at::Tensor& got, const Reference& ref, const at::Tensor& bound, const std::string& what) {
  const at::Tensor excess = (got.to(at::kDouble).reshape({-1}) - ref.average).abs() - bound;
  const int64_t worst = excess.argmax().item<int64_t>();
  TESSERA_CHECK(excess[worst].item<double>() <= 0,
                what << ": element " << worst << " is " << got.reshape({-1})[worst].item<float>() << ", the exact "
                     << "average " << ref.average[worst].item<double>() << ", bound " << bound[worst].item<double>());
}

// Collective over comm: every rank holds the same bits in `t`.
void checkBitIdentical(const comm::CommPtr& comm, const at::Tensor& t, const std::string& what) {
  const Reference all = referenceOf(comm, t.reshape({-1}));
  for (int r = 1; r < comm->size(); ++r) {
    TESSERA_CHECK(at::equal(all.perRank[r], all.perRank[0]), what << ": rank " << r << " differs from rank 0");
  }
}

uint64_t bytesSent(const comm::CommPtr& comm) { return comm->stats().totalBytesSent(); }

// ---- DDP ----------------------------------------------------------------------

// tanh(x W1^T + b1) W2^T + b2 against y; parameters W1 (256, 128), b1, W2 (64, 256), b2.
at::Tensor mlpLoss(const std::vector<at::Tensor>& p, const at::Tensor& x, const at::Tensor& y) {
  const at::Tensor h = at::tanh(at::linear(x, p[0], p[1]));
  return at::mse_loss(at::linear(h, p[2], p[3]), y);
}

std::vector<at::Tensor> leafCopies(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : params) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

at::Tensor flatOf(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : tensors) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

// Every rank: its local gradient, then DDP in fp32, bf16 and fp8 (small
// buckets: several per step, so fp8 chains them), each against the bound, bit-
// identical across ranks, and with the wire bytes measured on the comm.
TESSERA_WORKER(ddp_grad_comm) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  torch::manual_seed(7);  // the same parameters everywhere
  const std::vector<at::Tensor> params = {at::randn({kHidden, kIn}) * 0.1, at::randn({kHidden}) * 0.1,
                                          at::randn({kOut, kHidden}) * 0.1, at::randn({kOut}) * 0.1};
  torch::manual_seed(100 + world->rank());  // this rank's data
  const at::Tensor x = at::randn({kRows, kIn});
  const at::Tensor y = at::randn({kRows, kOut});

  std::vector<at::Tensor> plain = leafCopies(params);
  const Reference ref = referenceOf(world, flatOf(torch::autograd::grad({mlpLoss(plain, x, y)}, plain)));
  const int64_t numel = ref.average.numel();

  std::map<GradientComm, uint64_t> wire;
  std::map<GradientComm, at::Tensor> result;
  for (GradientComm mode : {GradientComm::kFp32, GradientComm::kBf16, GradientComm::kFp8}) {
    std::vector<at::Tensor> copies = leafCopies(params);
    std::vector<DistributedDataParallel::NamedParameter> named;
    for (size_t i = 0; i < copies.size(); ++i) named.emplace_back("p" + std::to_string(i), copies[i]);
    DdpConfig config;
    config.bucketCapBytes = 48 * 1024;  // W2 (64 KB) alone, W1 (128 KB) alone, the biases together
    config.gradComm = mode;
    Ddp ddp(named, world, config);
    TESSERA_CHECK(ddp.bucketParameterNames().size() >= 3, "expected several buckets");
    const uint64_t before = bytesSent(world);
    mlpLoss(copies, x, y).backward();
    ddp.finishGradientSync();
    wire[mode] = bytesSent(world) - before;
    std::vector<at::Tensor> grads;
    for (const at::Tensor& p : copies) grads.push_back(p.grad());
    result[mode] = flatOf(grads);

    const std::string what = std::string("DDP ") + toString(mode);
    checkWithinBound(result[mode], ref, boundOf(mode, ref, n), what);
    checkBitIdentical(world, result[mode], what);
    const DdpSyncStats stats = ddp.lastStepStats();
    TESSERA_CHECK_EQ(stats.bytes, numel * gradientWireBytes(mode));
    TESSERA_CHECK_EQ(stats.bytesByComm.at(world->name()), stats.bytes);
  }
  if (n == 2) {
    const at::Tensor exact = (ref.perRank[0] + ref.perRank[1]) / 2;
    TESSERA_CHECK(at::equal(result[GradientComm::kFp32], exact), "DDP fp32 is not exactly (g0 + g1) / 2");
  }
  // The compressed modes really compressed: their values differ from fp32's.
  TESSERA_CHECK(!at::equal(result[GradientComm::kBf16], result[GradientComm::kFp32]), "bf16 equals fp32");
  TESSERA_CHECK(!at::equal(result[GradientComm::kFp8], result[GradientComm::kFp32]), "fp8 equals fp32");
  const double bf16Ratio = static_cast<double>(wire[GradientComm::kBf16]) / wire[GradientComm::kFp32];
  const double fp8Ratio = static_cast<double>(wire[GradientComm::kFp8]) / wire[GradientComm::kFp32];
  std::printf("rank %d: wire bytes fp32 %llu, bf16 %llu (%.4f), fp8 %llu (%.4f)\n", world->rank(),
              static_cast<unsigned long long>(wire[GradientComm::kFp32]),
              static_cast<unsigned long long>(wire[GradientComm::kBf16]), bf16Ratio,
              static_cast<unsigned long long>(wire[GradientComm::kFp8]), fp8Ratio);
  TESSERA_CHECK(std::abs(bf16Ratio - 0.5) < 0.01, "bf16 sent " << bf16Ratio << " of fp32's bytes, expected 1/2");
  TESSERA_CHECK(fp8Ratio > 0.24 && fp8Ratio < 0.28, "fp8 sent " << fp8Ratio << " of fp32's bytes, expected ~1/4");
}

// ---- FSDP ---------------------------------------------------------------------

struct TanhLayerImpl : torch::nn::Module {
  TanhLayerImpl(int64_t in, int64_t out) : linear(register_module("linear", torch::nn::Linear(in, out))) {}
  at::Tensor forward(const at::Tensor& x) { return torch::tanh(linear(x)); }
  torch::nn::Linear linear;
};
TORCH_MODULE(TanhLayer);

torch::nn::Sequential makeSequential() {
  torch::manual_seed(11);
  return torch::nn::Sequential(TanhLayer(kIn, kHidden), TanhLayer(kHidden, kHidden), torch::nn::Linear(kHidden, kOut));
}

// FSDP over units "0" and "1" and the root (the last Linear), in `mode`:
// every unit's shard gradient against the same slice of the reference
// (each unit's flat gradient, padded, in FSDP's registration order).
// hybrid=1 (4 ranks): sharded over pairs {0,1} {2,3}, replicated over {0,2}
// {1,3}; the replicate all-reduce runs in `mode` too. Its fp8 bound: the
// reduce-scatter's average over a pair is within 2^-4 S_j + 2^-9 2 amax / 448
// of the pair's, the all-reduce of the two adds 2^-4 (|a_0| + |a_1|) +
// 2^-9 2 amax / 448 plus the mean of their errors: 2^-4 S + 2^-9 4 amax / 448
// in all, the 4-rank formula, except that |a_j| may exceed S_j / 2 by its own
// error (2^-4 S_j): 10% slack instead of 1%.
TESSERA_WORKER(fsdp_grad_comm) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  const GradientComm mode = parseGradientComm(ctx.arg("mode"));
  const bool hybrid = ctx.arg("hybrid") == "1";
  const Fp8Scaling scaling = parseFp8Scaling(ctx.arg("scaling", "safe"));
  TESSERA_CHECK(!hybrid || n == 4, "the hybrid case runs on 4 ranks");
  const comm::CommPtr shard = hybrid ? world->split(rank / 2, rank, "shard") : world;
  const comm::CommPtr replicate = hybrid ? world->split(rank % 2, rank, "replicate") : nullptr;
  torch::manual_seed(200 + rank);
  const at::Tensor x = at::randn({kRows, kIn});
  const at::Tensor y = at::randn({kRows, kOut});

  torch::nn::Sequential plain = makeSequential();
  torch::mse_loss(plain->forward(x), y).backward();
  const std::vector<std::string> unitOf = {"0", "1", "2"};  // FSDP's units in shards() order: "0", "1", root

  torch::nn::Sequential model = makeSequential();
  std::vector<FsdpUnitSpec> units;
  for (size_t i = 0; i < 2; ++i) {
    auto unit = model->ptr<TanhLayerImpl>(i);
    FsdpUnitSpec spec;
    spec.prefix = std::to_string(i);
    spec.forward = [unit](const at::Tensor& in) { return unit->forward(in); };
    units.push_back(std::move(spec));
  }
  FsdpConfig config;
  config.gradComm = mode;
  config.fp8Scaling = scaling;
  Fsdp fsdp(*model, units, shard, replicate, config);
  fsdp.beforeForward();
  const at::Tensor h = fsdp.forwardUnit(1, fsdp.forwardUnit(0, x));
  torch::mse_loss(model->ptr<torch::nn::LinearImpl>(2)->forward(h), y).backward();
  fsdp.finishGradientSync();

  const std::vector<at::Tensor> shards = fsdp.shards();
  const auto layout = fsdp.layout();
  TESSERA_CHECK_EQ(shards.size(), 3u);
  for (size_t u = 0; u < shards.size(); ++u) {
    std::vector<at::Tensor> grads;
    for (const auto& item : plain->named_parameters()) {
      if (item.key().rfind(unitOf[u] + ".", 0) == 0) grads.push_back(item.value().grad().reshape({-1}));
    }
    at::Tensor flat = at::zeros({layout[u].paddedNumel}, at::kFloat);
    flat.narrow(0, 0, layout[u].numel).copy_(at::cat(grads));
    const Reference whole = referenceOf(world, flat);
    const int64_t shardNumel = layout[u].paddedNumel / shard->size();
    const int64_t offset = shard->rank() * shardNumel;
    Reference mine = whole;
    mine.average = whole.average.narrow(0, offset, shardNumel);
    mine.absSum = whole.absSum.narrow(0, offset, shardNumel);
    at::Tensor bound = boundOf(mode, mine, n);
    if (hybrid) bound = bound * (1.1 / 1.01);
    const std::string what = std::string("FSDP ") + toString(mode) + " unit " + layout[u].name;
    // Under "auto" the bound holds while nothing saturated (its scale is at
    // least "safe"'s); saturated values are clipped (the DDP case checks them).
    const bool saturated = fsdp.stats().fp8LastStep.saturated > 0;
    if (!(scaling == Fp8Scaling::kAuto && saturated)) checkWithinBound(shards[u].grad(), mine, bound, what);
    if (replicate) checkBitIdentical(replicate, shards[u].grad(), what + " across replicas");
    if (mode != GradientComm::kFp32) {
      const at::Tensor fp32 = (whole.perRank.sum(0) / n).narrow(0, offset, shardNumel);
      TESSERA_CHECK(!at::equal(shards[u].grad(), fp32), what << " equals fp32");
    }
  }
  TESSERA_CHECK_EQ(fsdp.stats().bytesByComm.size(), hybrid ? 2u : 1u);

  // The FP8 figures: one reduce-scatter per unit (each element encoded
  // shard - 1 times, by all ranks together) and, hybrid, one replicate
  // all-reduce per unit (each shard element encoded by both replicas).
  const GradientFp8Stats fp8 = fsdp.stats().fp8LastStep;
  if (mode != GradientComm::kFp8) {
    TESSERA_CHECK(fp8.calls == 0 && fp8.encoded == 0 && fp8.maxMu == 0, "fp8 figures outside fp8");
    return;
  }
  int64_t encoded = 0;
  for (const auto& unit : layout) {
    encoded += unit.paddedNumel * (shard->size() - 1);
    if (hybrid) encoded += unit.paddedNumel / shard->size() * replicate->size();
  }
  TESSERA_CHECK_EQ(fp8.calls, hybrid ? 6 : 3);
  TESSERA_CHECK_EQ(fp8.encoded, encoded);
  TESSERA_CHECK_EQ(fsdp.stats().fp8Total.encoded, encoded);  // one step so far
  if (scaling == Fp8Scaling::kSafe) {
    TESSERA_CHECK_EQ(fp8.saturated, 0);
    TESSERA_CHECK(fp8.minMu == 0 && fp8.maxMu == 0, "safe scaling reports mu");
    return;
  }
  // "auto" at mu = 1: two replicas' values near their amax may sum past 448
  // (these do, on the replicate pair {0, 2}). One saturated value in a stream
  // of at most 66K encoded ones is over FP8-LM's 1e-5, so that stream's mu
  // halves; the streams that did not saturate stay at 1.
  TESSERA_CHECK(fp8.maxMu == 1.0, "mu range [" << fp8.minMu << ", " << fp8.maxMu << "]");
  TESSERA_CHECK(fp8.minMu == (fp8.saturated > 0 ? 0.5 : 1.0),
                "saturated " << fp8.saturated << " but mu range [" << fp8.minMu << ", " << fp8.maxMu << "]");
  if (rank == 0) std::printf("FSDP fp8 auto: saturated %lld of %lld\n", static_cast<long long>(fp8.saturated),
                             static_cast<long long>(fp8.encoded));
}

// ---- FP8 scaling: "safe" and "auto" (FP8-LM) -----------------------------------
//
// Two parameters with gradients set exactly (loss = sum(p * g_r), so
// p.grad = g_r), each in its own bucket, on 2 ranks, over four steps:
//   "spiky" (256): uniform in [-1, 1] plus element 0 = 300 on rank 0 and
//       200 on rank 1. Auto scale at mu = 1: min(2^floor(log2(448 / 300)),
//       2^floor(log2(448 / 200))) = min(1, 2) = 1, so element 0's sum
//       (about 500) saturates at 448: the average there is exactly
//       448 / 1 / 2 = 224 and exactly one code (that sum's) hits 448 (the
//       partial, about 300 or 200, does not; the noise, |sum| <= 2, is far
//       below). One of 2 * 256 values: 2e-3 > FP8-LM's 1e-5, so mu halves
//       to 0.5; at mu = 0.5 the scale is min(2^-1, 2^0) = 1/2, the sum (250
//       scaled, at most 272 after the partial's rounding) fits, and the
//       result is within the bound. With stable_window = 2, mu doubles back
//       to 1 after steps 2 and 3, and step 4 saturates again.
//   "calm" (192): rank 0 uniform in [-1, 1] with element 1 = 1 exactly,
//       rank 1 uniform in [-0.5, 0.5]: scale min(2^8, 2^9) = 256 at mu = 1,
//       so every sum is at most 1.5 * 256 = 384 < 432 (the point from which
//       E4M3 rounds to 448): it never saturates and its mu stays 1.
// Bound of an unsaturated element under shared scale s: each of the n
// encodings is within 2^-4 of its value (at most S = sum_r |g_r|) or 2^-10 / s
// absolutely, so the average is within 2^-4 S + 2^-10 / s (1% slack). "safe"
// never saturates (its scale 2^floor(log2(448 / (n amax))) is 1/2 for spiky)
// and must be exactly the FP8 ring called directly (allReduceCompressed).
constexpr int64_t kSpiky = 256;
constexpr int64_t kCalm = 192;

// FP8-LM's shared scale: the minimum over ranks of 2^floor(log2(mu * 448 / amax_r)).
double autoScaleOf(double mu, const Reference& ref) {
  double scale = INFINITY;
  for (int r = 0; r < ref.perRank.size(0); ++r) {
    const double amax = ref.perRank[r].abs().max().item<double>();
    scale = std::min(scale, std::ldexp(1.0, static_cast<int>(std::floor(std::log2(mu * 448.0 / amax)))));
  }
  return scale;
}

double safeScaleOf(const Reference& ref, int n) {
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(448.0 / (n * ref.amax)))));
}

TESSERA_WORKER(ddp_fp8_scaling) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  TESSERA_CHECK_EQ(n, 2);  // the spike values are chosen for two ranks
  const Fp8Scaling scaling = parseFp8Scaling(ctx.arg("scaling"));
  const bool isAuto = scaling == Fp8Scaling::kAuto;

  torch::manual_seed(300 + rank);
  at::Tensor spiky = at::rand({kSpiky}) * 2 - 1;
  spiky[0] = rank == 0 ? 300.0 : 200.0;
  at::Tensor calm = (at::rand({kCalm}) * 2 - 1) * (rank == 0 ? 1.0 : 0.5);
  if (rank == 0) calm[1] = 1.0;
  const std::vector<at::Tensor> local = {spiky, calm};
  const std::vector<Reference> refs = {referenceOf(world, spiky), referenceOf(world, calm)};

  std::vector<at::Tensor> params = {at::zeros({kSpiky}).requires_grad_(true), at::zeros({kCalm}).requires_grad_(true)};
  DdpConfig config;
  config.bucketCapBytes = kSpiky * 4;  // one bucket each
  config.gradComm = GradientComm::kFp8;
  config.fp8Scaling = scaling;
  config.fp8AutoScale.stable_window = 2;
  Ddp ddp({{"spiky", params[0]}, {"calm", params[1]}}, world, config);
  TESSERA_CHECK_EQ(ddp.bucketParameterNames().size(), 2u);

  double mu = 1.0;  // the spiky bucket's, before the step (the rule above)
  int stable = 0;
  int64_t totalSaturated = 0;
  for (int step = 1; step <= 4; ++step) {
    for (at::Tensor& p : params) p.mutable_grad() = at::Tensor();
    ((params[0] * local[0]).sum() + (params[1] * local[1]).sum()).backward();
    ddp.finishGradientSync();
    const std::string what = std::string("fp8 ") + toString(scaling) + " step " + std::to_string(step);
    const bool saturates = isAuto && mu == 1.0;

    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor got = params[i].grad();
      const std::string name = what + (i == 0 ? " spiky" : " calm");
      checkBitIdentical(world, got, name);
      const double scale = isAuto ? autoScaleOf(i == 0 ? mu : 1.0, refs[i]) : safeScaleOf(refs[i], n);
      at::Tensor bound = refs[i].absSum * (1.01 * std::ldexp(1.0, -4)) + 1.01 * std::ldexp(1.0, -10) / scale + 1e-30;
      if (i == 0 && saturates) {
        TESSERA_CHECK_EQ(scale, 1.0);
        TESSERA_CHECK(got[0].item<float>() == 224.0f,
                      name << ": the saturated sum's average is " << got[0].item<float>() << ", expected 448 / 2");
        bound[0] = INFINITY;  // checked exactly above
      }
      checkWithinBound(got, refs[i], bound, name);
      if (!isAuto) {  // "safe" is the FP8 ring's default, bit for bit
        at::Tensor direct = local[i].clone();
        comm::allReduceCompressed(*world, direct, comm::ReduceOp::kAvg, comm::Compression::kFp8);
        TESSERA_CHECK(at::equal(direct, got), name << " differs from allReduceCompressed(kFp8)");
      }
    }

    const GradientFp8Stats fp8 = ddp.lastStepStats().fp8;
    TESSERA_CHECK_EQ(fp8.calls, 2);
    TESSERA_CHECK_EQ(fp8.encoded, n * (kSpiky + kCalm));
    TESSERA_CHECK_EQ(fp8.saturated, saturates ? 1 : 0);
    TESSERA_CHECK(fp8.saturatedFraction() == static_cast<double>(fp8.saturated) / fp8.encoded, what);
    totalSaturated += fp8.saturated;
    if (isAuto) {
      // FP8-LM's rule on the spiky bucket; the calm one stays at 1.
      if (saturates) {
        mu /= 2;
        stable = 0;
      } else if (++stable == 2) {
        mu = std::min(1.0, mu * 2);
        stable = 0;
      }
      TESSERA_CHECK(fp8.minMu == mu && fp8.maxMu == 1.0,
                    what << ": mu range [" << fp8.minMu << ", " << fp8.maxMu << "], expected [" << mu << ", 1]");
    } else {
      TESSERA_CHECK(fp8.minMu == 0 && fp8.maxMu == 0, what << ": safe scaling reports mu");
    }
    if (rank == 0) {
      std::printf("%s: saturated %lld of %lld (%.2e), mu [%g, %g]\n", what.c_str(),
                  static_cast<long long>(fp8.saturated), static_cast<long long>(fp8.encoded),
                  fp8.saturatedFraction(), fp8.minMu, fp8.maxMu);
    }
  }
  const GradientFp8Stats total = ddp.totalStats().fp8;
  TESSERA_CHECK_EQ(total.calls, 8);
  TESSERA_CHECK_EQ(total.saturated, totalSaturated);
  TESSERA_CHECK_EQ(totalSaturated, isAuto ? 2 : 0);
  TESSERA_CHECK(total.minMu == ddp.lastStepStats().fp8.minMu, "the total's mu range is not the last step's");
}

testing::RunOptions options(int ranks, std::map<std::string, std::string> args = {}) {
  testing::RunOptions o;
  o.ranks = ranks;
  o.deadline = std::chrono::seconds(90);
  o.args = std::move(args);
  return o;
}

TEST(GradientComm, ParseNamesTheFieldAndTheValidValues) {
  EXPECT_EQ(parseGradientComm("fp32"), GradientComm::kFp32);
  EXPECT_EQ(parseGradientComm("bf16"), GradientComm::kBf16);
  EXPECT_EQ(parseGradientComm("fp8"), GradientComm::kFp8);
  for (GradientComm mode : {GradientComm::kFp32, GradientComm::kBf16, GradientComm::kFp8}) {
    EXPECT_EQ(parseGradientComm(toString(mode)), mode);
  }
  try {
    parseGradientComm("int8", "parallel.grad_comm");
    FAIL() << "int8 accepted";
  } catch (const ConfigError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("parallel.grad_comm"), std::string::npos) << message;
    EXPECT_NE(message.find("\"fp8\""), std::string::npos) << message;
    EXPECT_NE(message.find("int8"), std::string::npos) << message;
  }
}

TEST(GradientComm, Fp8ScalingParseNamesTheFieldAndTheValidValues) {
  EXPECT_EQ(parseFp8Scaling("safe"), Fp8Scaling::kSafe);
  EXPECT_EQ(parseFp8Scaling("auto"), Fp8Scaling::kAuto);
  for (Fp8Scaling scaling : {Fp8Scaling::kSafe, Fp8Scaling::kAuto}) {
    EXPECT_EQ(parseFp8Scaling(toString(scaling)), scaling);
  }
  EXPECT_EQ(DdpConfig{}.fp8Scaling, Fp8Scaling::kSafe);
  EXPECT_EQ(FsdpConfig{}.fp8Scaling, Fp8Scaling::kSafe);
  try {
    parseFp8Scaling("dynamic");
    FAIL() << "dynamic accepted";
  } catch (const ConfigError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("precision.fp8_comm_scaling"), std::string::npos) << message;
    EXPECT_NE(message.find("\"safe\""), std::string::npos) << message;
    EXPECT_NE(message.find("\"auto\""), std::string::npos) << message;
    EXPECT_NE(message.find("dynamic"), std::string::npos) << message;
  }
}

TEST(GradientComm, DdpRejectsCompressingNonFloat32Parameters) {
  at::Tensor p = at::zeros({4}, at::kDouble).requires_grad_(true);
  DdpConfig config;
  config.gradComm = GradientComm::kBf16;
  try {
    Ddp ddp(std::vector<DistributedDataParallel::NamedParameter>{{"w", p}}, comm::makeSingleRankCommunicator(),
            config);
    FAIL() << "a double parameter was accepted for bf16";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
}

TEST(GradientComm, DdpTwoRanksFp32ExactBf16Fp8WithinBounds) {
  const auto result = testing::runWorkers("ddp_grad_comm", options(2));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, DdpThreeRanks) {
  const auto result = testing::runWorkers("ddp_grad_comm", options(3));
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());  // the measured wire bytes
}

TEST(GradientComm, DdpFp8AutoScalingCountsSaturationAndHalvesMu) {
  const auto result = testing::runWorkers("ddp_fp8_scaling", options(2, {{"scaling", "auto"}}));
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

TEST(GradientComm, DdpFp8SafeScalingNeverSaturates) {
  const auto result = testing::runWorkers("ddp_fp8_scaling", options(2, {{"scaling", "safe"}}));
  ASSERT_TRUE(result.ok()) << result.report();
  std::printf("%s", result.outputs[0].c_str());
}

TEST(GradientComm, FsdpFp8ReduceScatterWithinBound) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(3, {{"mode", "fp8"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, HybridFsdpFp8ReduceScatterAndReplicateAllReduce) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(4, {{"mode", "fp8"}, {"hybrid", "1"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, HybridFsdpFp8AutoScaling) {
  const auto result =
      testing::runWorkers("fsdp_grad_comm", options(4, {{"mode", "fp8"}, {"hybrid", "1"}, {"scaling", "auto"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, FsdpBf16ReduceScatterWithinBound) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(2, {{"mode", "bf16"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
