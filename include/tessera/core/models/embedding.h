// tessera's embedding: a (num_embeddings, dim) table looked up by id, and its
// transpose used as an output layer (attend: the GPT's tied head). Owning both
// directions here is what lets a vocabulary-parallel table (issue 14) serve
// the tied head from the same shard: attend's logits are then sharded along
// the vocabulary, as the vocab-parallel cross-entropy wants.
//
// Parameter (relative to the layer): weight (num_embeddings, dim). The layer
// declares its logical shape and slice (DeclaresParameterLayout); a plain
// table holds the whole tensor.
//
// Initial values: construction draws N(0, 1) from torch's global generator,
// as torch::nn::Embedding does; models overwrite it with init.h's
// layout-independent init.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/layer_options.h"
#include "tessera/core/models/logical_parameters.h"

namespace tessera::models {

class EmbeddingImpl : public torch::nn::Module, public DeclaresParameterLayout {
 public:
  // Throws InvalidArgument for non-positive sizes, and what
  // LayerOptions::validate throws for a mode this build lacks.
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, LayerOptions options = {});

  // ids: (...) int64 in [0, num_embeddings) -> (..., dim).
  at::Tensor forward(const at::Tensor& ids);

  // The table as an output layer: x (..., dim) -> x W^T (..., num_embeddings),
  // through applyLinear (the same GEMM and precision as Linear).
  at::Tensor attend(const at::Tensor& x);

  const ParameterLayout* parameterLayout(const std::string& local_name) const override;
  const LayerOptions& options() const { return options_; }
  int64_t numEmbeddings() const { return num_embeddings_; }
  int64_t dim() const { return dim_; }

  at::Tensor weight;  // (num_embeddings, dim)

 private:
  int64_t num_embeddings_;
  int64_t dim_;
  LayerOptions options_;
  ParameterLayout weight_layout_;
};
TORCH_MODULE(Embedding);

}  // namespace tessera::models
