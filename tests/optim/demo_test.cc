// DeMo: the chunked DCT against published test vectors and a per-block
// reference, the step's invariants (error feedback conserves momentum, a
// whole-chunk top-k is sign-SGD), and real multi-process runs checked against
// a reference DeMo written out here with plain tensor ops from REFERENCE §2
// (each rank simulates every worker: its top-k, error feedback, scatter-mean).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/optim/demo.h"
#include "tests/harness/multiprocess.h"

namespace tessera::optim {
namespace {

using testing::expectTensorsEqual;

at::Tensor seededRandn(at::IntArrayRef shape, uint64_t seed, at::ScalarType dtype) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// ---- The reference transform, from the formulas --------------------------

// Orthonormal DCT-II basis, rows k: sqrt((k ? 2 : 1) / n) cos(pi (2i + 1) k / 2n).
at::Tensor referenceDct(int64_t n) {
  const at::Tensor k = at::arange(n, at::kDouble).unsqueeze(1);
  const at::Tensor i = at::arange(n, at::kDouble).unsqueeze(0);
  at::Tensor d = at::cos(M_PI * (2 * i + 1) * k / (2.0 * n)) * std::sqrt(2.0 / n);
  d[0].fill_(std::sqrt(1.0 / n));
  return d;
}

int64_t referenceChunk(int64_t size, int64_t limit) {
  int64_t best = 1;
  for (int64_t d = 1; d <= std::min(size, limit); ++d) {
    if (size % d == 0) best = d;
  }
  return size < limit ? size : best;
}

// A 1-D tensor is a (1, L) matrix here, so both cases share one block loop.
// Returns (chunks, n1 * n2): row a * (C / n2) + b is block (a, b)'s D1 B D2^T, row-major.
at::Tensor referenceEncode(const at::Tensor& x, int64_t limit) {
  const at::Tensor m = x.dim() == 1 ? x.to(at::kDouble).unsqueeze(0) : x.to(at::kDouble);
  const int64_t n1 = x.dim() == 1 ? 1 : referenceChunk(m.size(0), limit);
  const int64_t n2 = referenceChunk(m.size(1), limit);
  const at::Tensor d1 = referenceDct(n1), d2 = referenceDct(n2);
  std::vector<at::Tensor> rows;
  for (int64_t a = 0; a < m.size(0) / n1; ++a) {
    for (int64_t b = 0; b < m.size(1) / n2; ++b) {
      const at::Tensor block = m.narrow(0, a * n1, n1).narrow(1, b * n2, n2);
      rows.push_back(d1.mm(block).mm(d2.t()).reshape({-1}));
    }
  }
  return at::stack(rows);
}

at::Tensor referenceDecode(const at::Tensor& rows, at::IntArrayRef shape, int64_t limit) {
  const int64_t r = shape.size() == 1 ? 1 : shape[0];
  const int64_t c = shape.back();
  const int64_t n1 = shape.size() == 1 ? 1 : referenceChunk(r, limit);
  const int64_t n2 = referenceChunk(c, limit);
  const at::Tensor d1 = referenceDct(n1), d2 = referenceDct(n2);
  at::Tensor out = at::zeros({r, c}, at::kDouble);
  int64_t row = 0;
  for (int64_t a = 0; a < r / n1; ++a) {
    for (int64_t b = 0; b < c / n2; ++b) {
      out.narrow(0, a * n1, n1).narrow(1, b * n2, n2).copy_(d1.t().mm(rows[row++].reshape({n1, n2})).mm(d2));
    }
  }
  return out.reshape(shape);
}

// ---- The reference DeMo step over W simulated workers ----------------------

struct ReferenceDemo {
  DemoConfig config;
  double lr = 0;
  std::vector<at::Tensor> params;              // float64, shared by every worker
  std::vector<std::vector<at::Tensor>> delta;  // [worker][parameter], float64

  // grads[w][i]: worker w's gradient of parameter i.
  void step(const std::vector<std::vector<at::Tensor>>& grads) {
    const auto workers = grads.size();
    const int64_t limit = config.compression_chunk;
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mul_(1 - lr * config.weight_decay);
      at::Tensor sum, hits;
      for (size_t w = 0; w < workers; ++w) {
        delta[w][i] = config.compression_decay * delta[w][i] + lr * grads[w][i].to(at::kDouble);
        const at::Tensor c = referenceEncode(delta[w][i], limit);
        const int64_t k = std::min<int64_t>(config.compression_topk, c.size(1));
        const at::Tensor idx = std::get<1>(c.abs().topk(k, 1));
        const at::Tensor val = c.gather(1, idx).to(at::kFloat).to(at::kDouble);  // float32 on the wire
        const at::Tensor sent = at::zeros_like(c).scatter(1, idx, val);
        delta[w][i] = delta[w][i] - referenceDecode(sent, params[i].sizes(), limit);
        if (w == 0) {
          sum = at::zeros_like(c);
          hits = at::zeros_like(c);
        }
        sum.scatter_add_(1, idx, val);
        hits.scatter_add_(1, idx, at::ones_like(val));
      }
      const at::Tensor mean = at::where(hits > 0, sum / hits.clamp_min(1), at::zeros_like(sum));
      params[i].sub_(lr * at::sign(referenceDecode(mean, params[i].sizes(), limit)));
    }
  }
};

// ---- The transform -----------------------------------------------------------

TEST(DemoTransform, PublishedTestVectors) {
  // Psyche's dct(I4) is the DCT applied to the rows of I: D^T. Its first row:
  const at::Tensor firstRow = demo::dctMatrix(4).t()[0];
  expectTensorsEqual(firstRow, at::tensor({0.5, 0.6533, 0.5, 0.2706}, at::kDouble), "dct(I4)[0]", 1e-4);
  expectTensorsEqual(demo::dctMatrix(7), referenceDct(7), "dctMatrix(7)", 1e-14);
  const at::Tensor coefficients = demo::encode(at::arange(8, at::kDouble), 64);
  EXPECT_EQ(coefficients.sizes(), at::IntArrayRef({1, 8}));
  expectTensorsEqual(coefficients.reshape({8}),
                     at::tensor({9.8995, -6.4423, 0.0, -0.67345, 0.0, -0.2009, 0.0, -0.0507}, at::kDouble),
                     "encode(arange(8))", 1e-4);
  EXPECT_EQ(demo::chunkSize(100, 26), 25);
  EXPECT_EQ(demo::chunkSize(12, 5), 4);
  EXPECT_EQ(demo::chunkSize(10, 64), 10);
  EXPECT_EQ(demo::chunkSize(64, 64), 64);
  EXPECT_EQ(demo::chunkSize(96, 64), 48);
  EXPECT_EQ(demo::chunkSize(13, 8), 1);
}

TEST(DemoTransform, MatchesPerBlockReferenceAndInverts) {
  const at::Tensor vector = seededRandn({96}, 1, at::kDouble);  // chunk 48
  const at::Tensor matrix = seededRandn({12, 20}, 2, at::kDouble);  // chunk 8: blocks 6 x 5
  const at::Tensor c1 = demo::encode(vector, 64);
  EXPECT_EQ(c1.sizes(), at::IntArrayRef({2, 48}));
  expectTensorsEqual(c1, referenceEncode(vector, 64), "encode 1-D", 1e-12);
  expectTensorsEqual(demo::decode(c1, {96}, 64), vector, "decode(encode) 1-D", 1e-12);

  const at::Tensor c2 = demo::encode(matrix, 8);
  EXPECT_EQ(c2.sizes(), at::IntArrayRef({2, 4, 6, 5}));
  expectTensorsEqual(c2.reshape({8, 30}), referenceEncode(matrix, 8), "encode 2-D", 1e-12);
  expectTensorsEqual(demo::decode(c2, {12, 20}, 8), matrix, "decode(encode) 2-D", 1e-12);
  // float32 in, float32 out, inverse to rounding.
  const at::Tensor m32 = matrix.to(at::kFloat);
  expectTensorsEqual(demo::decode(demo::encode(m32, 8), {12, 20}, 8), m32, "decode(encode) float32", 1e-5);
}

// ---- One worker ----------------------------------------------------------------

std::vector<at::Tensor> makeParams(at::ScalarType dtype, uint64_t seed) {
  return {seededRandn({24}, seed, dtype), seededRandn({8, 12}, seed + 1, dtype)};
}

TEST(Demo, ErrorFeedbackConservesMomentumAndStepsOnWhatWasSent) {
  DemoConfig config;
  config.compression_decay = 0.9;
  config.compression_topk = 3;
  config.compression_chunk = 4;  // 1-D: chunks of 4; 2-D: 4 x 4 blocks
  const double lr = 0.01;
  std::vector<at::Tensor> params = makeParams(at::kDouble, 10);
  auto optimizer = makeDemo(config, params, nullptr, lr);
  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> before, deltaBefore;
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = seededRandn(params[i].sizes(), 100 + 10 * step + i, at::kDouble);
      before.push_back(params[i].clone());
      deltaBefore.push_back(optimizer->state().perParameter.at("demo/delta")[i].clone());
    }
    optimizer->step();
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string what = "step " + std::to_string(step) + " parameter " + std::to_string(i);
      const at::Tensor accumulated = 0.9 * deltaBefore[i] + lr * params[i].grad();
      // What was sent: the top-3 of each chunk of encode(accumulated), float32-rounded.
      const at::Tensor c = referenceEncode(accumulated, 4);
      const at::Tensor idx = std::get<1>(c.abs().topk(3, 1));
      const at::Tensor kept = at::zeros_like(c).scatter(1, idx, c.gather(1, idx).to(at::kFloat).to(at::kDouble));
      const at::Tensor transmitted = referenceDecode(kept, params[i].sizes(), 4);
      const at::Tensor deltaAfter = optimizer->state().perParameter.at("demo/delta")[i];
      expectTensorsEqual(deltaAfter + transmitted, accumulated, what + ": delta_after + transmitted", 1e-12);
      // One worker: U is what it sent, so p moves by -lr * sign(transmitted).
      expectTensorsEqual(params[i], before[i] - lr * transmitted.sign(), what + ": parameter", 1e-12);
    }
  }
}

TEST(Demo, WholeChunkTopKWithOneWorkerIsSignSgd) {
  DemoConfig config;
  config.compression_decay = 0.9;
  config.compression_topk = 16;  // = every position of a 4 x 4 block and of a 1-D chunk of 4
  config.compression_chunk = 4;
  config.weight_decay = 0.1;
  const double lr = 0.01;
  std::vector<at::Tensor> params = makeParams(at::kFloat, 20);
  auto optimizer = makeDemo(config, params, nullptr, lr);
  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> expected;
    for (size_t i = 0; i < params.size(); ++i) {
      // Gradients bounded away from zero: every momentum entry has the gradient's sign.
      const at::Tensor r = seededRandn(params[i].sizes(), 200 + 10 * step + i, at::kFloat);
      params[i].mutable_grad() = r.sign() * (r.abs() + 0.5);
      // Step 1: delta = lr g is sent whole, so p <- p (1 - lr wd) - lr sign(lr g).
      expected.push_back(params[i].to(at::kDouble) * (1 - lr * 0.1) - lr * params[i].grad().sign().to(at::kDouble));
    }
    optimizer->step();
    for (size_t i = 0; i < params.size(); ++i) {
      expectTensorsEqual(params[i].to(at::kDouble), expected[i],
                         "sign-SGD step " + std::to_string(step) + " parameter " + std::to_string(i), 1e-6);
      // Everything was sent: only rounding is left behind.
      EXPECT_LT(optimizer->state().perParameter.at("demo/delta")[i].abs().max().item<double>(), 1e-8);
    }
  }
}

TEST(Demo, StateRoundTripContinuesBitwise) {
  DemoConfig config;
  config.compression_topk = 5;
  config.compression_chunk = 8;
  config.weight_decay = 0.01;
  auto gradsAt = [](std::vector<at::Tensor>& params, int step) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = seededRandn(params[i].sizes(), 300 + 10 * step + i, at::kFloat);
    }
  };
  std::vector<at::Tensor> params = makeParams(at::kFloat, 30);
  auto original = makeDemo(config, params, nullptr, 0.02);
  for (int step = 0; step < 3; ++step) {
    gradsAt(params, step);
    original->step();
  }
  OptimizerState saved = original->state();
  for (auto& t : saved.perParameter.at("demo/delta")) t = t.clone();
  std::vector<at::Tensor> copy;
  for (const at::Tensor& p : params) copy.push_back(p.clone());
  auto restored = makeDemo(config, copy, nullptr, 0.02);
  restored->loadState(saved);
  for (int step = 3; step < 6; ++step) {
    gradsAt(params, step);
    gradsAt(copy, step);
    original->step();
    restored->step();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    expectTensorsEqual(copy[i], params[i], "restored parameter " + std::to_string(i));
    expectTensorsEqual(restored->state().perParameter.at("demo/delta")[i],
                       original->state().perParameter.at("demo/delta")[i], "restored delta " + std::to_string(i));
  }
  OptimizerState wrong = saved;
  wrong.perParameter["demo/delta"][1] = at::zeros({3, 3});
  EXPECT_THROW(restored->loadState(wrong), InvalidArgument);
  wrong.perParameter.erase("demo/delta");
  EXPECT_THROW(restored->loadState(wrong), InvalidArgument);
}

void expectConfigError(const DemoConfig& config, const std::string& field, double lr = 0.1) {
  try {
    makeDemo(config, makeParams(at::kFloat, 1), nullptr, lr);
    ADD_FAILURE() << "no ConfigError for " << field;
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

TEST(Demo, BadConfigNamesTheField) {
  DemoConfig c;
  c.compression_decay = 1.0;
  expectConfigError(c, "demo.compression_decay");
  c = {};
  c.compression_topk = 0;
  expectConfigError(c, "demo.compression_topk");
  c = {};
  c.compression_chunk = 0;
  expectConfigError(c, "demo.compression_chunk");
  c.compression_chunk = 257;
  expectConfigError(c, "demo.compression_chunk");
  c = {};
  c.weight_decay = -1;
  expectConfigError(c, "demo.weight_decay");
  expectConfigError(DemoConfig{}, "optim.lr", 0.0);

  std::vector<at::Tensor> params = {at::zeros({4}), at::zeros({2, 3, 4})};
  try {
    makeDemo(DemoConfig{}, params, nullptr, 0.1);
    ADD_FAILURE() << "a 3-D parameter was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("parameter 1 has shape [2, 3, 4]"), std::string::npos) << e.what();
  }
}

// ---- Real processes ------------------------------------------------------------

// Gradient of parameter i for worker `worker` at `step`: noise plus a pull
// toward zero, so it depends on where the parameters are.
at::Tensor gradientFor(const at::Tensor& p, int worker, int step, size_t i) {
  return seededRandn(p.sizes(), 1000 * worker + 10 * step + i, p.scalar_type()) + 0.5 * p;
}

DemoConfig multiRankConfig() {
  DemoConfig config;
  config.compression_decay = 0.95;
  config.compression_topk = 3;
  config.compression_chunk = 4;
  config.weight_decay = 0.05;
  return config;
}

// Components per step for makeParams' shapes under multiRankConfig():
// 1-D 24 -> 6 chunks x 3; 2-D 8 x 12 -> 2 x 3 blocks of 16, x 3 each.
constexpr int64_t kComponentsPerStep = 6 * 3 + 6 * 3;

// Every rank has the same gradients: DeMo over the group must equal DeMo alone.
TESSERA_WORKER(demo_identical_workers) {
  at::set_num_threads(1);
  const comm::CommPtr comm = ctx.world();
  constexpr int kSteps = 4;
  const DemoConfig config = multiRankConfig();
  std::vector<at::Tensor> params = makeParams(at::kFloat, 40);
  std::vector<at::Tensor> alone;
  for (const at::Tensor& p : params) alone.push_back(p.clone());
  auto grouped = makeDemo(config, params, comm, 0.01);
  auto single = makeDemo(config, alone, nullptr, 0.01);
  TESSERA_CHECK_EQ(demo::payloadBytesPerStep(config, params), kComponentsPerStep * 6);
  for (int step = 0; step < kSteps; ++step) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = gradientFor(params[i], 0, step, i);
      alone[i].mutable_grad() = gradientFor(alone[i], 0, step, i);
    }
    grouped->step();
    single->step();
    for (size_t i = 0; i < params.size(); ++i) {
      expectTensorsEqual(params[i], alone[i], "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
  }
  // One all-gather per step; a ring all-gather sends (W - 1) payloads.
  const comm::OpStats gathers = comm->stats().of(comm::OpKind::kAllGather);
  TESSERA_CHECK_EQ(gathers.calls, static_cast<uint64_t>(kSteps));
  TESSERA_CHECK_EQ(gathers.bytesSent, static_cast<uint64_t>(kSteps * (comm->size() - 1) * kComponentsPerStep * 6));
  std::printf("rank %d: %llu bytes sent in %d steps\n", comm->rank(),
              static_cast<unsigned long long>(gathers.bytesSent), kSteps);
}

// Different gradients per rank: compare with every worker simulated here.
TESSERA_WORKER(demo_different_workers) {
  at::set_num_threads(1);
  const comm::CommPtr comm = ctx.world();
  const int workers = comm->size();
  constexpr int kSteps = 4;
  const DemoConfig config = multiRankConfig();
  const double lr = 0.01;
  std::vector<at::Tensor> params = makeParams(at::kDouble, 50);
  ReferenceDemo reference{config, lr, {}, {}};
  for (const at::Tensor& p : params) reference.params.push_back(p.clone());
  reference.delta.assign(workers, {});
  for (auto& d : reference.delta) {
    for (const at::Tensor& p : params) d.push_back(at::zeros_like(p));
  }
  auto optimizer = makeDemo(config, params, comm, lr);
  for (int step = 0; step < kSteps; ++step) {
    std::vector<std::vector<at::Tensor>> grads(workers);
    for (int w = 0; w < workers; ++w) {
      for (size_t i = 0; i < params.size(); ++i) grads[w].push_back(gradientFor(reference.params[i], w, step, i));
    }
    for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[comm->rank()][i].clone();
    optimizer->step();
    reference.step(grads);
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string what = "step " + std::to_string(step) + " parameter " + std::to_string(i);
      expectTensorsEqual(params[i], reference.params[i], what, 1e-12);
      expectTensorsEqual(optimizer->state().perParameter.at("demo/delta")[i], reference.delta[comm->rank()][i],
                         what + " delta", 1e-12);
    }
  }
  // The workers really differed, and still hold the same parameters.
  const at::Tensor mine = at::cat({params[0].reshape({-1}), params[1].reshape({-1})});
  at::Tensor all = at::empty({workers * mine.numel()}, at::kDouble);
  comm->allGather(mine, all);
  for (int r = 0; r < workers; ++r) expectTensorsEqual(all.narrow(0, r * mine.numel(), mine.numel()), mine, "replica");
  const double deltaGap = (reference.delta[0][1] - reference.delta[1][1]).abs().max().item<double>();
  TESSERA_CHECK(deltaGap > 1e-3, "the simulated workers' momenta did not differ (" << deltaGap << ")");
}

// Three ranks: the mean of three equal values (two ranks are covered by the next test).
TEST(DemoMultiProcess, IdenticalWorkersMatchOneWorker) {
  auto result = testing::runWorkers("demo_identical_workers", {.ranks = 3, .deadline = std::chrono::seconds(60)});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(DemoMultiProcess, DifferentWorkersMatchReferenceScatterMean) {
  auto result = testing::runWorkers("demo_different_workers", {.ranks = 2, .deadline = std::chrono::seconds(60)});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::optim
