// The feed-forward layers of a transformer block: the dense MLP and the
// mixture-of-experts layer that can replace it (REFERENCE.md §7, after
// DeepSpeed-MoE arXiv 2201.05596).
//
// The forward is four separate steps -- route, dispatch, experts, combine --
// and the routing math (route) is the same in every layout. Expert
// parallelism (parallel/expert_parallel.h) plugs in at two seams without
// touching it:
//   - an ExpertExchange between dispatch and the experts and back (the
//     all-to-alls over the ep axis), set by setExpertExchange;
//   - keepExperts, which drops the experts another rank holds, so the layer
//     runs only its own experts on every rank's tokens for them.
// FSDP adds a third (setExpertRunner: the local experts run as their own
// unit). This file deliberately does not communicate: the exchange and any
// ShardGroup of the experts' Linears (TED) are interfaces implemented in
// parallel/.
//
// Parameter names (relative to the layer):
//   FeedForward:    fc.weight, fc.bias, proj.weight, proj.bias
//   MoeFeedForward: router.weight, experts.<e>.fc.weight, ... (each expert is
//                   a FeedForward; <e> is the GLOBAL expert index, also on a
//                   rank that holds only some experts)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
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

// The experts one MoE layer holds, each registered under its GLOBAL index
// (a rank holding experts 2 and 3 has parameters "2.fc.weight", ..., so the
// model's "blocks.0.moe.experts.2.fc.weight"). Positions 0 ... size()-1 run in
// ascending global order.
class ExpertListImpl : public torch::nn::Module {
 public:
  // Appends `expert` as global expert `globalIndex`, which must exceed every
  // index pushed before (InvalidArgument otherwise).
  void push(int64_t globalIndex, FeedForward expert);
  size_t size() const { return experts_.size(); }
  // The expert at `position` in [0, size()) (InvalidArgument otherwise).
  FeedForwardImpl& at(size_t position) const;
  const std::shared_ptr<FeedForwardImpl>& ptr(size_t position) const;
  int64_t globalIndex(size_t position) const;
  const std::vector<int64_t>& globalIndices() const { return indices_; }

 private:
  std::vector<FeedForward> experts_;
  std::vector<int64_t> indices_;
};
TORCH_MODULE(ExpertList);

// Moves the dispatched tokens to the experts that hold them and the
// experts' outputs back (expert parallelism; parallel/expert_parallel.h
// implements it over the mesh's ep axis). Both methods are collective over
// the implementation's group and differentiable: each one's backward is the
// other's communication pattern.
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  // (E, C, M) this rank's dispatched buffer -> (E_local, N, M): every rank's
  // slots for the E_local experts this rank holds (N = the ranks' slots).
  virtual at::Tensor toExperts(const at::Tensor& buffer) = 0;
  // (E_local, N, M) the local experts' outputs -> (E, C, M): this rank's
  // slots, back from every rank. Inverse of toExperts' layout.
  virtual at::Tensor fromExperts(const at::Tensor& expert_out) = 0;
};

// Routing counters of one MoE layer (training forwards only: a forward in
// eval mode counts nothing). FSDP's recomputation routes a forward twice;
// both ratios below are unchanged by that.
struct MoeLoad {
  int64_t choices = 0;          // token choices made (S * k per forward)
  int64_t dropped = 0;          // of those, beyond their expert's capacity
  int64_t capacity = 0;         // C summed over the forwards
  std::vector<int64_t> routed;  // per expert (global index): choices routed to it, kept or dropped

  // dropped / choices (0 when nothing was counted).
  double droppedFraction() const;
  // Expert e's load: routed[e] / capacity (1.0 = exactly full on average).
  std::vector<double> load() const;
  MoeLoad& operator+=(const MoeLoad& other);
};

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
  // (E_local, N, M) -> (E_local, N, M): the expert at position i of
  // `experts` applied to buffer[i] (in one process E_local = E and N = C).
  // Empty slots hold zeros; their outputs (the experts' biases) are never
  // read by combine.
  torch::Tensor runExperts(const torch::Tensor& buffer);
  // (E, C, M) -> (S, M): sum over a token's kept choices of weight * expert output.
  static torch::Tensor combine(const torch::Tensor& expert_out, const MoeRouting& routing);

  const MoeConfig& config() const { return config_; }

  // ---- Expert parallelism's seams (see the file comment) ----
  // Keeps experts [begin, end) (global indices) and drops the others: their
  // parameters leave the module. Local; call before any wrapper or optimizer
  // sees the model. InvalidArgument for a range outside [0, E) or a layer
  // that already dropped experts.
  void keepExperts(int64_t begin, int64_t end);
  // The exchange between dispatch and the local experts; null (the default)
  // runs every expert here.
  void setExpertExchange(std::shared_ptr<ExpertExchange> exchange) { exchange_ = std::move(exchange); }
  const std::shared_ptr<ExpertExchange>& expertExchange() const { return exchange_; }
  // Runs the local experts in place of runExperts (FSDP's unit of them).
  // Empty restores runExperts.
  using ExpertRunner = std::function<torch::Tensor(const torch::Tensor& buffer)>;
  void setExpertRunner(ExpertRunner runner) { runner_ = std::move(runner); }

  // The routing counters since the last call, then reset. Local.
  MoeLoad takeLoad();

  Linear router{nullptr};        // d_model -> E, no bias, Precision::kFp32
  ExpertList experts{nullptr};   // the held experts (all E unless keepExperts)

 private:
  void countLoad(const MoeRouting& routing);

  MoeConfig config_;
  std::shared_ptr<ExpertExchange> exchange_;
  ExpertRunner runner_;
  torch::Tensor load_;  // (E + 3) int64: routed per expert, choices, dropped, capacity; undefined until counted
};
TORCH_MODULE(MoeFeedForward);

}  // namespace tessera::models
