// Decoder-only GPT: attention, blocks, the model and its deterministic init.
#include "tessera/core/models/gpt.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "tessera/core/config.h"

namespace tessera::models {

void GptConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(vocab_size >= 1, prefix + "vocab_size", "must be >= 1, got " << vocab_size);
  TESSERA_CHECK_CONFIG(block_size >= 1, prefix + "block_size", "must be >= 1, got " << block_size);
  TESSERA_CHECK_CONFIG(n_layer >= 1, prefix + "n_layer", "must be >= 1, got " << n_layer);
  TESSERA_CHECK_CONFIG(n_head >= 1, prefix + "n_head", "must be >= 1, got " << n_head);
  TESSERA_CHECK_CONFIG(d_model >= 1, prefix + "d_model", "must be >= 1, got " << d_model);
  TESSERA_CHECK_CONFIG(d_model % n_head == 0, prefix + "d_model",
                       "must be divisible by n_head (" << n_head << "), got " << d_model);
  TESSERA_CHECK_CONFIG(mlp_ratio >= 1, prefix + "mlp_ratio", "must be >= 1, got " << mlp_ratio);
  TESSERA_CHECK_CONFIG(positions == "learned" || positions == "rotary", prefix + "positions",
                       "must be \"learned\" or \"rotary\", got \"" << positions << "\"");
  if (positions == "rotary") {
    TESSERA_CHECK_CONFIG(headDim() % 2 == 0, prefix + "d_model",
                         "rotary positions need an even head dim (d_model / n_head), got " << headDim());
    TESSERA_CHECK_CONFIG(rope_base > 1, prefix + "rope_base", "must be > 1, got " << rope_base);
  }
  TESSERA_CHECK_CONFIG(dropout >= 0 && dropout < 1, prefix + "dropout", "must be in [0, 1), got " << dropout);
  TESSERA_CHECK_CONFIG(init_std > 0, prefix + "init_std", "must be > 0, got " << init_std);
  if (use_moe) moe.validate(prefix + "moe.");
}

// ---- Attention ----------------------------------------------------------------

torch::Tensor applyRotary(const torch::Tensor& x, double base) {
  const int64_t seq_len = x.size(2);
  const int64_t half = x.size(3) / 2;
  const auto opts = x.options().dtype(torch::kFloat);
  // theta_i = base^(-2i/D), angle(t, i) = t * theta_i
  const auto inv_freq = torch::pow(base, torch::arange(0, half, opts) * (-2.0 / static_cast<double>(2 * half)));  // (D/2)
  const auto angle = torch::outer(torch::arange(0, seq_len, opts), inv_freq);  // (T, D/2)
  const auto cos = torch::cat({angle.cos(), angle.cos()}, -1).to(x.scalar_type());  // (T, D)
  const auto sin = torch::cat({angle.sin(), angle.sin()}, -1).to(x.scalar_type());  // (T, D)
  const auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);  // (B, H, T, D)
  return x * cos + rotated * sin;
}

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const GptConfig& config)
    : n_head_(config.n_head),
      rotary_(config.positions == "rotary"),
      rope_base_(config.rope_base),
      dropout_(config.dropout) {
  qkv = register_module("qkv", torch::nn::Linear(config.d_model, 3 * config.d_model));
  proj = register_module("proj", torch::nn::Linear(config.d_model, config.d_model));
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t D = C / n_head_;
  // (B, T, 3C) -> three (B, T, C) -> (B, H, T, D)
  const auto parts = qkv->forward(x).split(C, -1);
  auto q = parts[0].view({B, T, n_head_, D}).transpose(1, 2);  // (B, H, T, D)
  auto k = parts[1].view({B, T, n_head_, D}).transpose(1, 2);  // (B, H, T, D)
  const auto v = parts[2].view({B, T, n_head_, D}).transpose(1, 2);  // (B, H, T, D)
  if (rotary_) {
    q = applyRotary(q, rope_base_);
    k = applyRotary(k, rope_base_);
  }
  auto att = q.matmul(k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(D)));  // (B, H, T, T)
  const auto future = torch::ones({T, T}, x.options().dtype(torch::kBool)).triu(1);        // (T, T)
  att = torch::softmax(att.masked_fill(future, -std::numeric_limits<double>::infinity()), -1);
  if (dropout_ > 0) att = torch::dropout(att, dropout_, is_training());
  const auto y = att.matmul(v).transpose(1, 2).contiguous().view({B, T, C});  // (B, H, T, D) -> (B, T, C)
  return proj->forward(y);                                                  // (B, T, C)
}

// ---- Block ------------------------------------------------------------------

BlockImpl::BlockImpl(const GptConfig& config) : dropout_(config.dropout) {
  const int64_t C = config.d_model;
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({C})));
  attn = register_module("attn", CausalSelfAttention(config));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({C})));
  if (config.use_moe) {
    moe = register_module("moe", MoeFeedForward(C, config.mlp_ratio * C, config.moe));
  } else {
    mlp = register_module("mlp", FeedForward(C, config.mlp_ratio * C));
  }
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, torch::Tensor* aux_loss) {
  auto branch = attn->forward(ln1->forward(x));  // (B, T, C)
  if (dropout_ > 0) branch = torch::dropout(branch, dropout_, is_training());
  auto h = x + branch;                            // (B, T, C)
  if (moe) {
    torch::Tensor layer_aux;
    branch = moe->forward(ln2->forward(h), &layer_aux);
    if (aux_loss != nullptr) *aux_loss = aux_loss->defined() ? *aux_loss + layer_aux : layer_aux;
  } else {
    branch = mlp->forward(ln2->forward(h));
  }
  if (dropout_ > 0) branch = torch::dropout(branch, dropout_, is_training());
  return h + branch;  // (B, T, C)
}

// ---- Model ------------------------------------------------------------------

GptImpl::GptImpl(const GptConfig& config) : config_(config) {
  config_.validate();
  wte = register_module("wte", torch::nn::Embedding(config_.vocab_size, config_.d_model));
  if (config_.positions == "learned") {
    wpe = register_module("wpe", torch::nn::Embedding(config_.block_size, config_.d_model));
  }
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < config_.n_layer; ++i) blocks->push_back(Block(config_));
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config_.d_model})));
  if (!config_.tie_weights) {
    head = register_module(
        "head", torch::nn::Linear(torch::nn::LinearOptions(config_.d_model, config_.vocab_size).bias(false)));
  }
  initParameters();
}

void GptImpl::initParameters() {
  // torch::nn's constructors drew from torch's global generator; overwrite
  // everything from our own, in named_parameters() order, which is the fixed
  // registration order -- so the result depends on the seed alone.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(config_.seed);
  const double residual_std = config_.init_std / std::sqrt(2.0 * static_cast<double>(config_.n_layer));
  auto endsWith = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  torch::NoGradGuard no_grad;
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    auto& p = item.value();
    const bool is_norm = name.rfind("ln", 0) == 0 || name.find(".ln") != std::string::npos;
    if (is_norm) {
      endsWith(name, ".weight") ? p.fill_(1.0) : p.zero_();
    } else if (endsWith(name, ".bias")) {
      p.zero_();
    } else {
      // GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), because each
      // block adds two of them to the residual stream.
      const double std = endsWith(name, "proj.weight") ? residual_std : config_.init_std;
      p.normal_(0.0, std, generator);
    }
  }
}

GptOutput GptImpl::forwardWithAux(const torch::Tensor& idx) {
  TESSERA_CHECK_ARG(idx.dim() == 2 && idx.scalar_type() == torch::kLong,
                    "Gpt::forward wants (B, T) int64 token ids, got " << idx.sizes() << " " << idx.scalar_type());
  const int64_t T = idx.size(1);
  TESSERA_CHECK_ARG(T <= config_.block_size, "sequence length " << T << " exceeds block_size " << config_.block_size);
  auto x = wte->forward(idx);  // (B, T, C)
  if (wpe) x = x + wpe->forward(torch::arange(T, idx.options()));  // (B, T, C) + (T, C)
  if (config_.dropout > 0) x = torch::dropout(x, config_.dropout, is_training());
  GptOutput out;
  for (size_t i = 0; i < blocks->size(); ++i) {  // (B, T, C) -> (B, T, C)
    x = block_runner_ ? block_runner_(static_cast<int64_t>(i), x)
                      : blocks[i]->as<BlockImpl>()->forward(x, &out.aux_loss);
  }
  x = ln_f->forward(x);  // (B, T, C)
  out.logits = head ? head->forward(x) : torch::linear(x, wte->weight);  // (B, T, V)
  if (!out.aux_loss.defined()) out.aux_loss = torch::zeros({}, out.logits.options().dtype(torch::kFloat));
  return out;
}

torch::Tensor GptImpl::forward(const torch::Tensor& idx) { return forwardWithAux(idx).logits; }

torch::Tensor GptImpl::loss(const torch::Tensor& idx, const torch::Tensor& targets) {
  TESSERA_CHECK_ARG(targets.sizes() == idx.sizes(),
                    "targets " << targets.sizes() << " must have the shape of idx " << idx.sizes());
  const auto out = forwardWithAux(idx);
  const auto ce = torch::cross_entropy_loss(out.logits.reshape({-1, config_.vocab_size}),  // (B*T, V)
                                            targets.reshape({-1}));                     // (B*T)
  if (!config_.use_moe) return ce;
  return ce + config_.moe.aux_loss_weight * out.aux_loss;
}

}  // namespace tessera::models
