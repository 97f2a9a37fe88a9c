// tessera's Embedding: the whole table and its vocabulary-parallel mode.
#include "tessera/core/models/embedding.h"

#include <ATen/ATen.h>

#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/models/linear.h"

namespace tessera::models {

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim, LayerOptions options)
    : num_embeddings_(num_embeddings), dim_(dim) {
  TESSERA_CHECK_ARG(num_embeddings >= 1 && dim >= 1,
                    "Embedding needs num_embeddings and dim >= 1, got " << num_embeddings << " and " << dim);
  options.validate("Embedding(" + std::to_string(num_embeddings) + ", " + std::to_string(dim) + ")",
                   LayerOptions::Kind::kEmbedding);
  weight = register_parameter("weight", at::randn({num_embeddings, dim}));  // torch::nn::Embedding's N(0, 1)
  weight_layout_ = ParameterLayout::whole({num_embeddings, dim});
  if (options.sharding != Sharding::kNone || options.group) {
    shard(std::move(options));
  } else {
    options_ = std::move(options);
  }
}

ShardRange EmbeddingImpl::vocabRange() const {
  if (options_.sharding != Sharding::kVocabulary) return {0, num_embeddings_};
  return shardRange(num_embeddings_, options_.group->size(), options_.group->rank());
}

void EmbeddingImpl::shard(LayerOptions options) {
  const std::string layer = "Embedding(" + std::to_string(num_embeddings_) + ", " + std::to_string(dim_) + ")";
  TESSERA_CHECK_ARG(options_.sharding == Sharding::kNone && !options_.group,
                    layer << " is already sharded; shard() takes a whole table");
  options.validate(layer, LayerOptions::Kind::kEmbedding);
  options_ = std::move(options);
  const ShardRange rows = vocabRange();  // throws when a rank would hold no row
  weight_layout_ = {{num_embeddings_, dim_}, {TensorSlice::box({rows.begin, 0}, {rows.size, dim_})}};
  at::NoGradGuard no_grad;
  if (rows.size != num_embeddings_) weight.set_data(weight.narrow(0, rows.begin, rows.size).contiguous());
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  TESSERA_CHECK_ARG(ids.scalar_type() == at::kLong,
                    "Embedding wants int64 ids, got " << ids.scalar_type() << " " << ids.sizes());
  ShardGroup* group = options_.group.get();
  if (options_.sharding != Sharding::kVocabulary) {
    // Whole table; on sequence shards its gradient is a partial sum over the group.
    return at::embedding(options_.sequence_parallel ? group->copyToShards(weight) : weight, ids);  // (..., dim)
  }
  const ShardRange rows = vocabRange();
  const at::Tensor outside = (ids < rows.begin).logical_or(ids >= rows.begin + rows.size);  // (...)
  const at::Tensor local = (ids - rows.begin).masked_fill(outside, 0);
  const at::Tensor partial = at::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0);  // (..., dim)
  return options_.sequence_parallel ? group->reduceScatterToSequence(partial, partial.dim() - 2)
                                    : group->reduceFromShards(partial);
}

at::Tensor EmbeddingImpl::attend(const at::Tensor& x) {
  TESSERA_CHECK_ARG(x.dim() >= 1 && x.size(-1) == dim_,
                    "Embedding::attend wants (..., " << dim_ << ") inputs, got " << x.sizes());
  if (options_.sharding != Sharding::kVocabulary) return applyLinear(x, weight, at::Tensor(), options_);
  ShardGroup* group = options_.group.get();
  const at::Tensor whole =
      options_.sequence_parallel ? group->gatherFromSequence(x, x.dim() - 2) : group->copyToShards(x);
  return applyLinear(whole, weight, at::Tensor(), options_);  // (..., rows_r)
}

void EmbeddingImpl::setWeightGradStore(std::shared_ptr<WeightGradStore> store) {
  options_.weight_grad = store ? WeightGrad::kDeferred : WeightGrad::kWithInput;
  options_.weight_grad_store = std::move(store);
}

const ParameterLayout* EmbeddingImpl::parameterLayout(const std::string& local_name) const {
  return local_name == "weight" ? &weight_layout_ : nullptr;
}

}  // namespace tessera::models
