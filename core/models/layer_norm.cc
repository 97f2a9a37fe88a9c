// tessera's LayerNorm, plain and on sequence shards.
#include "tessera/core/models/layer_norm.h"

#include <ATen/ATen.h>

#include <utility>

#include "tessera/core/error.h"

namespace tessera::models {

LayerNormImpl::LayerNormImpl(int64_t dim, LayerOptions options, double eps) : dim_(dim), eps_(eps) {
  TESSERA_CHECK_ARG(dim >= 1 && eps > 0, "LayerNorm needs dim >= 1 and eps > 0, got " << dim << " and " << eps);
  weight = register_parameter("weight", at::ones({dim}));
  bias = register_parameter("bias", at::zeros({dim}));
  shard(std::move(options));
}

void LayerNormImpl::shard(LayerOptions options) {
  options.validate("LayerNorm(" + std::to_string(dim_) + ")", LayerOptions::Kind::kNorm);
  TESSERA_CHECK_ARG(options.sharding == Sharding::kNone,
                    "LayerNorm(" << dim_ << ") is replicated; it cannot be " << toString(options.sharding)
                                 << "-sharded");
  options_ = std::move(options);
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) {
  TESSERA_CHECK_ARG(x.dim() >= 1 && x.size(-1) == dim_,
                    "LayerNorm(" << dim_ << ") wants (..., " << dim_ << ") inputs, got " << x.sizes());
  if (!options_.sequence_parallel) return at::layer_norm(x, {dim_}, weight, bias, eps_);
  ShardGroup& group = *options_.group;
  return at::layer_norm(x, {dim_}, group.copyToShards(weight), group.copyToShards(bias), eps_);
}

}  // namespace tessera::models
