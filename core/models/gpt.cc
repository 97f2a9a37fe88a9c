// Decoder-only GPT: attention, blocks, the model and its layout-independent init.
#include "tessera/core/models/gpt.h"

#include <cmath>
#include <limits>

#include "tessera/core/config.h"
#include "tessera/core/models/init.h"
#include "tessera/core/models/vocab_parallel_loss.h"

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

void GptConfig::validateTensorParallel(int64_t tp, const std::string& prefix, const std::string& axis) const {
  TESSERA_CHECK_ARG(tp >= 1, "validateTensorParallel: tp must be >= 1, got " << tp);
  TESSERA_CHECK_CONFIG(n_head % tp == 0, prefix + "n_head",
                       "tensor parallelism splits attention by whole heads: " << prefix << "n_head (" << n_head
                           << ") must be divisible by " << axis << " (" << tp << ")");
  const int64_t rows = (vocab_size + tp - 1) / tp;  // per rank: the vocabulary padded to a multiple of tp
  TESSERA_CHECK_CONFIG(vocab_size > (tp - 1) * rows, prefix + "vocab_size",
                       prefix << "vocab_size (" << vocab_size << ") padded to a multiple of " << axis << " (" << tp
                              << ") leaves the last rank no row; use a smaller " << axis);
}

uint64_t gptDropoutSite(GptDropout where, int64_t block) {
  if (where == GptDropout::kEmbedding) return 0;
  TESSERA_CHECK_ARG(block >= 0, "gptDropoutSite: block index must be >= 0, got " << block);
  const uint64_t k = where == GptDropout::kAttentionProbs ? 0 : where == GptDropout::kAttentionBranch ? 1 : 2;
  return 1 + 3 * static_cast<uint64_t>(block) + k;
}

namespace {

DropoutKey dropoutKey(const GptConfig& config, GptDropout where, int64_t block) {
  DropoutKey key;
  key.seed = config.seed;
  key.site = gptDropoutSite(where, block);
  return key;
}

}  // namespace

torch::Tensor sequenceDropout(const torch::Tensor& x, double p, bool training, const DropoutKey& key,
                              ShardGroup* sequence) {
  if (sequence == nullptr) return dropout(x, p, training, key);
  // x is rank r's part [r T_r, (r + 1) T_r) of the sequence (dim 1) of a
  // (B, T, C) activation: draw that part of the whole tensor's mask.
  std::vector<int64_t> global = x.sizes().vec();
  const int64_t local = global[1];
  global[1] *= sequence->size();
  std::vector<int64_t> offsets(global.size(), 0);
  offsets[1] = sequence->rank() * local;
  return dropout(x, p, training, key, global, TensorSlice::box(offsets, x.sizes().vec()));
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

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const GptConfig& config, int64_t block)
    : n_head_(config.n_head),
      head_dim_(config.headDim()),
      rotary_(config.positions == "rotary"),
      rope_base_(config.rope_base),
      dropout_(config.dropout),
      probs_key_(dropoutKey(config, GptDropout::kAttentionProbs, block)) {
  qkv = register_module("qkv", Linear(config.d_model, 3 * config.d_model));
  proj = register_module("proj", Linear(config.d_model, config.d_model));
}

void CausalSelfAttentionImpl::setRandomKey(int64_t step, int64_t microBatch) {
  probs_key_.setStep(step, microBatch);
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  // Under tensor parallelism qkv is column-parallel by whole heads (its
  // output is this rank's [q; k; v] heads) and, with sequence parallelism,
  // gathers the sequence; so widths and lengths are read from its output.
  const auto qkv_out = qkv->forward(x);  // (B, T, 3 C_r), C_r = C / tp
  const int64_t B = qkv_out.size(0), T = qkv_out.size(1), C_r = qkv_out.size(2) / 3;
  const int64_t D = head_dim_;
  const int64_t H_r = C_r / D;  // this rank's heads
  // (B, T, 3C_r) -> three (B, T, C_r) -> (B, H_r, T, D)
  const auto parts = qkv_out.split(C_r, -1);
  auto q = parts[0].view({B, T, H_r, D}).transpose(1, 2);  // (B, H_r, T, D)
  auto k = parts[1].view({B, T, H_r, D}).transpose(1, 2);  // (B, H_r, T, D)
  const auto v = parts[2].view({B, T, H_r, D}).transpose(1, 2);  // (B, H_r, T, D)
  if (rotary_) {
    q = applyRotary(q, rope_base_);
    k = applyRotary(k, rope_base_);
  }
  auto att = q.matmul(k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(D)));  // (B, H_r, T, T)
  const auto future = torch::ones({T, T}, x.options().dtype(torch::kBool)).triu(1);        // (T, T)
  att = torch::softmax(att.masked_fill(future, -std::numeric_limits<double>::infinity()), -1);
  // The mask of this rank's heads of the (B, H, T, T) probabilities: the
  // elements one process would draw for them (random.h), whatever tp is.
  const int64_t h0 = qkv->outputRange().begin / D;
  att = dropout(att, dropout_, is_training(), probs_key_, {B, n_head_, T, T},
                TensorSlice::box({0, h0, 0, 0}, {B, H_r, T, T}));                    // (B, H_r, T, T)
  const auto y = att.matmul(v).transpose(1, 2).contiguous().view({B, T, C_r});  // (B, H_r, T, D) -> (B, T, C_r)
  return proj->forward(y);  // row-parallel under tp: (B, T, C), or (B, T/tp, C) with sequence parallelism
}

// ---- Block ------------------------------------------------------------------

BlockImpl::BlockImpl(const GptConfig& config, int64_t index)
    : dropout_(config.dropout),
      attn_key_(dropoutKey(config, GptDropout::kAttentionBranch, index)),
      ffn_key_(dropoutKey(config, GptDropout::kFeedForwardBranch, index)) {
  const int64_t C = config.d_model;
  ln1 = register_module("ln1", LayerNorm(C));
  attn = register_module("attn", CausalSelfAttention(config, index));
  ln2 = register_module("ln2", LayerNorm(C));
  if (config.use_moe) {
    moe = register_module("moe", MoeFeedForward(C, config.mlp_ratio * C, config.moe));
  } else {
    mlp = register_module("mlp", FeedForward(C, config.mlp_ratio * C));
  }
}

void BlockImpl::setRandomKey(int64_t step, int64_t microBatch) {
  attn_key_.setStep(step, microBatch);
  ffn_key_.setStep(step, microBatch);
  attn->setRandomKey(step, microBatch);
}

BlockOutput BlockImpl::forwardWithAux(const torch::Tensor& x) {
  // With sequence parallelism x, h and the branches are this rank's
  // sequence shard (B, T/tp, C); otherwise (B, T, C) on every rank.
  BlockOutput out;
  auto branch = residualDropout(attn->forward(ln1->forward(x)), attn_key_);  // (B, T, C)
  const auto h = x + branch;                                                 // (B, T, C)
  if (!moe) {
    branch = mlp->forward(ln2->forward(h));  // (B, T, C)
  } else if (!sequence_group_) {
    branch = moe->forward(ln2->forward(h), &out.aux);  // (B, T, C)
  } else {
    // Sequence parallelism: every tp rank routes the whole sequence, so
    // capacity, drops and the aux loss are those of tp = 1. The gathered
    // input feeds replicated computation (identical gradients on every tp
    // rank), hence gatherFromShards / scatterToShards, not the sequence pair.
    const auto full = sequence_group_->gatherFromShards(ln2->forward(h), 1);           // (B, T, C)
    branch = sequence_group_->scatterToShards(moe->forward(full, &out.aux), 1);       // (B, T/tp, C)
  }
  out.x = h + residualDropout(branch, ffn_key_);                             // (B, T, C)
  return out;
}

torch::Tensor BlockImpl::residualDropout(const torch::Tensor& x, const DropoutKey& key) {
  return sequenceDropout(x, dropout_, is_training(), key, sequence_group_.get());
}

void BlockImpl::applyTensorParallel(const std::shared_ptr<ShardGroup>& group, bool sequenceParallel) {
  LayerOptions replicated;  // LayerNorm: whole; on sequence shards its gradients are summed over tp
  replicated.group = group;
  replicated.sequence_parallel = sequenceParallel;
  ln1->shard(replicated);
  ln2->shard(replicated);
  LayerOptions column = replicated;
  column.sharding = Sharding::kColumn;
  LayerOptions row = replicated;
  row.sharding = Sharding::kRow;
  LayerOptions qkv = column;
  qkv.fused_blocks = 3;  // rows [q; k; v]: every rank takes the same whole heads of each
  attn->qkv->shard(qkv);
  attn->proj->shard(row);
  if (mlp) {
    mlp->fc->shard(column);
    mlp->proj->shard(row);
  } else {
    // TED (DeepSpeed-TED, arXiv 2303.06318): each expert split as the dense
    // MLP is. The router stays whole: every tp rank routes the same tokens
    // identically. Under sequence parallelism the MoE layer's input is
    // gathered first (forwardWithAux), so the experts use the plain regions;
    // parallel/expert_parallel.h may switch them to the slot-parallel ones
    // (duplicate-token dropping).
    LayerOptions expertColumn;
    expertColumn.group = group;
    expertColumn.sharding = Sharding::kColumn;
    LayerOptions expertRow = expertColumn;
    expertRow.sharding = Sharding::kRow;
    for (size_t e = 0; e < moe->experts->size(); ++e) {
      moe->experts->at(e).fc->shard(expertColumn);
      moe->experts->at(e).proj->shard(expertRow);
    }
  }
  if (sequenceParallel) sequence_group_ = group;
}

// ---- Model ------------------------------------------------------------------

GptImpl::GptImpl(const GptConfig& config, GptPart part) : config_(config), part_(std::move(part)) {
  config_.validate();
  if (part_.all_blocks) {
    part_.blocks.clear();
    for (int64_t i = 0; i < config_.n_layer; ++i) part_.blocks.push_back(i);
  }
  for (size_t k = 0; k < part_.blocks.size(); ++k) {
    const int64_t b = part_.blocks[k];
    TESSERA_CHECK_ARG(b >= 0 && b < config_.n_layer, "GptPart: block " << b << " is not in [0, n_layer = "
                                                                        << config_.n_layer << ")");
    TESSERA_CHECK_ARG(k == 0 || b > part_.blocks[k - 1],
                      "GptPart: block indices must be ascending and distinct, got " << part_.blocks[k - 1]
                                                                                   << " before " << b);
  }
  TESSERA_CHECK_ARG(part_.embedding || part_.head || !part_.blocks.empty(),
                    "GptPart holds nothing: no embedding, no block, no head");
  embedding_key_ = dropoutKey(config_, GptDropout::kEmbedding, 0);
  // Registration order is the whole model's (wte, wpe, blocks, ln_f, head),
  // so a part's parameters are a subsequence of the whole model's.
  if (part_.embedding || holdsTiedCopy()) {
    wte = register_module("wte", Embedding(config_.vocab_size, config_.d_model));
  }
  if (part_.embedding && config_.positions == "learned") {
    wpe = register_module("wpe", Embedding(config_.block_size, config_.d_model));
  }
  blocks = register_module("blocks", BlockList());
  for (int64_t i : part_.blocks) blocks->push(i, Block(config_, i));
  if (part_.head) {
    ln_f = register_module("ln_f", LayerNorm(config_.d_model));
    if (!config_.tie_weights) {
      head = register_module("head", Linear(config_.d_model, config_.vocab_size, /*bias=*/false));
    }
  }
  initParameters();
}

bool GptImpl::holdsWholeModel() const {
  return part_.embedding && part_.head && static_cast<int64_t>(blocks->size()) == config_.n_layer;
}

void GptImpl::setRandomKey(int64_t step, int64_t microBatch) {
  embedding_key_.setStep(step, microBatch);
  for (size_t i = 0; i < blocks->size(); ++i) blocks->at(i).setRandomKey(step, microBatch);
}

void GptImpl::initParameters() {
  // Each parameter from (seed, name, logical shape) alone (init.h), so a
  // process holding any slice of it -- or any pipeline part -- computes the
  // values one process would.
  const double residual_std = config_.init_std / std::sqrt(2.0 * static_cast<double>(config_.n_layer));
  auto endsWith = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  initializeParameters(*this, config_.seed, [&](const LogicalParameter& p) {
    const std::string& name = p.name;
    const bool is_norm = name.rfind("ln", 0) == 0 || name.find(".ln") != std::string::npos;
    if (is_norm) return ParameterInit::constant(endsWith(name, ".weight") ? 1.0 : 0.0);
    if (endsWith(name, ".bias")) return ParameterInit::constant(0.0);
    // GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), because each
    // block adds two of them to the residual stream.
    return ParameterInit::normal(endsWith(name, "proj.weight") ? residual_std : config_.init_std);
  });
}

void GptImpl::applyTensorParallel(std::shared_ptr<ShardGroup> group, bool sequenceParallel) {
  TESSERA_CHECK_ARG(group != nullptr, "Gpt::applyTensorParallel needs a group");
  TESSERA_CHECK_ARG(!tp_group_, "Gpt::applyTensorParallel: the model is already split over " << tp_group_->name());
  const int64_t tp = group->size();
  config_.validateTensorParallel(tp, "model.", "parallel." + group->name());
  if (tp == 1 && !sequenceParallel) return;  // nothing to split

  LayerOptions replicated;  // whole parameters; on sequence shards their gradients are summed over tp
  replicated.group = group;
  replicated.sequence_parallel = sequenceParallel;
  LayerOptions vocabulary = replicated;
  vocabulary.sharding = Sharding::kVocabulary;
  if (wte) wte->shard(vocabulary);  // a tied copy splits as the first stage's wte does
  if (wpe && sequenceParallel) wpe->shard(replicated);
  for (size_t i = 0; i < blocks->size(); ++i) blocks->at(i).applyTensorParallel(group, sequenceParallel);
  if (ln_f) ln_f->shard(replicated);
  if (head) {
    LayerOptions column = replicated;
    column.sharding = Sharding::kColumn;  // the vocabulary split as wte's (shardRange)
    head->shard(column);
  }
  tp_group_ = std::move(group);
  sequence_parallel_ = sequenceParallel;
}

torch::Tensor GptImpl::embed(const torch::Tensor& idx) {
  TESSERA_CHECK_ARG(part_.embedding, "Gpt::embed: this part does not hold the embedding (GptPart::embedding)");
  TESSERA_CHECK_ARG(idx.dim() == 2 && idx.scalar_type() == torch::kLong,
                    "Gpt::forward wants (B, T) int64 token ids, got " << idx.sizes() << " " << idx.scalar_type());
  const int64_t T = idx.size(1);
  TESSERA_CHECK_ARG(T <= config_.block_size, "sequence length " << T << " exceeds block_size " << config_.block_size);
  ShardGroup* sequence = sequence_parallel_ ? tp_group_.get() : nullptr;
  int64_t t0 = 0, T_r = T;  // this rank's positions [t0, t0 + T_r)
  if (sequence != nullptr) {
    TESSERA_CHECK_ARG(T % sequence->size() == 0, "sequence parallelism splits the sequence over "
                                                     << sequence->name() << " (" << sequence->size()
                                                     << " ranks): length " << T << " is not divisible");
    T_r = T / sequence->size();
    t0 = sequence->rank() * T_r;
  }
  auto x = wte->forward(idx);  // (B, T_r, C): under tp summed (or reduce-scattered) over the vocabulary shards
  if (wpe) x = x + wpe->forward(torch::arange(t0, t0 + T_r, idx.options()));  // (B, T_r, C) + (T_r, C)
  return sequenceDropout(x, config_.dropout, is_training(), embedding_key_, sequence);  // (B, T_r, C)
}

BlockOutput GptImpl::runBlocks(torch::Tensor x, int64_t begin, int64_t end) {
  TESSERA_CHECK_ARG(begin <= end, "Gpt::runBlocks: empty range [" << begin << ", " << end << ") is reversed");
  BlockOutput out;
  for (size_t i = 0; i < blocks->size(); ++i) {
    const int64_t index = blocks->globalIndex(i);
    if (index < begin || index >= end) continue;
    BlockOutput block = block_runner_ ? block_runner_(index, x) : blocks->at(i).forwardWithAux(x);
    x = block.x;  // (B, T_r, C)
    if (block.aux.defined()) out.aux = out.aux.defined() ? out.aux + block.aux : block.aux;
  }
  out.x = std::move(x);
  return out;
}

GptOutput GptImpl::logits(const torch::Tensor& x) {
  TESSERA_CHECK_ARG(part_.head, "Gpt::logits: this part does not hold the head (GptPart::head)");
  GptOutput out;
  const auto h = ln_f->forward(x);                       // (B, T_r, C)
  out.logits = head ? head->forward(h) : wte->attend(h);  // (B, T, V), or this rank's (B, T, V_r)
  out.vocab_begin = head ? head->outputRange().begin : wte->vocabRange().begin;
  out.aux_loss = torch::zeros({}, out.logits.options().dtype(torch::kFloat));
  return out;
}

GptOutput GptImpl::forwardWithAux(const torch::Tensor& idx) {
  TESSERA_CHECK_ARG(holdsWholeModel(), "Gpt::forward needs the whole model; a pipeline part runs embed, runBlocks "
                                       "and logits for its chunks");
  BlockOutput body = runBlocks(embed(idx), 0, config_.n_layer);  // (B, T_r, C)
  GptOutput out = logits(body.x);
  if (body.aux.defined()) out.aux_loss = body.aux;
  return out;
}

torch::Tensor GptImpl::forward(const torch::Tensor& idx) {
  GptOutput out = forwardWithAux(idx);
  if (!tp_group_ || tp_group_->size() == 1) return out.logits;
  // Every rank's columns padded to the common chunk (the last may hold
  // fewer, shardRange), gathered in rank order, then the padding cut.
  const int64_t V = config_.vocab_size;
  const int64_t chunk = (V + tp_group_->size() - 1) / tp_group_->size();
  const int64_t held = out.logits.size(-1);
  at::Tensor local = out.logits;
  if (held < chunk) {
    local = at::cat({local, at::zeros({local.size(0), local.size(1), chunk - held}, local.options())}, -1);
  }
  return tp_group_->gatherFromShards(local, -1).narrow(-1, 0, V);  // (B, T, V)
}

torch::Tensor GptImpl::loss(const torch::Tensor& idx, const torch::Tensor& targets) {
  TESSERA_CHECK_ARG(targets.sizes() == idx.sizes(),
                    "targets " << targets.sizes() << " must have the shape of idx " << idx.sizes());
  return lossFromLogits(forwardWithAux(idx), targets);
}

torch::Tensor GptImpl::lossFromLogits(const GptOutput& out, const torch::Tensor& targets) {
  const int64_t held = out.logits.size(-1);
  TESSERA_CHECK_ARG(targets.numel() * held == out.logits.numel(),
                    "targets " << targets.sizes() << " do not match the logits " << out.logits.sizes());
  torch::Tensor ce;
  if (tp_group_ && tp_group_->size() > 1) {
    ce = vocabParallelCrossEntropy(out.logits.reshape({-1, held}), targets.reshape({-1}), out.vocab_begin,
                                   *tp_group_)
             .mean();
  } else {
    ce = torch::cross_entropy_loss(out.logits.reshape({-1, config_.vocab_size}),  // (B*T, V)
                                   targets.reshape({-1}));                     // (B*T)
  }
  if (!config_.use_moe) return ce;
  return ce + config_.moe.aux_loss_weight * out.aux_loss;
}

}  // namespace tessera::models
