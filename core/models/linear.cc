// tessera's Linear: the plain layer and its column- and row-parallel modes
// (the deferred weight gradient's GEMM is deferred_linear.cc).
#include "tessera/core/models/linear.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/models/precision.h"

namespace tessera::models {

at::Tensor applyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const LayerOptions& options, Fp8LinearScalers* fp8) {
  if (options.precision == Precision::kBf16) return bf16Linear(x, weight, bias, options);
  if (options.precision == Precision::kFp8) {
    TESSERA_CHECK_ARG(fp8 != nullptr, "applyLinear: fp8 precision needs the layer's scaling state (a Linear "
                                      "holds it); embeddings and other GEMMs cannot run in fp8");
    return fp8Linear(x, weight, bias, options, *fp8);
  }
  const bool deferred = options.weight_grad == WeightGrad::kDeferred && at::GradMode::is_enabled();
  if (options.precision == Precision::kFp32) {
    auto fp32 = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    if (deferred) return deferredLinear(fp32(x), fp32(weight), fp32(bias), options.weight_grad_store);
    return at::linear(fp32(x), fp32(weight), fp32(bias));
  }
  if (deferred) return deferredLinear(x, weight, bias, options.weight_grad_store);
  return at::linear(x, weight, bias);
}

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias, LayerOptions options)
    : in_features_(in_features), out_features_(out_features) {
  TESSERA_CHECK_ARG(in_features >= 1 && out_features >= 1,
                    "Linear needs in_features and out_features >= 1, got " << in_features << " and "
                                                                           << out_features);
  // torch::nn::Linear's default (kaiming_uniform with a = sqrt(5), which is
  // U(-1/sqrt(in), 1/sqrt(in))), so a layer used alone behaves like torch's.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  weight = register_parameter("weight", at::empty({out_features, in_features}).uniform_(-bound, bound));
  if (with_bias) bias = register_parameter("bias", at::empty({out_features}).uniform_(-bound, bound));
  options.validate("Linear(" + std::to_string(in_features) + ", " + std::to_string(out_features) + ")",
                   LayerOptions::Kind::kLinear);
  setLayouts();
  if (options.sharding != Sharding::kNone) {
    shard(std::move(options));
  } else {
    options_ = std::move(options);
  }
  resetFp8State();
}

void LinearImpl::resetFp8State() {
  fp8_ = options_.precision == Precision::kFp8 ? std::make_shared<Fp8LinearScalers>(options_.fp8) : nullptr;
}

void LinearImpl::setPrecision(Precision precision, const numerics::Fp8RecipeConfig& fp8) {
  LayerOptions next = options_;
  next.precision = precision;
  next.fp8 = fp8;
  next.validate("Linear(" + std::to_string(in_features_) + ", " + std::to_string(out_features_) + ")",
                LayerOptions::Kind::kLinear);
  options_ = std::move(next);
  resetFp8State();
}

void LinearImpl::setSequenceParallel(bool on) {
  TESSERA_CHECK_ARG(options_.sharding == Sharding::kColumn || options_.sharding == Sharding::kRow,
                    "Linear(" << in_features_ << ", " << out_features_ << ").setSequenceParallel: the layer is "
                              << toString(options_.sharding) << "; only column- and row-parallel layers switch");
  options_.sequence_parallel = on;
}

ShardRange LinearImpl::outputRange() const {
  if (options_.sharding != Sharding::kColumn) return {0, out_features_};
  return shardRange(out_features_ / options_.fused_blocks, options_.group->size(), options_.group->rank());
}

ShardRange LinearImpl::inputRange() const {
  if (options_.sharding != Sharding::kRow) return {0, in_features_};
  return shardRange(in_features_, options_.group->size(), options_.group->rank());
}

void LinearImpl::setLayouts() {
  const int64_t blocks = options_.fused_blocks;
  const int64_t blockRows = out_features_ / blocks;
  const ShardRange out = outputRange();
  const ShardRange in = inputRange();
  weight_layout_ = {{out_features_, in_features_}, {}};
  bias_layout_ = {{out_features_}, {}};
  for (int64_t k = 0; k < blocks; ++k) {
    weight_layout_.pieces.push_back(TensorSlice::box({k * blockRows + out.begin, in.begin}, {out.size, in.size}));
    bias_layout_.pieces.push_back(TensorSlice::box({k * blockRows + out.begin}, {out.size}));
  }
}

void LinearImpl::shard(LayerOptions options) {
  const std::string layer = "Linear(" + std::to_string(in_features_) + ", " + std::to_string(out_features_) + ")";
  TESSERA_CHECK_ARG(options_.sharding == Sharding::kNone,
                    layer << " is already " << toString(options_.sharding) << "-sharded; shard() takes a whole layer");
  options.validate(layer, LayerOptions::Kind::kLinear);
  TESSERA_CHECK_ARG(out_features_ % options.fused_blocks == 0,
                    layer << ": " << out_features_ << " outputs do not split into " << options.fused_blocks
                          << " fused blocks");
  options_ = std::move(options);
  const ShardRange out = outputRange();  // throws when a rank would hold nothing
  const ShardRange in = inputRange();
  setLayouts();
  at::NoGradGuard no_grad;
  if (options_.sharding == Sharding::kColumn) {
    const int64_t blockRows = out_features_ / options_.fused_blocks;
    std::vector<at::Tensor> rows, biasRows;
    for (int64_t k = 0; k < options_.fused_blocks; ++k) {
      rows.push_back(weight.narrow(0, k * blockRows + out.begin, out.size));
      if (bias.defined()) biasRows.push_back(bias.narrow(0, k * blockRows + out.begin, out.size));
    }
    weight.set_data(at::cat(rows, 0).contiguous());  // (blocks * out_r, in)
    if (bias.defined()) bias.set_data(at::cat(biasRows, 0).contiguous());
  } else if (options_.sharding == Sharding::kRow) {
    weight.set_data(weight.narrow(1, in.begin, in.size).contiguous());  // (out, in_r); bias stays whole
  }
  resetFp8State();
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  const int64_t in = inputRange().size;
  TESSERA_CHECK_ARG(x.dim() >= 1 && x.size(-1) == in,
                    "Linear(" << in_features_ << ", " << out_features_ << ")"
                              << (options_.sharding == Sharding::kRow ? " row-parallel" : "") << " wants (..., "
                              << in << ") inputs, got " << x.sizes());
  ShardGroup* group = options_.group.get();
  const bool sequence = options_.sequence_parallel;
  const int64_t seqDim = x.dim() - 2;  // (..., T, C)
  switch (options_.sharding) {
    case Sharding::kColumn: {
      // f (or the sequence gather) at the block's entry; no communication after.
      const at::Tensor whole = sequence ? group->gatherFromSequence(x, seqDim) : group->copyToShards(x);
      return applyLinear(whole, weight, bias, options_, fp8_.get());  // (..., blocks * out_r)
    }
    case Sharding::kRow: {
      // Partial products over this rank's inputs, summed (or reduce-scattered
      // along the sequence) at the block's exit; the bias once, after the sum.
      const at::Tensor partial = applyLinear(x, weight, at::Tensor(), options_, fp8_.get());  // (..., out)
      at::Tensor y = sequence ? group->reduceScatterToSequence(partial, seqDim) : group->reduceFromShards(partial);
      if (bias.defined()) y = y + (sequence ? group->copyToShards(bias) : bias);
      return y;
    }
    default: {
      if (!sequence) return applyLinear(x, weight, bias, options_, fp8_.get());  // (..., out)
      // A replicated layer on this rank's sequence shard: its gradients are partial sums.
      return applyLinear(x, group->copyToShards(weight), bias.defined() ? group->copyToShards(bias) : bias,
                         options_, fp8_.get());
    }
  }
}

void LinearImpl::setWeightGradStore(std::shared_ptr<WeightGradStore> store) {
  options_.weight_grad = store ? WeightGrad::kDeferred : WeightGrad::kWithInput;
  options_.weight_grad_store = std::move(store);
}

const ParameterLayout* LinearImpl::parameterLayout(const std::string& local_name) const {
  if (local_name == "weight") return &weight_layout_;
  if (local_name == "bias" && bias.defined()) return &bias_layout_;
  return nullptr;
}

}  // namespace tessera::models
