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

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

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
    checkWithinBound(shards[u].grad(), mine, bound, what);
    if (replicate) checkBitIdentical(replicate, shards[u].grad(), what + " across replicas");
    if (mode != GradientComm::kFp32) {
      const at::Tensor fp32 = (whole.perRank.sum(0) / n).narrow(0, offset, shardNumel);
      TESSERA_CHECK(!at::equal(shards[u].grad(), fp32), what << " equals fp32");
    }
  }
  TESSERA_CHECK_EQ(fsdp.stats().bytesByComm.size(), hybrid ? 2u : 1u);
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

TEST(GradientComm, FsdpFp8ReduceScatterWithinBound) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(3, {{"mode", "fp8"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, HybridFsdpFp8ReduceScatterAndReplicateAllReduce) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(4, {{"mode", "fp8"}, {"hybrid", "1"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GradientComm, FsdpBf16ReduceScatterWithinBound) {
  const auto result = testing::runWorkers("fsdp_grad_comm", options(2, {{"mode", "bf16"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
