// FP8 column- and row-parallel Linear over 2 ranks (Gloo) against the
// single-process FP8 layer and the fake-quant reference (tests/harness/
// fp8_reference.h), for every recipe over two steps:
//   - the weight's scales equal the tp = 1 layer's (its amax is the logical
//     tensor's: all-reduce-max over the shard group);
//   - outputs and the x, W and b gradients equal the reference exactly. The
//     reference quantizes the whole weight, and the activations and output
//     gradients per rank as the layer does by design: a column layer's
//     output-gradient slice and a row layer's input slice carry their own
//     scales (fp8_scaling.h "Sharding").
// Exact equality across different GEMM splits needs sums that fp32 adds
// without rounding: every operand is +-[0.5, 2) times a power of two, so the
// FP8-quantized products are multiples of 2^-8 (x 2^k) whose sums over 256
// terms stay within 24 bits, in any order, and power-of-two scales rescale
// exactly.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/precision.h"
#include "tessera/parallel/tp_regions.h"
#include "tests/harness/fp8_reference.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

using models::Fp8LinearScalers;
using models::Linear;
using models::LayerOptions;
using models::Precision;
using models::Sharding;
using numerics::Fp8RecipeConfig;
using numerics::Fp8Role;
using numerics::ScalingRecipe;
using testing::RefDelayed;
using testing::refFakeQuant;

constexpr int64_t kIn = 256, kOut = 256;  // halves of 128: shards align with the 128-wide tiles

// +-[0.5, 2) * 2^exponent, the same on every rank (seeded).
at::Tensor gridData(std::vector<int64_t> sizes, int64_t seed, int exponent) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor magnitude = at::rand(sizes, gen) * 1.5 + 0.5;
  const at::Tensor sign = at::randint(0, 2, sizes, gen, at::kFloat) * 2 - 1;
  return magnitude * sign * std::ldexp(1.0, exponent);
}

// The fake-quant of t split into `parts` along its last dim, each part with
// its own scales and delayed state (the per-rank casts of the sharded layer).
at::Tensor perSlice(const at::Tensor& t, const Fp8RecipeConfig& c, Fp8Role role, std::vector<RefDelayed>& states) {
  const float fmax = role == Fp8Role::kGradOutput ? 57344.0f : 448.0f;
  const int64_t width = t.size(-1) / static_cast<int64_t>(states.size());
  std::vector<at::Tensor> parts;
  for (size_t p = 0; p < states.size(); ++p) {
    const at::Tensor slice = t.narrow(-1, static_cast<int64_t>(p) * width, width);
    parts.push_back(refFakeQuant(slice, c, role, states[p].next(c, fmax)));
    states[p].seen.push_back(testing::amaxOf(slice));
  }
  return at::cat(parts, -1);
}

void check(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  TESSERA_CHECK(actual.sizes() == expected.sizes(), what << ": shape " << actual.sizes() << " vs " << expected.sizes());
  TESSERA_CHECK(torch::equal(actual, expected),
                what << " differs from the reference by up to " << (actual - expected).abs().max().item<float>());
}

// The weight scale as a tensor of the weight's shape (per-tensor, per-row
// and per-block scales all expand to it).
at::Tensor expandedWeightScale(const Fp8LinearScalers* s, at::IntArrayRef weightShape) {
  return s->weight->lastScale().expand(weightShape).contiguous();
}

TESSERA_WORKER(fp8_tp_linear) {
  const comm::CommPtr world = ctx.world();
  const auto group = makeTensorParallelGroup(world);
  const int64_t rank = group->rank(), p = group->size();
  const bool column = ctx.arg("sharding") == "column";
  Fp8RecipeConfig c;
  c.recipe = numerics::parseScalingRecipe(ctx.arg("recipe"), "recipe");
  c.amax_history = 2;

  LayerOptions plain;
  plain.precision = Precision::kFp8;
  plain.fp8 = c;
  Linear whole(kIn, kOut, true, plain);  // tp = 1, in this process
  Linear sharded(kIn, kOut, true, plain);
  {
    at::NoGradGuard noGrad;
    // Each rank's slice gets its own magnitude (x4 on the second half of the
    // rows, x2 on the second half of the columns), so a local weight amax
    // would pick another scale than the logical one.
    const at::Tensor rowFactor = at::cat({at::ones({kOut / 2, 1}), at::full({kOut / 2, 1}, 4.0)});
    const at::Tensor colFactor = at::cat({at::ones({1, kIn / 2}), at::full({1, kIn / 2}, 2.0)}, 1);
    whole->weight.copy_(gridData({kOut, kIn}, 1, 0) * rowFactor * colFactor);
    whole->bias.copy_(gridData({kOut}, 2, 0));  // on the grid too: addmm may start its sums from the bias
    sharded->weight.copy_(whole->weight);
    sharded->bias.copy_(whole->bias);
  }
  LayerOptions split = plain;
  split.sharding = column ? Sharding::kColumn : Sharding::kRow;
  split.group = group;
  sharded->shard(split);
  const int64_t width = kIn / p;  // column: output rows per rank; row: input columns per rank (kIn == kOut)

  std::vector<RefDelayed> xStates(column ? 1 : p), wState(1), gStates(column ? p : 1);
  for (int step = 0; step < 2; ++step) {
    const std::string at = "step " + std::to_string(step) + " rank " + std::to_string(rank) + ": ";
    const at::Tensor x = gridData({2, 3, kIn}, 10 + step, step);
    const at::Tensor G = gridData({2, 3, kOut}, 20 + step, -10 - step);  // dY

    // tp = 1.
    whole->zero_grad();
    const at::Tensor wholeY = whole->forward(x.clone().requires_grad_());
    (wholeY * G).sum().backward();

    // tp = 2: a column layer takes the whole x and gives its output slice; a
    // row layer takes its input slice and gives the summed whole output.
    sharded->zero_grad();
    const at::Tensor xLocal = (column ? x : x.narrow(-1, rank * width, width)).clone().requires_grad_();
    const at::Tensor y = sharded->forward(xLocal);
    (y * (column ? G.narrow(-1, rank * width, width) : G)).sum().backward();

    // The weight's scales are the tp = 1 layer's, on this rank's slice.
    const at::Tensor wholeScale = expandedWeightScale(whole->fp8Scalers(), whole->weight.sizes());
    check(expandedWeightScale(sharded->fp8Scalers(), sharded->weight.sizes()),
          column ? wholeScale.narrow(0, rank * width, width) : wholeScale.narrow(1, rank * width, width),
          at + "weight scale");

    // The reference: whole-weight casts, per-rank activation / gradient casts.
    const at::Tensor xq = perSlice(x, c, Fp8Role::kInput, xStates).requires_grad_();
    const at::Tensor wq = perSlice(whole->weight.detach(), c, Fp8Role::kWeight, wState).requires_grad_();
    const at::Tensor bl = whole->bias.detach().clone().requires_grad_();
    const at::Tensor gemm = at::linear(xq, wq);
    gemm.backward(perSlice(G, c, Fp8Role::kGradOutput, gStates));
    const at::Tensor yRef = gemm.detach() + bl;  // the bias after the GEMM: db = sum of the unquantized dY
    yRef.backward(G);
    if (column) {
      check(y, yRef.narrow(-1, rank * width, width), at + "output");
      check(y, wholeY.narrow(-1, rank * width, width), at + "output vs the tp = 1 layer");
      check(xLocal.grad(), xq.grad(), at + "x.grad");
      check(sharded->weight.grad(), wq.grad().narrow(0, rank * width, width), at + "W.grad");
      check(sharded->bias.grad(), bl.grad().narrow(0, rank * width, width), at + "b.grad");
    } else {
      check(y, yRef, at + "output");
      check(xLocal.grad(), xq.grad().narrow(-1, rank * width, width), at + "x.grad");
      check(sharded->weight.grad(), wq.grad().narrow(1, rank * width, width), at + "W.grad");
      check(sharded->bias.grad(), bl.grad(), at + "b.grad");
    }
  }
}

void run(const std::string& sharding, const std::string& recipe) {
  auto result = testing::runWorkers("fp8_tp_linear", {.ranks = 2, .args = {{"sharding", sharding}, {"recipe", recipe}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fp8TensorParallel, ColumnDelayed) { run("column", "delayed"); }
TEST(Fp8TensorParallel, ColumnTensorwise) { run("column", "tensorwise"); }
TEST(Fp8TensorParallel, ColumnRowwise) { run("column", "rowwise"); }
TEST(Fp8TensorParallel, ColumnBlockwise) { run("column", "blockwise"); }
TEST(Fp8TensorParallel, RowDelayed) { run("row", "delayed"); }
TEST(Fp8TensorParallel, RowTensorwise) { run("row", "tensorwise"); }
TEST(Fp8TensorParallel, RowRowwise) { run("row", "rowwise"); }
TEST(Fp8TensorParallel, RowBlockwise) { run("row", "blockwise"); }

}  // namespace
}  // namespace tessera::parallel
