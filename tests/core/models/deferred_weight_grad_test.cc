// The deferred weight gradient (issue 16's split backward) against ordinary
// autograd: a Linear in every mode and whole GPTs (tied and untied, with
// dropout) run three micro-batches' backward (B, keyed per micro-batch), hold
// no weight gradient yet, then drain W in a shuffled order -- and must end
// with the gradients an independent ordinary backward of the same
// micro-batches produces. Sharded modes run over a one-rank ShardGroup whose
// regions are real autograd nodes (copyToShards scales its gradient by 3, the
// sequence gather by 2, as an all-reduce over identical replicas would), so a
// dW that bypassed the weight's producer node would be caught.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/weight_grad_store.h"
#include "tests/harness/fixtures.h"

namespace tessera::models {
namespace {

constexpr double kTol = 1e-6;

// Identity forward; the gradient times `factor` backward.
struct ScaleGradient : torch::autograd::Function<ScaleGradient> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double factor) {
    ctx->saved_data["factor"] = factor;
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {grads[0] * ctx->saved_data["factor"].toDouble(), at::Tensor()};
  }
};

// One rank whose regions are autograd nodes with observable backward factors.
class OneRankGroup final : public ShardGroup {
 public:
  int64_t rank() const override { return 0; }
  int64_t size() const override { return 1; }
  std::string name() const override { return "fake-tp"; }
  at::Tensor copyToShards(const at::Tensor& x) override { return ScaleGradient::apply(x, 3.0); }
  at::Tensor reduceFromShards(const at::Tensor& x) override { return ScaleGradient::apply(x, 1.0); }
  at::Tensor scatterToShards(const at::Tensor& x, int64_t) override { return ScaleGradient::apply(x, 1.0); }
  at::Tensor gatherFromShards(const at::Tensor& x, int64_t) override { return ScaleGradient::apply(x, 1.0); }
  at::Tensor gatherFromSequence(const at::Tensor& x, int64_t) override { return ScaleGradient::apply(x, 2.0); }
  at::Tensor reduceScatterToSequence(const at::Tensor& x, int64_t) override {
    return ScaleGradient::apply(x, 1.0);
  }
  at::Tensor allReduceSum(const at::Tensor& x) override { return x.clone(); }
  at::Tensor allReduceMax(const at::Tensor& x) override { return x.clone(); }
};

void expectClose(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what << ": no gradient";
  ASSERT_TRUE(expected.defined()) << what << ": the reference has no gradient";
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const double err = (actual - expected).abs().max().item<double>();
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  EXPECT_LE(err, kTol * scale) << what << ": max |deferred - ordinary| = " << err;
}

struct Mode {
  std::string name;
  LayerOptions options;
};

std::vector<Mode> modes() {
  auto group = std::make_shared<OneRankGroup>();
  std::vector<Mode> out;
  out.push_back({"plain", {}});
  LayerOptions column;
  column.sharding = Sharding::kColumn;
  column.group = group;
  out.push_back({"column", column});
  LayerOptions qkv = column;
  qkv.fused_blocks = 3;
  out.push_back({"fused qkv", qkv});
  LayerOptions row;
  row.sharding = Sharding::kRow;
  row.group = group;
  out.push_back({"row", row});
  LayerOptions seqColumn = column;
  seqColumn.sequence_parallel = true;
  out.push_back({"column, sequence-parallel", seqColumn});
  LayerOptions seqRow = row;
  seqRow.sequence_parallel = true;
  out.push_back({"row, sequence-parallel", seqRow});
  LayerOptions seqReplicated;  // the weight reaches the GEMM through copyToShards
  seqReplicated.group = group;
  seqReplicated.sequence_parallel = true;
  out.push_back({"replicated on sequence shards", seqReplicated});
  LayerOptions fp32;  // double parameters cast to fp32: dW goes back through the cast
  fp32.precision = Precision::kFp32;
  out.push_back({"fp32 precision", fp32});
  return out;
}

// Three micro-batches through a Linear in `mode`, ordinarily and deferred.
TEST(DeferredWeightGrad, LinearInEveryModeMatchesOrdinaryBackward) {
  constexpr int kMicroBatches = 3;
  for (const Mode& mode : modes()) {
    SCOPED_TRACE(mode.name);
    torch::manual_seed(7);
    Linear ordinary(5, 6, true, mode.options);
    Linear deferred(5, 6, true, mode.options);
    ordinary->to(at::kDouble);
    deferred->to(at::kDouble);
    {
      at::NoGradGuard noGrad;
      deferred->weight.copy_(ordinary->weight);
      deferred->bias.copy_(ordinary->bias);
    }
    auto store = std::make_shared<QueuedWeightGradStore>();
    deferred->setWeightGradStore(store);
    EXPECT_EQ(deferred->options().weight_grad, WeightGrad::kDeferred);
    int hookFirings = 0;  // a tensor hook, as DDP registers: must fire in W, once per delivery
    deferred->weight.register_hook([&hookFirings](const at::Tensor& grad) {
      EXPECT_TRUE(grad.defined());
      ++hookFirings;
    });

    std::vector<at::Tensor> inputs, directions;
    for (int m = 0; m < kMicroBatches; ++m) {
      inputs.push_back(torch::randn({2, 4, 5}, at::kDouble));  // (B, T, in)
      directions.push_back(torch::randn({2, 4, 6}, at::kDouble));
    }
    std::vector<at::Tensor> ordinaryInputGrads;
    for (int m = 0; m < kMicroBatches; ++m) {
      const at::Tensor x = inputs[m].clone().requires_grad_(true);
      (ordinary->forward(x) * directions[m]).sum().backward();
      ordinaryInputGrads.push_back(x.grad());
    }
    for (int m = 0; m < kMicroBatches; ++m) {  // B
      const at::Tensor x = inputs[m].clone().requires_grad_(true);
      const at::Tensor loss = (deferred->forward(x) * directions[m]).sum();
      store->setKey(m);
      loss.backward();
      expectClose(x.grad(), ordinaryInputGrads[m], "input gradient of micro-batch " + std::to_string(m));
      EXPECT_EQ(store->pending(m), 1u);
    }
    EXPECT_FALSE(deferred->weight.grad().defined()) << "B must not produce the weight's gradient";
    EXPECT_EQ(hookFirings, 0);
    expectClose(deferred->bias.grad(), ordinary->bias.grad(), "bias (finished in B)");
    EXPECT_EQ(store->pending(), static_cast<size_t>(kMicroBatches));
    for (int m : {2, 0, 1}) store->drain(m);  // W, out of order
    EXPECT_EQ(store->pending(), 0u);
    EXPECT_EQ(hookFirings, kMicroBatches);
    expectClose(deferred->weight.grad(), ordinary->weight.grad(), "weight after W");
    expectClose(deferred->bias.grad(), ordinary->bias.grad(), "bias after W");
  }
}

// The first layer: nothing but the weight needs a gradient, which must still be deferred.
TEST(DeferredWeightGrad, OnlyTheWeightNeedsAGradient) {
  torch::manual_seed(3);
  Linear ordinary(4, 3, /*bias=*/false);
  Linear deferred(4, 3, /*bias=*/false);
  {
    at::NoGradGuard noGrad;
    deferred->weight.copy_(ordinary->weight);
  }
  auto store = std::make_shared<QueuedWeightGradStore>();
  deferred->setWeightGradStore(store);
  const at::Tensor x = torch::randn({5, 4});
  ordinary->forward(x).pow(2).sum().backward();
  deferred->forward(x).pow(2).sum().backward();
  EXPECT_FALSE(deferred->weight.grad().defined());
  EXPECT_EQ(store->pending(0), 1u);  // key 0 until setKey
  store->drain(0);
  expectClose(deferred->weight.grad(), ordinary->weight.grad(), "weight");

  // Without grad mode nothing is recorded or deferred.
  {
    at::NoGradGuard noGrad;
    deferred->forward(x);
  }
  EXPECT_EQ(store->pending(), 0u);
  // Back to ordinary autograd.
  deferred->setWeightGradStore(nullptr);
  EXPECT_EQ(deferred->options().weight_grad, WeightGrad::kWithInput);
  deferred->weight.mutable_grad() = at::Tensor();
  deferred->forward(x).pow(2).sum().backward();
  EXPECT_EQ(store->pending(), 0u);
  expectClose(deferred->weight.grad(), ordinary->weight.grad(), "weight, not deferred");
}

TEST(DeferredWeightGrad, StoreKeysCountsAndUnknownKeys) {
  QueuedWeightGradStore store;
  std::vector<int> ran;
  store.setKey(5);
  store.defer([&] { ran.push_back(1); });
  store.defer([&] { ran.push_back(2); });
  store.setKey(9);
  store.defer([&] { ran.push_back(3); });
  EXPECT_EQ(store.key(), 9);
  EXPECT_EQ(store.pending(5), 2u);
  EXPECT_EQ(store.pending(9), 1u);
  EXPECT_EQ(store.pending(), 3u);
  store.drain(42);  // unknown key: a no-op (a W whose B deferred nothing)
  EXPECT_EQ(store.pending(), 3u);
  EXPECT_TRUE(ran.empty());
  store.drain(5);
  EXPECT_EQ(ran, (std::vector<int>{1, 2}));  // FIFO
  store.drain(5);                            // drained already: no-op
  EXPECT_EQ(store.pending(), 1u);
  store.clear();
  EXPECT_EQ(store.pending(), 0u);
  store.drain(9);
  EXPECT_EQ(ran.size(), 2u);  // cleared closures never run

  // A throwing closure leaves the rest queued.
  store.setKey(1);
  store.defer([] { throw InvalidArgument("boom"); });
  store.defer([&] { ran.push_back(4); });
  EXPECT_THROW(store.drain(1), InvalidArgument);
  EXPECT_EQ(store.pending(1), 1u);
  store.drain(1);
  EXPECT_EQ(ran.back(), 4);
}

using testing::smallGpt;

// The names of the parameters whose gradient a deferred GEMM produces
// entirely (the tied table also gets the lookup's gradient in B).
bool isGemmWeight(torch::nn::Module& gpt, const std::string& name) {
  for (const auto& item : gpt.named_modules("", /*include_self=*/false)) {
    if (dynamic_cast<LinearImpl*>(item.value().get()) != nullptr && name == item.key() + ".weight") return true;
  }
  return false;
}

TEST(DeferredWeightGrad, WholeGptTiedAndUntiedWithDropout) {
  constexpr int kMicroBatches = 3;
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    Gpt ordinary(smallGpt(tied));
    Gpt deferred(smallGpt(tied));
    ordinary->train();
    deferred->train();
    auto store = std::make_shared<QueuedWeightGradStore>();
    setDeferredWeightGradients(*deferred, store);

    size_t gemms = 0;  // deferred GEMMs per micro-batch: every Linear, plus the tied head
    deferred->apply([&gemms](torch::nn::Module& m) {
      if (dynamic_cast<LinearImpl*>(&m) != nullptr) ++gemms;
    });
    if (tied) ++gemms;

    std::vector<std::pair<at::Tensor, at::Tensor>> batches;
    for (int m = 0; m < kMicroBatches; ++m) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + m);
      const at::Tensor all = at::randint(0, 29, {2, 9}, gen, at::kLong);
      batches.emplace_back(all.narrow(1, 0, 8).contiguous(), all.narrow(1, 1, 8).contiguous());
    }
    for (int m = 0; m < kMicroBatches; ++m) {
      ordinary->setRandomKey(0, m);
      (ordinary->loss(batches[m].first, batches[m].second) / kMicroBatches).backward();
    }
    for (int m = 0; m < kMicroBatches; ++m) {
      deferred->setRandomKey(0, m);
      const at::Tensor loss = deferred->loss(batches[m].first, batches[m].second) / kMicroBatches;
      store->setKey(m);
      loss.backward();  // B
      EXPECT_EQ(store->pending(m), gemms);
    }
    int undelivered = 0;
    for (const auto& item : deferred->named_parameters()) {
      if (isGemmWeight(*deferred, item.key())) {
        EXPECT_FALSE(item.value().grad().defined()) << item.key() << " has a gradient before W";
        ++undelivered;
      }
    }
    EXPECT_GT(undelivered, 0);
    EXPECT_EQ(store->pending(), gemms * kMicroBatches);
    for (int m : {1, 2, 0}) store->drain(m);  // W
    EXPECT_EQ(store->pending(), 0u);

    const auto want = ordinary->named_parameters();
    for (const auto& item : deferred->named_parameters()) {
      expectClose(item.value().grad(), want[item.key()].grad(), item.key());
    }
  }
}

}  // namespace
}  // namespace tessera::models
