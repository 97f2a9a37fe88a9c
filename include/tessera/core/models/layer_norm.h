// tessera's LayerNorm: torch::nn::LayerNorm's math (elementwise affine,
// eps 1e-5) over the last dimension, with the one mode tensor parallelism
// needs: under sequence parallelism (LayerOptions::sequence_parallel with a
// group) each rank normalizes its own sequence shard, so the weight and bias
// gradients it computes are partial sums, and the parameters enter through
// ShardGroup::copyToShards, which sums their gradients over the group in
// backward (Megatron-LM all-reduces these "sequence-parallel" gradients;
// here autograd does it where they arise). Collective then; local otherwise.
//
// Parameters (relative to the layer): weight (dim) initialised to 1, bias
// (dim) to 0 -- the names torch::nn::LayerNorm registers, so checkpoints do
// not change.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/layer_options.h"

namespace tessera::models {

class LayerNormImpl : public torch::nn::Module {
 public:
  // Throws InvalidArgument for dim < 1, eps <= 0, or options a norm cannot have (any sharding).
  explicit LayerNormImpl(int64_t dim, LayerOptions options = {}, double eps = 1e-5);

  // x: (..., dim) -> (..., dim).
  at::Tensor forward(const at::Tensor& x);

  // Sets the mode of a built layer (parallelize() applying sequence
  // parallelism); the parameters are replicated, so nothing is sliced.
  void shard(LayerOptions options);
  const LayerOptions& options() const { return options_; }

  at::Tensor weight;  // (dim)
  at::Tensor bias;    // (dim)

 private:
  int64_t dim_;
  double eps_;
  LayerOptions options_;
};
TORCH_MODULE(LayerNorm);

}  // namespace tessera::models
