// The dense MLP and the mixture-of-experts feed-forward (REFERENCE.md §7).
#include "tessera/core/models/moe.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "tessera/core/config.h"

namespace tessera::models {

void MoeConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(num_experts >= 1, prefix + "num_experts", "must be >= 1, got " << num_experts);
  TESSERA_CHECK_CONFIG(top_k == 1 || top_k == 2, prefix + "top_k", "must be 1 or 2, got " << top_k);
  TESSERA_CHECK_CONFIG(top_k <= num_experts, prefix + "top_k",
                       "must be <= num_experts (" << num_experts << "), got " << top_k);
  TESSERA_CHECK_CONFIG(capacity_factor > 0, prefix + "capacity_factor",
                       "must be > 0, got " << capacity_factor);
  TESSERA_CHECK_CONFIG(aux_loss_weight >= 0, prefix + "aux_loss_weight",
                       "must be >= 0, got " << aux_loss_weight);
}

int64_t moeCapacity(int64_t num_tokens, int64_t num_experts, double capacity_factor, int64_t top_k) {
  const double even = static_cast<double>(num_tokens) / static_cast<double>(num_experts);
  const auto capacity = static_cast<int64_t>(std::ceil(even * capacity_factor * static_cast<double>(top_k)));
  return std::max<int64_t>(capacity, 4);
}

FeedForwardImpl::FeedForwardImpl(int64_t d_model, int64_t d_hidden) {
  fc = register_module("fc", Linear(d_model, d_hidden));
  proj = register_module("proj", Linear(d_hidden, d_model));
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) {
  return proj->forward(torch::gelu(fc->forward(x)));  // (..., C) -> (..., H) -> (..., C)
}

MoeFeedForwardImpl::MoeFeedForwardImpl(int64_t d_model, int64_t d_hidden, const MoeConfig& config)
    : config_(config) {
  config_.validate();
  // The router runs in fp32 whatever the model's precision: small logit
  // errors flip top-k choices, and flipped choices are not smooth in the loss.
  LayerOptions router_options;
  router_options.precision = Precision::kFp32;
  router = register_module("router", Linear(d_model, config_.num_experts, /*bias=*/false, router_options));
  experts = register_module("experts", ExpertList());
  for (int64_t e = 0; e < config_.num_experts; ++e) experts->push(e, FeedForward(d_model, d_hidden));
}

void ExpertListImpl::push(int64_t globalIndex, FeedForward expert) {
  TESSERA_CHECK_ARG(indices_.empty() || globalIndex > indices_.back(),
                    "ExpertList: expert " << globalIndex << " pushed after expert " << indices_.back()
                                          << " (global indices must ascend)");
  experts_.push_back(register_module(std::to_string(globalIndex), std::move(expert)));
  indices_.push_back(globalIndex);
}

FeedForwardImpl& ExpertListImpl::at(size_t position) const { return *ptr(position); }

const std::shared_ptr<FeedForwardImpl>& ExpertListImpl::ptr(size_t position) const {
  TESSERA_CHECK_ARG(position < experts_.size(),
                    "ExpertList: position " << position << " of " << experts_.size() << " held experts");
  return experts_[position].ptr();
}

int64_t ExpertListImpl::globalIndex(size_t position) const {
  TESSERA_CHECK_ARG(position < indices_.size(),
                    "ExpertList: position " << position << " of " << indices_.size() << " held experts");
  return indices_[position];
}

void MoeFeedForwardImpl::keepExperts(int64_t begin, int64_t end) {
  const int64_t E = config_.num_experts;
  TESSERA_CHECK_ARG(0 <= begin && begin < end && end <= E,
                    "MoE keepExperts: [" << begin << ", " << end << ") is not a non-empty range of [0, " << E << ")");
  TESSERA_CHECK_ARG(static_cast<int64_t>(experts->size()) == E,
                    "MoE keepExperts: the layer already holds only " << experts->size() << " of " << E << " experts");
  ExpertList kept;
  for (int64_t e = begin; e < end; ++e) kept->push(e, FeedForward(experts->ptr(static_cast<size_t>(e))));
  experts = replace_module("experts", kept);
}

double MoeLoad::droppedFraction() const {
  return choices > 0 ? static_cast<double>(dropped) / static_cast<double>(choices) : 0.0;
}

std::vector<double> MoeLoad::load() const {
  std::vector<double> out;
  out.reserve(routed.size());
  for (int64_t r : routed) out.push_back(capacity > 0 ? static_cast<double>(r) / static_cast<double>(capacity) : 0.0);
  return out;
}

MoeLoad& MoeLoad::operator+=(const MoeLoad& other) {
  choices += other.choices;
  dropped += other.dropped;
  capacity += other.capacity;
  if (routed.size() < other.routed.size()) routed.resize(other.routed.size(), 0);
  for (size_t e = 0; e < other.routed.size(); ++e) routed[e] += other.routed[e];
  return *this;
}

void MoeFeedForwardImpl::countLoad(const MoeRouting& routing) {
  // Accumulated as a tensor on the routing's device: no host sync per forward.
  torch::NoGradGuard noGrad;
  const int64_t E = routing.num_experts;
  const auto routed = torch::bincount(routing.expert.reshape({-1}), {}, E);  // (E)
  const auto dropped = (routing.slot < 0).sum().to(torch::kLong).reshape({1});
  const auto counts = torch::cat({routed, torch::full({1}, routing.expert.numel(), routed.options()), dropped,
                                  torch::full({1}, routing.capacity, routed.options())});
  if (load_.defined()) {
    load_.add_(counts);
  } else {
    load_ = counts;
  }
}

MoeLoad MoeFeedForwardImpl::takeLoad() {
  MoeLoad out;
  const int64_t E = config_.num_experts;
  out.routed.assign(static_cast<size_t>(E), 0);
  if (!load_.defined()) return out;
  const auto counts = load_.cpu();
  load_ = torch::Tensor();
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) out.routed[static_cast<size_t>(e)] = c[e];
  out.choices = c[E];
  out.dropped = c[E + 1];
  out.capacity = c[E + 2];
  return out;
}

MoeRouting MoeFeedForwardImpl::route(const torch::Tensor& tokens) {
  const int64_t num_tokens = tokens.size(0);
  const int64_t num_experts = config_.num_experts;
  const int64_t k = config_.top_k;
  MoeRouting routing;
  routing.num_experts = num_experts;
  routing.capacity = moeCapacity(num_tokens, num_experts, config_.capacity_factor, k);

  const auto logits = router->forward(tokens);  // (S, E) fp32 (the router's precision)
  routing.gates = torch::softmax(logits, -1);                                  // (S, E)
  auto [top_gate, top_expert] = routing.gates.topk(k, -1);                     // (S, k), (S, k)
  routing.expert = top_expert;
  if (k == 2) top_gate = top_gate / top_gate.sum(-1, /*keepdim=*/true);        // g_i / (g_1 + g_2)

  // Slot of each choice in its expert's buffer: count earlier choices of the
  // same expert, all first choices before any second choice (DeepSpeed's order),
  // so a token's best expert is the last thing capacity takes away.
  const auto one_hot = torch::one_hot(top_expert, num_experts);                // (S, k, E)
  const auto choice_major = one_hot.transpose(0, 1).reshape({k * num_tokens, num_experts});  // (k*S, E)
  const auto position = ((choice_major.cumsum(0) - 1) * choice_major).sum(-1);  // (k*S)
  const auto slot = position.view({k, num_tokens}).transpose(0, 1);             // (S, k)
  const auto kept = slot < routing.capacity;                                    // (S, k)
  routing.slot = torch::where(kept, slot, torch::full_like(slot, -1));
  routing.weight = top_gate * kept.to(top_gate.scalar_type());

  // Load balancing (Switch / DeepSpeed): E * sum_e(mean gate_e * fraction of
  // tokens whose first choice is e), counted before capacity drops.
  const auto mean_gate = routing.gates.mean(0);                                // (E)
  const auto fraction_routed = one_hot.select(1, 0).to(torch::kFloat).mean(0); // (E)
  routing.aux_loss = static_cast<double>(num_experts) * (mean_gate * fraction_routed).sum();
  return routing;
}

namespace {

// Kept (choice -> buffer row, choice -> token row) pairs, flattened over (S, k).
std::pair<torch::Tensor, torch::Tensor> keptRows(const MoeRouting& routing) {
  const int64_t num_tokens = routing.expert.size(0);
  const int64_t k = routing.expert.size(1);
  const auto kept = routing.slot >= 0;                                                      // (S, k)
  const auto buffer_row = (routing.expert * routing.capacity + routing.slot).masked_select(kept);
  const auto token_row =
      torch::arange(num_tokens, routing.expert.options()).unsqueeze(1).expand({num_tokens, k});  // (S, k)
  return {buffer_row, token_row.masked_select(kept)};                                        // (N), (N)
}

}  // namespace

torch::Tensor MoeFeedForwardImpl::dispatch(const torch::Tensor& tokens, const MoeRouting& routing) {
  const int64_t d_model = tokens.size(1);
  const auto [buffer_row, token_row] = keptRows(routing);
  // Slots are unique, so index_add writes each row once: it is a scatter that autograd knows.
  auto buffer = torch::zeros({routing.num_experts * routing.capacity, d_model}, tokens.options());  // (E*C, M)
  buffer = buffer.index_add(0, buffer_row, tokens.index_select(0, token_row));
  return buffer.view({routing.num_experts, routing.capacity, d_model});                     // (E, C, M)
}

torch::Tensor MoeFeedForwardImpl::runExperts(const torch::Tensor& buffer) {
  TESSERA_CHECK_ARG(buffer.dim() == 3 && buffer.size(0) == static_cast<int64_t>(experts->size()),
                    "MoE runExperts: want (" << experts->size() << " held experts, slots, d_model), got "
                                             << buffer.sizes());
  std::vector<torch::Tensor> outputs;
  outputs.reserve(experts->size());
  for (size_t e = 0; e < experts->size(); ++e) {
    outputs.push_back(experts->at(e).forward(buffer[static_cast<int64_t>(e)]));  // (N, M)
  }
  return torch::stack(outputs);  // (E_local, N, M)
}

torch::Tensor MoeFeedForwardImpl::combine(const torch::Tensor& expert_out, const MoeRouting& routing) {
  const int64_t num_tokens = routing.expert.size(0);
  const int64_t d_model = expert_out.size(2);
  const auto [buffer_row, token_row] = keptRows(routing);
  const auto weight = routing.weight.masked_select(routing.slot >= 0).to(expert_out.scalar_type());  // (N)
  const auto rows = expert_out.reshape({-1, d_model}).index_select(0, buffer_row) * weight.unsqueeze(1);  // (N, M)
  // Dropped choices add nothing: the token's output is zero here and the
  // block's residual carries it through unchanged.
  return torch::zeros({num_tokens, d_model}, expert_out.options()).index_add(0, token_row, rows);  // (S, M)
}

torch::Tensor MoeFeedForwardImpl::forward(const torch::Tensor& x, torch::Tensor* aux_loss) {
  const auto tokens = x.reshape({-1, x.size(-1)});     // (S, M), S = B*T
  const auto routing = route(tokens);
  if (is_training()) countLoad(routing);
  auto buffer = dispatch(tokens, routing);             // (E, C, M)
  if (exchange_) buffer = exchange_->toExperts(buffer);  // (E_local, N, M): every rank's slots for our experts
  auto expert_out = runner_ ? runner_(buffer) : runExperts(buffer);
  if (exchange_) expert_out = exchange_->fromExperts(expert_out);  // (E, C, M): our slots, back
  if (aux_loss != nullptr) *aux_loss = routing.aux_loss;
  return combine(expert_out, routing).view(x.sizes());  // (..., M)
}

}  // namespace tessera::models
