// tessera's Embedding: the plain (whole-table) implementation.
#include "tessera/core/models/embedding.h"

#include <ATen/ATen.h>

#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/models/linear.h"

namespace tessera::models {

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim, LayerOptions options)
    : num_embeddings_(num_embeddings), dim_(dim), options_(std::move(options)) {
  TESSERA_CHECK_ARG(num_embeddings >= 1 && dim >= 1,
                    "Embedding needs num_embeddings and dim >= 1, got " << num_embeddings << " and " << dim);
  options_.validate("Embedding(" + std::to_string(num_embeddings) + ", " + std::to_string(dim) + ")",
                    /*embedding=*/true);
  weight = register_parameter("weight", at::randn({num_embeddings, dim}));  // torch::nn::Embedding's N(0, 1)
  weight_layout_ = {{num_embeddings, dim}, TensorSlice::whole({num_embeddings, dim})};
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  TESSERA_CHECK_ARG(ids.scalar_type() == at::kLong,
                    "Embedding wants int64 ids, got " << ids.scalar_type() << " " << ids.sizes());
  return at::embedding(weight, ids);  // (..., dim)
}

at::Tensor EmbeddingImpl::attend(const at::Tensor& x) {
  TESSERA_CHECK_ARG(x.dim() >= 1 && x.size(-1) == dim_,
                    "Embedding::attend wants (..., " << dim_ << ") inputs, got " << x.sizes());
  return applyLinear(x, weight, at::Tensor(), options_);  // (..., num_embeddings)
}

const ParameterLayout* EmbeddingImpl::parameterLayout(const std::string& local_name) const {
  return local_name == "weight" ? &weight_layout_ : nullptr;
}

}  // namespace tessera::models
