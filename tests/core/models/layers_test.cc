// Tests of tessera's Linear and Embedding (linear.h, embedding.h), their
// options (layer_options.h) and logicalParameters() (logical_parameters.h).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/modules/container/modulelist.h>

#include <memory>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/init.h"
#include "tessera/core/models/layer_norm.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/logical_parameters.h"

namespace tessera::models {
namespace {

// y[b][o] = sum_i x[b][i] w[o][i] + bias[o], by loops in double.
at::Tensor naiveLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto xd = x.to(at::kDouble).contiguous(), wd = w.to(at::kDouble).contiguous();
  auto y = at::zeros({x.size(0), w.size(0)}, at::kDouble);
  auto xa = xd.accessor<double, 2>();
  auto wa = wd.accessor<double, 2>();
  auto ya = y.accessor<double, 2>();
  for (int64_t b = 0; b < x.size(0); ++b) {
    for (int64_t o = 0; o < w.size(0); ++o) {
      double s = bias.defined() ? bias[o].item<double>() : 0.0;
      for (int64_t i = 0; i < w.size(1); ++i) s += xa[b][i] * wa[o][i];
      ya[b][o] = s;
    }
  }
  return y;
}

TEST(LinearTest, ForwardBackwardAndDefaultInit) {
  torch::manual_seed(1);
  Linear layer(5, 3);
  ASSERT_EQ(layer->weight.sizes(), (std::vector<int64_t>{3, 5}));
  ASSERT_EQ(layer->bias.sizes(), (std::vector<int64_t>{3}));
  EXPECT_LE(layer->weight.abs().max().item<double>(), 1.0 / std::sqrt(5.0));  // torch::nn::Linear's bound
  const auto x = at::randn({4, 5});
  EXPECT_TRUE(at::allclose(layer->forward(x).to(at::kDouble), naiveLinear(x, layer->weight, layer->bias), 1e-5, 1e-6));
  // (..., in) inputs keep their leading dims.
  EXPECT_EQ(layer->forward(at::randn({2, 4, 5})).sizes(), (std::vector<int64_t>{2, 4, 3}));
  const auto w = at::randn({4, 3});
  (layer->forward(x) * w).sum().backward();
  EXPECT_TRUE(at::allclose(layer->weight.grad(), w.t().matmul(x), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(layer->bias.grad(), w.sum(0), 1e-5, 1e-6));

  Linear no_bias(5, 3, /*bias=*/false);
  EXPECT_FALSE(no_bias->bias.defined());
  EXPECT_EQ(no_bias->named_parameters().keys(), (std::vector<std::string>{"weight"}));
  EXPECT_TRUE(at::allclose(no_bias->forward(x).to(at::kDouble), naiveLinear(x, no_bias->weight, at::Tensor()), 1e-5, 1e-6));
  EXPECT_THROW(layer->forward(at::randn({4, 6})), InvalidArgument);
  EXPECT_THROW(Linear(0, 3), InvalidArgument);
}

TEST(LinearTest, Fp32PrecisionCastsOperandsUp) {
  LayerOptions options;
  options.precision = Precision::kFp32;
  Linear layer(4, 2, /*bias=*/true, options);
  const auto x = at::randn({3, 4}, at::kDouble);
  const auto y = layer->forward(x);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::allclose(y.to(at::kDouble), naiveLinear(x.to(at::kFloat), layer->weight, layer->bias), 1e-5, 1e-6));
  // kDefault computes in the operands' dtype, as torch::nn::Linear.
  Linear plain(4, 2);
  plain->to(at::kDouble);
  EXPECT_EQ(plain->forward(x).scalar_type(), at::kDouble);
}

// A group of `size` ranks seen from rank `rank` whose regions are never
// called: these tests look at the slices layers take, before any collective
// (tests/parallel/tensor_parallel_test.cc runs the real ones).
class NoCommGroup : public ShardGroup {
 public:
  NoCommGroup(int64_t rank, int64_t size) : rank_(rank), size_(size) {}
  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override { return "tp"; }
  at::Tensor copyToShards(const at::Tensor&) override { return fail(); }
  at::Tensor reduceFromShards(const at::Tensor&) override { return fail(); }
  at::Tensor scatterToShards(const at::Tensor&, int64_t) override { return fail(); }
  at::Tensor gatherFromShards(const at::Tensor&, int64_t) override { return fail(); }
  at::Tensor gatherFromSequence(const at::Tensor&, int64_t) override { return fail(); }
  at::Tensor reduceScatterToSequence(const at::Tensor&, int64_t) override { return fail(); }
  at::Tensor allReduceSum(const at::Tensor&) override { return fail(); }
  at::Tensor allReduceMax(const at::Tensor&) override { return fail(); }

 private:
  static at::Tensor fail() { throw std::logic_error("NoCommGroup: no collective expected"); }
  int64_t rank_, size_;
};

class UnusedStore : public WeightGradStore {
 public:
  void defer(std::function<void()>) override {}
};

TEST(LayerOptionsTest, ShardingNeedsAGroupAndTheRightLayerKind) {
  LayerOptions column;
  column.sharding = Sharding::kColumn;
  EXPECT_THROW(Linear(4, 4, true, column), InvalidArgument);  // no group
  column.group = std::make_shared<NoCommGroup>(0, 2);
  LayerOptions row = column;
  row.sharding = Sharding::kRow;
  EXPECT_THROW(Embedding(8, 4, row), InvalidArgument);  // an embedding is split by vocabulary only
  LayerOptions vocabulary = column;
  vocabulary.sharding = Sharding::kVocabulary;
  EXPECT_THROW(Linear(4, 4, true, vocabulary), InvalidArgument);
  LayerOptions fusedRow = row;
  fusedRow.fused_blocks = 3;
  EXPECT_THROW(Linear(4, 6, true, fusedRow), InvalidArgument);  // fused blocks are a column split
  Linear twice(4, 4, true, column);
  EXPECT_THROW(twice->shard(column), InvalidArgument);
  LayerOptions norm = column;
  EXPECT_THROW(LayerNorm(4, norm), InvalidArgument);  // a LayerNorm is replicated
}

TEST(LayerOptionsTest, PrecisionAndDeferredModesAreCheckedPerLayerKind) {
  for (Precision precision : {Precision::kBf16, Precision::kFp8}) {  // issue 18: Linear computes in both
    LayerOptions options;
    options.precision = precision;
    EXPECT_NO_THROW(Linear(4, 4, true, options));
  }
  LayerOptions fp8;
  fp8.precision = Precision::kFp8;
  EXPECT_THROW(Embedding(8, 4, fp8), InvalidArgument);  // the embedding and the head stay out of FP8
  LayerOptions bf16;
  bf16.precision = Precision::kBf16;
  EXPECT_THROW(LayerNorm(4, bf16), InvalidArgument);
  LayerOptions deferred;
  deferred.weight_grad = WeightGrad::kDeferred;
  EXPECT_THROW(Linear(4, 4, true, deferred), InvalidArgument);  // no store
  deferred.weight_grad_store = std::make_shared<UnusedStore>();
  EXPECT_NO_THROW(Linear(4, 4, true, deferred));  // issue 16: the split backward exists
}

TEST(ShardRangeTest, MegatronPaddedPartition) {
  // Divisible: equal parts.
  EXPECT_EQ(shardRange(12, 3, 1).begin, 4);
  EXPECT_EQ(shardRange(12, 3, 1).size, 4);
  // 11 rows over 3: padded to 12, chunks of 4; the last holds 3.
  EXPECT_EQ(shardRange(11, 3, 2).begin, 8);
  EXPECT_EQ(shardRange(11, 3, 2).size, 3);
  // 5 rows over 4: chunks of 2 leave rank 3 nothing.
  EXPECT_THROW(shardRange(5, 4, 3), InvalidArgument);
  EXPECT_THROW(shardRange(5, 0, 0), InvalidArgument);
}

TEST(ShardedLayersTest, EachRankHoldsItsSliceOfTheWholeValues) {
  torch::manual_seed(3);
  Linear whole(4, 6);
  const at::Tensor W = whole->weight.detach().clone(), b = whole->bias.detach().clone();
  // qkv-like: 3 fused blocks of 2 rows over 2 ranks; rank 1 holds row 1 of each block.
  Linear qkv(4, 6);
  qkv->weight.detach().copy_(W);
  qkv->bias.detach().copy_(b);
  const at::Tensor handle = qkv->weight;  // references stay valid: shard() changes the tensor in place
  LayerOptions fused;
  fused.sharding = Sharding::kColumn;
  fused.group = std::make_shared<NoCommGroup>(1, 2);
  fused.fused_blocks = 3;
  qkv->shard(fused);
  EXPECT_TRUE(handle.is_same(qkv->weight));
  EXPECT_TRUE(at::equal(qkv->weight, at::cat({W.narrow(0, 1, 1), W.narrow(0, 3, 1), W.narrow(0, 5, 1)})));
  EXPECT_TRUE(at::equal(qkv->bias, at::stack({b[1], b[3], b[5]})));
  torch::nn::Module root;
  root.register_module("qkv", qkv);
  const auto params = logicalParameters(root);
  ASSERT_EQ(params[0].pieces.size(), 3u);
  EXPECT_EQ(params[0].globalShape, (std::vector<int64_t>{6, 4}));
  EXPECT_EQ(params[0].pieces[2], TensorSlice::box({5, 0}, {1, 4}));
  EXPECT_EQ(params[1].pieces[1], TensorSlice::box({3}, {1}));
  // initializeParameters fills every piece with its part of the whole init.
  initializeParameters(root, 5, [](const LogicalParameter&) { return ParameterInit::normal(1.0); });
  const at::Tensor init = initNormalSlice(5, "qkv.weight", {6, 4}, TensorSlice::whole({6, 4}), 1.0);
  EXPECT_TRUE(at::equal(qkv->weight, at::cat({init.narrow(0, 1, 1), init.narrow(0, 3, 1), init.narrow(0, 5, 1)})));

  // Row-parallel: columns [2, 4) of W, the whole bias.
  Linear row(4, 6);
  row->weight.detach().copy_(W);
  LayerOptions rowOptions = fused;
  rowOptions.sharding = Sharding::kRow;
  rowOptions.fused_blocks = 1;
  row->shard(rowOptions);
  EXPECT_TRUE(at::equal(row->weight, W.narrow(1, 2, 2)));
  EXPECT_EQ(row->bias.numel(), 6);
  EXPECT_EQ(row->inputRange().begin, 2);

  // Vocabulary: 7 rows over 2 ranks (padded to 8): rank 1 holds rows [4, 7).
  Embedding table(7, 3);
  const at::Tensor E = table->weight.detach().clone();
  LayerOptions vocabulary;
  vocabulary.sharding = Sharding::kVocabulary;
  vocabulary.group = std::make_shared<NoCommGroup>(1, 2);
  table->shard(vocabulary);
  EXPECT_TRUE(at::equal(table->weight, E.narrow(0, 4, 3)));
  EXPECT_EQ(table->vocabRange().begin, 4);
  EXPECT_EQ(*table->parameterLayout("weight")->pieces.data(), TensorSlice::box({4, 0}, {3, 3}));
}

TEST(EmbeddingTest, LookupAndAttend) {
  torch::manual_seed(2);
  Embedding table(7, 3);
  ASSERT_EQ(table->weight.sizes(), (std::vector<int64_t>{7, 3}));
  EXPECT_EQ(table->named_parameters().keys(), (std::vector<std::string>{"weight"}));
  const auto ids = at::tensor(std::vector<int64_t>{0, 6, 2, 2, 2, 5}, at::kLong).view({2, 3});  // (2, 3)
  const auto rows = table->forward(ids);                            // (2, 3, 3)
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < 3; ++t) EXPECT_TRUE(at::equal(rows[b][t], table->weight[ids[b][t].item<int64_t>()]));
  }
  const auto x = at::randn({4, 3});
  const auto logits = table->attend(x);  // (4, 7)
  EXPECT_TRUE(at::allclose(logits.to(at::kDouble), naiveLinear(x, table->weight, at::Tensor()), 1e-5, 1e-6));
  // Both directions reach the one table.
  (rows.sum() + logits.sum()).backward();
  const auto counts = at::tensor(std::vector<float>{1, 0, 3, 0, 0, 1, 1}).unsqueeze(1);  // uses of each row (7, 1)
  EXPECT_TRUE(at::allclose(table->weight.grad(), counts + x.sum(0).unsqueeze(0), 1e-5, 1e-6));
  EXPECT_THROW(table->forward(at::zeros({2}, at::kInt)), InvalidArgument);
  EXPECT_THROW(table->attend(at::randn({2, 4})), InvalidArgument);
}

// A layer holding the dim-1 box [0:4, 2:5] of a (4, 8) weight, as a
// row-parallel shard will.
class ColumnsOfAWeight : public torch::nn::Module, public DeclaresParameterLayout {
 public:
  explicit ColumnsOfAWeight(std::vector<int64_t> local_shape) {
    weight = register_parameter("weight", at::zeros(local_shape));
    layout_ = {{4, 8}, {TensorSlice::box({0, 2}, {4, 3})}};
  }
  const ParameterLayout* parameterLayout(const std::string& local_name) const override {
    return local_name == "weight" ? &layout_ : nullptr;
  }
  at::Tensor weight;
  ParameterLayout layout_;
};

TEST(LogicalParametersTest, OrderTiesFrozenAndDeclaredSlices) {
  torch::nn::Module root;
  auto a = root.register_module("a", Linear(3, 2));
  auto list = root.register_module("list", torch::nn::ModuleList());
  list->push_back(Embedding(5, 3));
  list->push_back(std::make_shared<ColumnsOfAWeight>(std::vector<int64_t>{4, 3}));
  auto b = root.register_module("b", std::make_shared<torch::nn::Module>());
  b->register_parameter("frozen", at::zeros({2}), /*requires_grad=*/false);
  b->register_parameter("tied", a->weight);  // the same tensor under a second name

  const auto params = logicalParameters(root);
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  // named_parameters() order; the second name of a tied tensor and frozen ones dropped.
  EXPECT_EQ(names, (std::vector<std::string>{"a.weight", "a.bias", "list.0.weight", "list.1.weight"}));
  EXPECT_TRUE(params[0].tensor.is_same(a->weight));
  EXPECT_EQ(params[0].globalShape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(params[0].pieces, std::vector<TensorSlice>{TensorSlice::whole({2, 3})});
  EXPECT_EQ(params[2].globalShape, (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(params[3].globalShape, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(params[3].pieces, std::vector<TensorSlice>{TensorSlice::box({0, 2}, {4, 3})});

  // initializeParameters fills a declared slice with that slice of the whole init.
  initializeParameters(root, 17, [](const LogicalParameter&) { return ParameterInit::normal(1.0); });
  const auto whole = initNormalSlice(17, "list.1.weight", {4, 8}, TensorSlice::whole({4, 8}), 1.0);
  EXPECT_TRUE(at::equal(params[3].tensor, whole.narrow(1, 2, 3)));

  torch::nn::Module bad;
  bad.register_module("w", std::make_shared<ColumnsOfAWeight>(std::vector<int64_t>{4, 4}));
  EXPECT_THROW(logicalParameters(bad), InvalidArgument);
}

}  // namespace
}  // namespace tessera::models
