// A decoder-only GPT (GPT-2 layout, pre-norm) written against torch::nn.
//
// Attention is plain tensor ops -- matmul, masked_fill with a causal mask,
// softmax -- because libtorch 1.13 has no fused attention. Initialization is
// deterministic from GptConfig::seed (its own generator, not torch's global
// one), so the same seed gives bit-identical parameters in every process:
// data-parallel ranks need no initial broadcast to agree.
//
// Parameter names are stable, because checkpoints and every parallel wrapper
// key on them:
//   wte.weight                      token embedding (V, C)
//   wpe.weight                      learned positions (block_size, C); absent with rotary
//   blocks.<i>.ln1.{weight,bias}
//   blocks.<i>.attn.qkv.{weight,bias}   (3C, C): rows [q; k; v]
//   blocks.<i>.attn.proj.{weight,bias}
//   blocks.<i>.ln2.{weight,bias}
//   blocks.<i>.mlp.{fc,proj}.{weight,bias}          dense blocks
//   blocks.<i>.moe.router.weight, blocks.<i>.moe.experts.<e>.{fc,proj}.{weight,bias}   MoE blocks
//   ln_f.{weight,bias}
//   head.weight                     (V, C); absent when tie_weights (the head reuses wte.weight)
//
// Not here: parallelism (wrappers apply it from outside), mixed precision, KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/moe.h"

namespace tessera::models {

struct GptConfig {
  int64_t vocab_size = 256;        // V: token ids are in [0, V); 256 for byte-level text
  int64_t block_size = 64;         // T_max: longest sequence forward accepts
  int64_t n_layer = 3;             // number of transformer blocks, >= 1
  int64_t n_head = 4;              // attention heads; must divide d_model
  int64_t d_model = 96;            // C: residual stream width
  int64_t mlp_ratio = 4;           // MLP hidden width = mlp_ratio * d_model
  std::string positions = "learned";  // "learned" (wpe table) or "rotary" (RoPE on q and k)
  double rope_base = 10000.0;      // rotary frequency base theta; used with positions = "rotary"
  bool tie_weights = true;         // head reuses wte.weight (no head.weight parameter)
  double dropout = 0.0;            // dropout on attention weights and residual branches, in [0, 1)
  double init_std = 0.02;          // std of the normal init (GPT-2: 0.02); residual projections get
                                   // init_std / sqrt(2 * n_layer)
  uint64_t seed = 1234;            // seeds the parameter init (same seed => identical parameters)
  bool use_moe = false;            // replace every block's MLP with a mixture of experts
  MoeConfig moe;                   // MoE settings, used when use_moe

  // Throws ConfigError naming the field ("model.n_head") and the accepted values.
  void validate(const std::string& prefix = "model.") const;

  int64_t headDim() const { return d_model / n_head; }
};

// Causal multi-head self-attention over (B, T, C).
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  explicit CausalSelfAttentionImpl(const GptConfig& config);

  // x: (B, T, C) -> (B, T, C). Position t attends to positions <= t only.
  torch::Tensor forward(const torch::Tensor& x);

  torch::nn::Linear qkv{nullptr};   // C -> 3C
  torch::nn::Linear proj{nullptr};  // C -> C (a residual projection)

 private:
  int64_t n_head_;
  bool rotary_;
  double rope_base_;
  double dropout_;
};
TORCH_MODULE(CausalSelfAttention);

// Rotates q or k by position (RoPE, Su et al. arXiv 2104.09864, eq. 34), in
// the "rotate half" layout: dimension i pairs with i + D/2.
// x: (B, H, T, D), D even -> (B, H, T, D).
torch::Tensor applyRotary(const torch::Tensor& x, double base);

// One pre-norm block: x + attn(ln1(x)), then + ffn(ln2(x)).
class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const GptConfig& config);

  // x: (B, T, C) -> (B, T, C). With MoE, the layer's aux loss is added to *aux_loss.
  torch::Tensor forward(const torch::Tensor& x, torch::Tensor* aux_loss = nullptr);

  torch::nn::LayerNorm ln1{nullptr};
  CausalSelfAttention attn{nullptr};
  torch::nn::LayerNorm ln2{nullptr};
  FeedForward mlp{nullptr};      // set when !use_moe
  MoeFeedForward moe{nullptr};   // set when use_moe

 private:
  double dropout_;
};
TORCH_MODULE(Block);

// Logits plus the summed MoE load-balancing loss (a zero scalar without MoE).
struct GptOutput {
  torch::Tensor logits;    // (B, T, V)
  torch::Tensor aux_loss;  // ()
};

class GptImpl : public torch::nn::Module {
 public:
  // Validates config (throws ConfigError) and initializes from config.seed.
  explicit GptImpl(const GptConfig& config);

  // idx: (B, T) int64 token ids, T <= block_size -> logits (B, T, V).
  torch::Tensor forward(const torch::Tensor& idx);
  GptOutput forwardWithAux(const torch::Tensor& idx);

  // Mean cross-entropy of next-token prediction, plus moe.aux_loss_weight *
  // aux loss when use_moe. idx, targets: (B, T) int64 -> ().
  torch::Tensor loss(const torch::Tensor& idx, const torch::Tensor& targets);

  const GptConfig& config() const { return config_; }

  // Runs block `index` on x (B, T, C) -> (B, T, C) in place of calling the
  // block directly; lets a wrapper (FSDP) gather the block's parameters around
  // it. Empty (the default) calls blocks[index] itself. With a runner set,
  // MoE aux losses are not collected (wrappers that set one reject MoE).
  using BlockRunner = std::function<torch::Tensor(int64_t index, const torch::Tensor& x)>;
  void setBlockRunner(BlockRunner runner) { block_runner_ = std::move(runner); }

  torch::nn::Embedding wte{nullptr};
  torch::nn::Embedding wpe{nullptr};   // null with rotary positions
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear head{nullptr};     // null when tie_weights

 private:
  void initParameters();

  GptConfig config_;
  BlockRunner block_runner_;
};
TORCH_MODULE(Gpt);

}  // namespace tessera::models
