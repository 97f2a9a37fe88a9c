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
// Vocabulary-parallel (Sharding::kVocabulary over p ranks, Megatron-LM's
// VocabParallelEmbedding): rank r holds the rows vocabRange() =
// shardRange(num_embeddings, p, r) (the vocabulary padded to a multiple of p
// as Megatron pads it; the padding rows are never stored, so checkpoints and
// export see the unpadded table). forward masks ids outside the range to a
// zero row and sums the partial lookups over the group (reduceFromShards; or,
// with sequence parallelism, reduce-scatters them along the sequence).
// attend returns this rank's vocabulary columns of the logits, (..., rows_r):
// the input enters through copyToShards (or gatherFromSequence), and the
// vocab-parallel cross-entropy (vocab_parallel_loss.h) consumes them, so the
// full logits never exist on one rank. Collective over the group.
//
// A whole table with a group and sequence_parallel (the position table) is
// replicated but looked up for this rank's sequence shard: its gradient is
// summed over the group.
//
// Initial values: construction draws N(0, 1) from torch's global generator,
// as torch::nn::Embedding does; models overwrite it with init.h's
// layout-independent init.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
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

  // Switches a whole table to `options` (vocabulary sharding, or a replicated
  // table on sequence shards), keeping this rank's rows of the current values
  // in place (set_data). Throws InvalidArgument when already sharded, for
  // options LayerOptions::validate rejects, or a rank that would get no row.
  void shard(LayerOptions options);
  // The rows this rank holds: {0, num_embeddings} for a whole table.
  ShardRange vocabRange() const;

  // The table as an output layer: x (..., dim) -> x W^T (..., num_embeddings),
  // through applyLinear (the same GEMM, precision and deferred weight gradient
  // as Linear: with WeightGrad::kDeferred, attend's dW waits in the store
  // while the lookup's gradient (forward) still arrives in B -- a tied table
  // receives two gradient deliveries per micro-batch).
  at::Tensor attend(const at::Tensor& x);

  // Local: a non-null store defers attend's weight gradient into it
  // (WeightGrad::kDeferred); null restores kWithInput. The lookup is not a
  // GEMM and is never deferred. Call between steps.
  void setWeightGradStore(std::shared_ptr<WeightGradStore> store);

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
