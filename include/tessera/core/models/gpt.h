// A decoder-only GPT (GPT-2 layout, pre-norm) written against torch::nn.
//
// Attention is plain tensor ops -- matmul, masked_fill with a causal mask,
// softmax -- because libtorch 1.13 has no fused attention. Every GEMM goes
// through tessera's Linear / Embedding (linear.h, embedding.h), whose modes
// (sharding, deferred weight gradient, precision) later issues fill in.
//
// Randomness does not depend on layout (random.h, init.h): a parameter's
// initial values are a function of (GptConfig::seed, its name, its logical
// shape), and a dropout mask element of (seed, step, micro-batch, dropout
// site, the element's global index). So every process -- a data-parallel
// rank, a tensor-parallel shard, FSDP recomputing a block -- gets the values
// of one process without broadcasting or saving generator state.
//
// Dropout sites (their fixed ids, gptDropoutSite): the embedding output, and
// per block the attention probabilities, the attention branch and the
// feed-forward branch.
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
// Tensor parallelism is a mode of the layers (applyTensorParallel, called by
// parallel/tensor_parallel.h); the names and logical shapes above do not
// change under it. A pipeline stage builds a part of the model (GptPart,
// gpt_part.h) under the same names, and runs it piece by piece: embed,
// runBlocks, logits, lossFromLogits -- the pieces forwardWithAux and loss are
// made of. Not here: the other parallelisms and mixed precision
// (wrappers in parallel/ apply them from outside, through the layers' modes
// and the block runner), KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "tessera/core/models/embedding.h"
#include "tessera/core/models/gpt_part.h"
#include "tessera/core/models/layer_norm.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/moe.h"
#include "tessera/core/models/random.h"

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
  double dropout = 0.0;            // dropout on the embedding output, attention weights and residual
                                   // branches, in [0, 1)
  double init_std = 0.02;          // std of the normal init (GPT-2: 0.02); residual projections get
                                   // init_std / sqrt(2 * n_layer)
  uint64_t seed = 1234;            // seeds the parameter init and the dropout masks (same seed =>
                                   // identical parameters)
  bool use_moe = false;            // replace every block's MLP with a mixture of experts
  MoeConfig moe;                   // MoE settings, used when use_moe

  // Throws ConfigError naming the field ("model.n_head") and the accepted values.
  void validate(const std::string& prefix = "model.") const;
  // Whether tensor parallelism over `tp` ranks (named `axis` in messages,
  // "parallel.tp") can split this model: n_head divisible by tp, a vocabulary
  // whose padded split leaves every rank a row (MoE experts split as the
  // MLP is: TED). Throws ConfigError naming the field and both numbers. The one check,
  // used by GptImpl::applyTensorParallel and tessera-train's config alike.
  void validateTensorParallel(int64_t tp, const std::string& prefix = "model.",
                              const std::string& axis = "parallel.tp") const;

  int64_t headDim() const { return d_model / n_head; }
};

// Every parameter name of the WHOLE model for `config` (what a checkpoint of
// it holds, tied tensors once under their first name) with its logical shape,
// computed from the config alone (no module is built). Validates config
// (ConfigError).
std::map<std::string, std::vector<int64_t>> gptParameterShapes(const GptConfig& config);

// Where a dropout sits in the GPT.
enum class GptDropout { kEmbedding, kAttentionProbs, kAttentionBranch, kFeedForwardBranch };

// The fixed site id of a dropout: 0 for the embedding, 1 + 3 * block + k for
// the block's k-th site (probs, attention branch, feed-forward branch). `block`
// is the global block index, the same in every pipeline stage.
uint64_t gptDropoutSite(GptDropout where, int64_t block = 0);

// Causal multi-head self-attention over (B, T, C).
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  // `block`: the global index of the block it belongs to (names its dropout site).
  explicit CausalSelfAttentionImpl(const GptConfig& config, int64_t block = 0);

  // x: (B, T, C) -> (B, T, C). Position t attends to positions <= t only.
  torch::Tensor forward(const torch::Tensor& x);

  // The forward whose dropout masks the next forwards draw (see GptImpl::setRandomKey).
  void setRandomKey(int64_t step, int64_t microBatch);

  Linear qkv{nullptr};   // C -> 3C
  Linear proj{nullptr};  // C -> C (a residual projection)

 private:
  int64_t n_head_;
  int64_t head_dim_;
  bool rotary_;
  double rope_base_;
  double dropout_;
  DropoutKey probs_key_;  // attention probabilities (B, H, T, T)
};
TORCH_MODULE(CausalSelfAttention);

// Rotates q or k by position (RoPE, Su et al. arXiv 2104.09864, eq. 34), in
// the "rotate half" layout: dimension i pairs with i + D/2.
// x: (B, H, T, D), D even -> (B, H, T, D).
torch::Tensor applyRotary(const torch::Tensor& x, double base);

// Dropout of a (B, T, C) activation that may be this rank's sequence shard:
// with `sequence` (the group the sequence is split over, sequence
// parallelism) x is rank r's part of dim 1 and gets that part of the whole
// tensor's mask; without, dropout(x, p, training, key).
torch::Tensor sequenceDropout(const torch::Tensor& x, double p, bool training, const DropoutKey& key,
                              ShardGroup* sequence);

// What a block returns.
struct BlockOutput {
  torch::Tensor x;    // (B, T, C)
  torch::Tensor aux;  // () fp32 MoE load-balancing loss of the block; undefined for dense blocks
};

// One pre-norm block: x + attn(ln1(x)), then + ffn(ln2(x)).
class BlockImpl : public torch::nn::Module {
 public:
  // `index`: the block's global index (names its dropout sites).
  explicit BlockImpl(const GptConfig& config, int64_t index = 0);

  // x: (B, T, C) -> the block's output and, with MoE, its aux loss.
  BlockOutput forwardWithAux(const torch::Tensor& x);
  // x: (B, T, C) -> (B, T, C); drops the aux loss.
  torch::Tensor forward(const torch::Tensor& x) { return forwardWithAux(x).x; }

  // The forward whose dropout masks the next forwards draw (see GptImpl::setRandomKey).
  void setRandomKey(int64_t step, int64_t microBatch);

  // Megatron-LM's split of the block over `group` (see GptImpl::applyTensorParallel).
  void applyTensorParallel(const std::shared_ptr<ShardGroup>& group, bool sequenceParallel);

  LayerNorm ln1{nullptr};
  CausalSelfAttention attn{nullptr};
  LayerNorm ln2{nullptr};
  FeedForward mlp{nullptr};      // set when !use_moe
  MoeFeedForward moe{nullptr};   // set when use_moe

 private:
  torch::Tensor residualDropout(const torch::Tensor& x, const DropoutKey& key);

  double dropout_;
  std::shared_ptr<ShardGroup> sequence_group_;  // set under sequence parallelism
  DropoutKey attn_key_;  // the attention branch (B, T, C)
  DropoutKey ffn_key_;   // the feed-forward branch (B, T, C)
};
TORCH_MODULE(Block);

// The blocks one GPT part holds, each registered under its GLOBAL index (so
// a part holding blocks 4 and 5 has parameters "4.ln1.weight", …, and the
// model's "blocks.4.ln1.weight"). Positions 0 … size()-1 run in ascending
// global order.
class BlockListImpl : public torch::nn::Module {
 public:
  // Appends `block` as global block `globalIndex`, which must exceed every
  // index pushed before (InvalidArgument otherwise).
  void push(int64_t globalIndex, Block block);
  size_t size() const { return blocks_.size(); }
  // The block at `position` in [0, size()) (InvalidArgument otherwise).
  BlockImpl& at(size_t position) const;
  int64_t globalIndex(size_t position) const;
  bool contains(int64_t globalIndex) const;
  // The position of global block `globalIndex`; InvalidArgument naming the
  // held blocks when this list does not hold it.
  size_t positionOf(int64_t globalIndex) const;
  // The global indices held, ascending.
  const std::vector<int64_t>& globalIndices() const { return indices_; }

 private:
  std::vector<Block> blocks_;
  std::vector<int64_t> indices_;
};
TORCH_MODULE(BlockList);

// Logits plus the summed MoE load-balancing loss (a zero scalar without MoE).
// Under tensor parallelism the logits are this rank's vocabulary columns
// [vocab_begin, vocab_begin + V_r): the full (B, T, V) never exists.
struct GptOutput {
  torch::Tensor logits;    // (B, T, V), or (B, T, V_r) under tensor parallelism
  torch::Tensor aux_loss;  // ()
  int64_t vocab_begin = 0;
};

class GptImpl : public torch::nn::Module {
 public:
  // Validates config (throws ConfigError) and `part` (InvalidArgument: block
  // indices not ascending or outside [0, n_layer), a part holding nothing),
  // registers only the held parts under the whole model's names, and
  // initializes from config.seed: normal(0, init_std) weights,
  // init_std / sqrt(2 * n_layer) for residual projections (*proj.weight;
  // n_layer of the whole model), LayerNorm weight 1 and bias 0, biases 0, each
  // parameter drawn by init.h from (seed, its name, its logical shape) -- so
  // a part's values are the whole model's.
  explicit GptImpl(const GptConfig& config, GptPart part = GptPart::whole());

  // idx: (B, T) int64 token ids, T <= block_size -> logits (B, T, V). Under
  // tensor parallelism collective: the vocabulary shards are gathered (for
  // generation and tests; training uses loss(), which never gathers them).
  // Needs the whole model (InvalidArgument on a part).
  torch::Tensor forward(const torch::Tensor& idx);
  // The logits as this rank computes them (see GptOutput): embed, runBlocks
  // over every block, logits. Needs the whole model (InvalidArgument on a part).
  GptOutput forwardWithAux(const torch::Tensor& idx);

  // Mean cross-entropy of next-token prediction, plus moe.aux_loss_weight *
  // aux loss when use_moe. idx, targets: (B, T) int64 -> (). Under tensor
  // parallelism the vocab-parallel cross-entropy (vocab_parallel_loss.h), the
  // same value on every tp rank. forwardWithAux + lossFromLogits.
  torch::Tensor loss(const torch::Tensor& idx, const torch::Tensor& targets);

  // ---- The pieces of forwardWithAux, for pipeline chunks ----
  // Each is what forwardWithAux does at that point, so a whole model run
  // piece by piece computes exactly what forwardWithAux computes. Under
  // tensor parallelism each is collective over the tp group as the layers are.

  // idx: (B, T) int64 -> (B, T_r, C): token embedding + learned positions +
  // embedding dropout; T_r = T / tp with sequence parallelism (this rank's
  // sequence shard), else T. Needs part().embedding (InvalidArgument).
  torch::Tensor embed(const torch::Tensor& idx);
  // x: (B, T_r, C) through the HELD blocks whose global index is in
  // [begin, end), in ascending order, each through the block runner (its
  // index argument the global block index). Blocks in the range that this
  // part does not hold are skipped. aux: the summed MoE aux losses, undefined
  // when no block returned one. InvalidArgument for begin > end.
  BlockOutput runBlocks(torch::Tensor x, int64_t begin, int64_t end);
  // x: (B, T_r, C) -> ln_f, then the head (or, tied, wte->attend): this
  // rank's logits (B, T, V), or (B, T, V_r) under tensor parallelism, with
  // vocab_begin; aux_loss a zero scalar (the caller adds the blocks' aux).
  // Needs part().head (InvalidArgument).
  GptOutput logits(const torch::Tensor& x);
  // The mean cross-entropy of out.logits against targets (B, T) int64
  // (vocab-parallel under tensor parallelism: collective over the tp group),
  // plus moe.aux_loss_weight * out.aux_loss when use_moe. -> () fp32.
  torch::Tensor lossFromLogits(const GptOutput& out, const torch::Tensor& targets);

  // What this module holds (the constructor's argument).
  const GptPart& part() const { return part_; }
  // Whether it holds the embedding, every block and the head.
  bool holdsWholeModel() const;
  // A tied model's part with the head but not the embedding: it holds its own
  // copy of wte ("wte.weight", the same values), whose gradient the pipeline
  // must sum with the first stage's (Megatron's embedding group) and which a
  // checkpoint stores once under "wte.weight".
  bool holdsTiedCopy() const { return config_.tie_weights && part_.head && !part_.embedding; }

  // Splits the built model over `group` (tensor parallelism, REFERENCE.md §9,
  // Megatron-LM): wte vocabulary-parallel (and the tied head with it, or the
  // untied head column-parallel over the vocabulary); per block qkv
  // column-parallel by whole heads (fused [q; k; v]), attn.proj row-parallel,
  // mlp.fc column-, mlp.proj row-parallel; LayerNorms and wpe replicated.
  // With `sequenceParallel` the activations between TP blocks (embedding
  // output, LayerNorm, dropout, residual stream) are split along the
  // sequence, which must then divide by the group size. Each rank keeps its
  // slice of the current values in place; parameter names do not change and
  // every parameter declares its slice of the logical tensor. Call once, on
  // every rank of the group, before any wrapper or optimizer sees the model.
  // MoE blocks: each expert's fc column-, proj row-parallel (TED), the
  // router whole; under sequence parallelism the MoE layer sees the gathered
  // sequence (BlockImpl::forwardWithAux). Throws ConfigError naming the key
  // for a model the group cannot split: model.n_head not divisible by the
  // group size, or a vocabulary too small for it.
  void applyTensorParallel(std::shared_ptr<ShardGroup> group, bool sequenceParallel);
  // The group the model is split over; null when whole.
  const std::shared_ptr<ShardGroup>& tensorParallelGroup() const { return tp_group_; }
  bool sequenceParallel() const { return sequence_parallel_; }

  const GptConfig& config() const { return config_; }

  // Which forward the next forwards are (the dropout masks they draw): the
  // training loop calls it before each micro-batch's forward; FSDP's
  // recomputation in backward then draws the same masks. microBatch must
  // differ across the micro-batches data-parallel ranks run in one step (see
  // DropoutKey). Both in [0, 2^32), else InvalidArgument. Unset: (0, 0).
  void setRandomKey(int64_t step, int64_t microBatch);

  // Runs global block `index` on x (B, T, C) in place of calling the block
  // directly; lets a wrapper (FSDP) gather the block's parameters around it.
  // `index` is the GLOBAL block index (blocks->positionOf(index) is its
  // position in this part). Empty (the default) calls the block's
  // forwardWithAux itself. The aux losses the runner returns are summed into
  // GptOutput::aux_loss either way.
  using BlockRunner = std::function<BlockOutput(int64_t index, const torch::Tensor& x)>;
  void setBlockRunner(BlockRunner runner) { block_runner_ = std::move(runner); }

  Embedding wte{nullptr};    // null on a part with neither the embedding nor a tied copy
  Embedding wpe{nullptr};    // null with rotary positions, or without the embedding
  BlockList blocks{nullptr}; // the held blocks, named by global index (empty on a part without blocks)
  LayerNorm ln_f{nullptr};   // null without the head
  Linear head{nullptr};      // null when tie_weights (the logits are wte->attend(x)) or without the head

 private:
  void initParameters();

  GptConfig config_;
  GptPart part_;
  BlockRunner block_runner_;
  std::shared_ptr<ShardGroup> tp_group_;
  bool sequence_parallel_ = false;
  DropoutKey embedding_key_;  // the embedding output (B, T, C)
};
TORCH_MODULE(Gpt);

}  // namespace tessera::models
