// The feed-forward layers of a transformer block: the dense MLP and the
// mixture-of-experts layer that can replace it (REFERENCE.md §7, after
// DeepSpeed-MoE arXiv 2201.05596).
//
// The MoE layer runs in one process here. Its forward is written as four
// separate steps -- route, dispatch, experts, combine -- so that the
// expert-parallel version can put an all-to-all over the EP group between
// dispatch and the experts, and another between the experts and combine,
// without touching the routing math. This file deliberately does not
// communicate and does not shard experts.
//
// Parameter names (relative to the layer):
//   FeedForward:    fc.weight, fc.bias, proj.weight, proj.bias
//   MoeFeedForward: router.weight, experts.<e>.fc.weight, ... (each expert is
//                   a FeedForward; <e> is the global expert index)
#pragma once

#include <cstdint>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/linear.h"

namespace tessera::models {

// Mixture-of-experts settings. Plain struct; validate() throws ConfigError
// naming the field (prefix is prepended: "model.moe_top_k").
struct MoeConfig {
  int64_t num_experts = 4;       // E: experts per MoE layer, >= 1
  int64_t top_k = 1;             // experts each token is sent to: 1 or 2 (and <= E)
  double capacity_factor = 1.25; // slack over an even split: C = ceil(S/E * factor * k), min 4; > 0
  double aux_loss_weight = 0.01; // weight of the load-balancing loss added to the model loss; >= 0

  void validate(const std::string& prefix = "moe.") const;
};

// Tokens an expert accepts per forward: ceil(S/E * capacity_factor * k), at
// least 4 (REFERENCE.md §7). S is the number of tokens in the forward.
int64_t moeCapacity(int64_t num_tokens, int64_t num_experts, double capacity_factor, int64_t top_k);

// Two-layer MLP: x -> GELU(x W_fc^T + b) W_proj^T + b. The dense feed-forward
// of a block, and the body of every expert.
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t d_model, int64_t d_hidden);

  // x: (..., d_model) -> (..., d_model).
  torch::Tensor forward(const torch::Tensor& x);

  Linear fc{nullptr};    // d_model -> d_hidden
  Linear proj{nullptr};  // d_hidden -> d_model (a residual projection)
};
TORCH_MODULE(FeedForward);

// Where each token goes. Produced by MoeFeedForwardImpl::route, consumed by
// dispatch and combine. All tensors live on the device of the input.
struct MoeRouting {
  int64_t num_experts = 0;   // E
  int64_t capacity = 0;      // C: slots per expert
  torch::Tensor gates;       // (S, E) fp32 softmax of the router logits
  torch::Tensor expert;      // (S, k) int64: the chosen experts, best first
  torch::Tensor slot;        // (S, k) int64: position in that expert's buffer, -1 if dropped
  torch::Tensor weight;      // (S, k) fp32: combine weight, 0 where dropped
  torch::Tensor aux_loss;    // () fp32: E * sum_e(mean gate_e * fraction of tokens whose first choice is e)
};

// The MoE feed-forward: fp32 router d -> E with softmax, top-k choice (top-2
// renormalizes g_i / (g_1 + g_2); top-1 keeps the raw gate, as in Switch),
// fixed capacity per expert. A token choice over capacity is dropped: it adds
// nothing to the output, so the token passes through the block's residual
// only. Slots are filled first-choice before second-choice, in token order.
// Because tokens of one forward compete for slots, capacity drops are not
// causal: a token's drop can depend on later tokens of the batch (standard for
// capacity-based MoE; a capacity that no expert fills makes the layer causal).
class MoeFeedForwardImpl : public torch::nn::Module {
 public:
  MoeFeedForwardImpl(int64_t d_model, int64_t d_hidden, const MoeConfig& config);

  // x: (..., d_model) -> (..., d_model). The load-balancing loss of this call
  // is written to *aux_loss when it is not null.
  torch::Tensor forward(const torch::Tensor& x, torch::Tensor* aux_loss = nullptr);

  // The four steps of forward, for the expert-parallel version.
  // tokens: (S, M).
  MoeRouting route(const torch::Tensor& tokens);
  // (S, M) -> (E, C, M): each kept choice copied into its expert's slot, zeros elsewhere.
  static torch::Tensor dispatch(const torch::Tensor& tokens, const MoeRouting& routing);
  // (E, C, M) -> (E, C, M): expert e applied to buffer[e]. Empty slots hold
  // zeros; their outputs (the experts' biases) are never read by combine.
  torch::Tensor runExperts(const torch::Tensor& buffer);
  // (E, C, M) -> (S, M): sum over a token's kept choices of weight * expert output.
  static torch::Tensor combine(const torch::Tensor& expert_out, const MoeRouting& routing);

  const MoeConfig& config() const { return config_; }

  Linear router{nullptr};                  // d_model -> E, no bias, Precision::kFp32
  torch::nn::ModuleList experts{nullptr};  // E FeedForward modules

 private:
  MoeConfig config_;
};
TORCH_MODULE(MoeFeedForward);

}  // namespace tessera::models
