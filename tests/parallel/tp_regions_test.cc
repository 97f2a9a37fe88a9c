// The tensor/sequence-parallel regions and the vocabulary-parallel
// cross-entropy on real processes (Gloo; MPI for one case), each against a
// single-process reference computed from every rank's inputs: every rank
// builds all ranks' inputs from (seed, rank), so it knows what the group as a
// whole computes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/layer_options.h"
#include "tessera/core/models/vocab_parallel_loss.h"
#include "tessera/parallel/tp_regions.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

using testing::expectTensorsEqual;

// Sums over ranks may be added in another order than the reference's.
constexpr double kSumTolerance = 1e-12;

at::Tensor seeded(at::IntArrayRef shape, uint64_t seed, int rank, at::ScalarType dtype = at::kDouble) {
  at::Generator gen = at::detail::createCPUGenerator(seed * 1009 + static_cast<uint64_t>(rank));
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// A deterministic upstream gradient of `shape`, deliberately non-contiguous
// (a transposed view), as gradients arriving from later layers can be.
at::Tensor upstream(at::IntArrayRef shape, uint64_t seed, int rank) {
  std::vector<int64_t> reversed(shape.rbegin(), shape.rend());
  std::vector<int64_t> order;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) order.push_back(d);
  const at::Tensor g = seeded(reversed, seed, rank).permute(order);
  TESSERA_CHECK(shape.size() < 2 || !g.is_contiguous(), "upstream gradient should be non-contiguous");
  return g;
}

std::vector<at::Tensor> perRank(int ranks, const std::function<at::Tensor(int)>& make) {
  std::vector<at::Tensor> out;
  for (int r = 0; r < ranks; ++r) out.push_back(make(r));
  return out;
}

at::Tensor sumOf(const std::vector<at::Tensor>& xs) {
  at::Tensor s = xs[0].clone();
  for (size_t i = 1; i < xs.size(); ++i) s += xs[i];
  return s;
}

// Part r of x along dim, of p equal parts.
at::Tensor partOf(const at::Tensor& x, int64_t dim, int p, int r) { return x.chunk(p, dim)[r]; }

// One region on this rank: forward of x (a leaf requiring grad), backward of
// the upstream gradient; checks y and x.grad against the references, and
// that x was not modified.
void checkRegion(const std::string& what, const std::function<at::Tensor(const at::Tensor&)>& region,
                 const at::Tensor& input, const at::Tensor& expectedY, const at::Tensor& grad,
                 const at::Tensor& expectedGrad, double tolerance) {
  const at::Tensor x = input.clone().requires_grad_(true);
  const at::Tensor y = region(x);
  expectTensorsEqual(y.detach(), expectedY, what + " forward", tolerance);
  y.backward(grad);
  expectTensorsEqual(x.grad(), expectedGrad, what + " backward", tolerance);
  expectTensorsEqual(x.detach(), input, what + " leaves its input unchanged");
}

// Every region on p ranks in fp64, with the split dim given as `dim`
// (1 or -1 of a 3-d tensor).
void checkAllRegions(models::ShardGroup& group, int64_t dim, uint64_t seed) {
  const int p = static_cast<int>(group.size());
  const int r = static_cast<int>(group.rank());
  const int64_t d = dim < 0 ? dim + 3 : dim;
  const std::string where = " (p = " + std::to_string(p) + ", dim = " + std::to_string(dim) + ")";
  // Shapes: a part (B, 2, 3) along d, and the whole (p parts) along d.
  std::vector<int64_t> partShape{2, 2, 3};
  std::vector<int64_t> wholeShape = partShape;
  wholeShape[d] *= p;

  // f: identity forward; backward sum_s g_s.
  auto xs = perRank(p, [&](int s) { return seeded(partShape, seed + 1, s); });
  auto gs = perRank(p, [&](int s) { return upstream(partShape, seed + 2, s); });
  checkRegion("copyToShards" + where, [&](const at::Tensor& x) { return group.copyToShards(x); }, xs[r], xs[r], gs[r],
              sumOf(gs), kSumTolerance);

  // g: sum_s x_s forward; identity backward.
  checkRegion("reduceFromShards" + where, [&](const at::Tensor& x) { return group.reduceFromShards(x); }, xs[r],
              sumOf(xs), gs[r], gs[r], kSumTolerance);

  // scatter: part r of x_r forward; backward [g_0 ... g_{p-1}].
  auto wholes = perRank(p, [&](int s) { return seeded(wholeShape, seed + 3, s); });
  checkRegion("scatterToShards" + where, [&](const at::Tensor& x) { return group.scatterToShards(x, dim); },
              wholes[r], partOf(wholes[r], d, p, r), gs[r], at::cat(gs, d), 0);

  // gather: [x_0 ... x_{p-1}] forward; backward part r of g_r.
  auto wholeGs = perRank(p, [&](int s) { return upstream(wholeShape, seed + 4, s); });
  checkRegion("gatherFromShards" + where, [&](const at::Tensor& x) { return group.gatherFromShards(x, dim); }, xs[r],
              at::cat(xs, d), wholeGs[r], partOf(wholeGs[r], d, p, r), 0);

  // sequence gather: [x_0 ... x_{p-1}] forward; backward part r of sum_s g_s.
  checkRegion("gatherFromSequence" + where, [&](const at::Tensor& x) { return group.gatherFromSequence(x, dim); },
              xs[r], at::cat(xs, d), wholeGs[r], partOf(sumOf(wholeGs), d, p, r), kSumTolerance);

  // sequence reduce-scatter: part r of sum_s x_s forward; backward [g_0 ... g_{p-1}].
  checkRegion("reduceScatterToSequence" + where,
              [&](const at::Tensor& x) { return group.reduceScatterToSequence(x, dim); }, wholes[r],
              partOf(sumOf(wholes), d, p, r), gs[r], at::cat(gs, d), kSumTolerance);

  // The non-differentiable reductions: copies, input untouched.
  const at::Tensor before = xs[r].clone();
  expectTensorsEqual(group.allReduceSum(xs[r]), sumOf(xs), "allReduceSum" + where, kSumTolerance);
  at::Tensor max = xs[0].clone();
  for (int s = 1; s < p; ++s) max = at::maximum(max, xs[s]);
  const at::Tensor reducedMax = group.allReduceMax(xs[r].clone().requires_grad_(true));
  expectTensorsEqual(reducedMax, max, "allReduceMax" + where);
  TESSERA_CHECK(!reducedMax.requires_grad(), "allReduceMax must not be differentiable");
  expectTensorsEqual(xs[r], before, "allReduce* leave their input unchanged");
}

// The vocabulary-parallel cross-entropy against torch's on the full logits:
// V = 11 split unevenly (shardRange), one row shifted by 1000 (a naive exp
// would overflow), targets including 0 and V - 1, a non-uniform upstream
// gradient. The full (N, V) logits exist here only to build the reference.
void checkVocabParallelLoss(models::ShardGroup& group, at::ScalarType dtype, double tolerance) {
  constexpr int64_t kVocab = 11;
  constexpr int64_t kTokens = 7;
  const int p = static_cast<int>(group.size());
  at::Tensor full = seeded({kTokens, kVocab}, 41, 0).mul(3);
  full[2] += 1000;
  full = full.to(dtype);
  at::Tensor targets = at::randint(kVocab, {kTokens}, at::detail::createCPUGenerator(43), at::kLong);
  targets[0] = 0;
  targets[1] = kVocab - 1;
  const at::Tensor gradLoss = seeded({kTokens}, 47, 0, dtype);

  const at::Tensor fullLeaf = full.clone().requires_grad_(true);
  const at::Tensor expected = at::cross_entropy_loss(fullLeaf, targets, {}, at::Reduction::None);
  expected.backward(gradLoss);

  const models::ShardRange columns = models::shardRange(kVocab, p, group.rank());
  const at::Tensor local = full.narrow(1, columns.begin, columns.size).clone().requires_grad_(true);
  const at::Tensor loss = models::vocabParallelCrossEntropy(local, targets, columns.begin, group);
  const std::string where = " (p = " + std::to_string(p) + ", " + std::string(c10::toString(dtype)) + ")";
  expectTensorsEqual(loss.detach(), expected.detach(), "vocab-parallel loss" + where, tolerance);
  loss.backward(gradLoss);
  expectTensorsEqual(local.grad(), fullLeaf.grad().narrow(1, columns.begin, columns.size),
                     "vocab-parallel grad of logits" + where, tolerance);
}

// A target no rank owns is an error on every rank, after the collectives
// (so no rank waits for another).
void checkTargetOutsideVocabulary(models::ShardGroup& group) {
  constexpr int64_t kVocab = 11;
  const models::ShardRange columns = models::shardRange(kVocab, group.size(), group.rank());
  const at::Tensor logits = seeded({3, columns.size}, 5, static_cast<int>(group.rank()));
  const at::Tensor targets = at::tensor(std::vector<int64_t>{1, kVocab, 2});
  try {
    models::vocabParallelCrossEntropy(logits, targets, columns.begin, group);
  } catch (const InvalidArgument& e) {
    TESSERA_CHECK(std::string(e.what()).find("targets[1] = 11") != std::string::npos, e.what());
    return;
  }
  TESSERA_CHECK(false, "a target >= V was accepted");
}

TESSERA_WORKER(tp_regions_all) {
  const comm::CommPtr world = ctx.world();
  const auto group = makeTensorParallelGroup(world, "tp");
  TESSERA_CHECK(group->size() == world->size() && group->rank() == world->rank() && group->name() == "tp",
                "group identity");
  checkAllRegions(*group, 1, 100);
  checkAllRegions(*group, -1, 200);
}

TESSERA_WORKER(tp_vocab_parallel_loss) {
  const comm::CommPtr world = ctx.world();
  const auto group = makeTensorParallelGroup(world, "tp");
  checkVocabParallelLoss(*group, at::kDouble, 1e-10);
  checkVocabParallelLoss(*group, at::kFloat, 1e-5);
  checkTargetOutsideVocabulary(*group);
}

// Errors thrown before any communication: every rank throws, nothing is sent.
TESSERA_WORKER(tp_region_errors) {
  const comm::CommPtr world = ctx.world();
  const auto group = makeTensorParallelGroup(world, "tp");
  const comm::CommStats before = world->stats();
  const at::Tensor x = at::zeros({2, 3, 4}, at::kDouble);  // 3 along dim 1: not divisible by 2
  auto expectError = [&](const std::function<void()>& fn, const std::vector<std::string>& mentions) {
    try {
      fn();
    } catch (const InvalidArgument& e) {
      for (const auto& text : mentions) {
        TESSERA_CHECK(std::string(e.what()).find(text) != std::string::npos, "'" << text << "' not in: " << e.what());
      }
      return;
    }
    TESSERA_CHECK(false, "no InvalidArgument; expected one mentioning " << mentions[0]);
  };
  expectError([&] { group->scatterToShards(x, 1); },
              {"scatterToShards", "group 'tp'", "x.size(1) = 3", "group size 2"});
  expectError([&] { group->reduceScatterToSequence(x, -2); },
              {"reduceScatterToSequence", "x.size(1) = 3", "group size 2"});
  expectError([&] { group->gatherFromSequence(x, 3); }, {"gatherFromSequence", "dim 3 is out of range"});
  expectError([&] { group->copyToShards(at::Tensor()); }, {"copyToShards", "undefined"});
  const comm::CommStats after = world->stats();
  TESSERA_CHECK_EQ(after.totalBytesSent(), before.totalBytesSent());
  for (int k = 0; k < static_cast<int>(comm::OpKind::kCount); ++k) {
    TESSERA_CHECK_EQ(after.perOp[k].calls, before.perOp[k].calls);
  }
  expectError([&] { makeTensorParallelGroup(nullptr, "tp"); }, {"null"});
  // No rank leaves while a peer may still be connecting the world's Gloo
  // pairs (a rank that exits at once closes them under it: a flake CI saw).
  world->barrier();
}

testing::RunOptions ranks(int n, const std::string& backend = "gloo") {
  testing::RunOptions options;
  options.ranks = n;
  options.backend = backend;
  options.deadline = std::chrono::seconds(60);
  return options;
}

TEST(TpRegions, TwoRanks) {
  const auto result = testing::runWorkers("tp_regions_all", ranks(2));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(TpRegions, ThreeRanks) {
  const auto result = testing::runWorkers("tp_regions_all", ranks(3));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(TpRegions, ErrorsBeforeAnyCommunication) {
  const auto result = testing::runWorkers("tp_region_errors", ranks(2));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(VocabParallelCrossEntropy, TwoRanksUnevenVocabulary) {
  const auto result = testing::runWorkers("tp_vocab_parallel_loss", ranks(2));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(VocabParallelCrossEntropy, ThreeRanksUnevenVocabulary) {
  const auto result = testing::runWorkers("tp_vocab_parallel_loss", ranks(3));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(TpRegions, Mpi) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "MPI not built or mpirun not on PATH";
  auto result = testing::runWorkers("tp_regions_all", ranks(2, "mpi"));
  ASSERT_TRUE(result.ok()) << result.report();
  result = testing::runWorkers("tp_vocab_parallel_loss", ranks(2, "mpi"));
  ASSERT_TRUE(result.ok()) << result.report();
}

// One rank: every region is the identity and nothing is communicated, not
// even a call on the single-rank communicator.
TEST(TpRegions, OneRankCommunicatesNothing) {
  const comm::CommPtr single = comm::makeSingleRankCommunicator("tp");
  const auto group = makeTensorParallelGroup(single);
  ASSERT_EQ(group->size(), 1);
  checkAllRegions(*group, 1, 300);
  checkVocabParallelLoss(*group, at::kDouble, 1e-10);
  const comm::CommStats stats = single->stats();
  EXPECT_EQ(stats.totalBytesSent(), 0u);
  EXPECT_EQ(stats.totalBytesReceived(), 0u);
  for (int k = 0; k < static_cast<int>(comm::OpKind::kCount); ++k) EXPECT_EQ(stats.perOp[k].calls, 0u) << k;
}

TEST(VocabParallelCrossEntropy, ArgumentErrorsNameTheArgument) {
  const auto group = makeTensorParallelGroup(comm::makeSingleRankCommunicator("tp"));
  const at::Tensor logits = at::zeros({4, 5}, at::kDouble);
  const at::Tensor targets = at::zeros({4}, at::kLong);
  auto message = [&](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "<no InvalidArgument>";
  };
  using models::vocabParallelCrossEntropy;
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits.view({20}), targets, 0, *group); }).find("logits must be (N, V_r)"),
            std::string::npos);
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits.to(at::kInt), targets, 0, *group); })
                .find("logits must be float32 or float64"),
            std::string::npos);
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits, targets.to(at::kInt), 0, *group); })
                .find("targets must be int64"),
            std::string::npos);
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits, targets.narrow(0, 0, 3), 0, *group); })
                .find("targets must be (N) = (4)"),
            std::string::npos);
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits, targets, -1, *group); }).find("vocabBegin must be >= 0"),
            std::string::npos);
  // One rank holding columns [0, 5): target 5 lies outside every rank's columns.
  EXPECT_NE(message([&] { vocabParallelCrossEntropy(logits, at::full({4}, 5, at::kLong), 0, *group); })
                .find("targets[0] = 5 lies in the columns of 0 ranks"),
            std::string::npos);
}

}  // namespace
}  // namespace tessera::parallel
