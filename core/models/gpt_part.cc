// Pipeline parts of the GPT: the chunk split, the whole model's parameter
// list from its config, and the block container named by global index.
#include "tessera/core/models/gpt_part.h"

#include <algorithm>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/models/gpt.h"

namespace tessera::models {

GptPart GptPart::ofChunks(const std::vector<std::pair<int64_t, int64_t>>& ranges, bool hasFirstChunk,
                          bool hasLastChunk) {
  GptPart part;
  part.all_blocks = false;
  part.embedding = hasFirstChunk;
  part.head = hasLastChunk;
  for (const auto& [begin, end] : ranges) {
    TESSERA_CHECK_ARG(begin >= 0 && begin <= end, "GptPart::ofChunks: bad block range [" << begin << ", " << end << ")");
    for (int64_t b = begin; b < end; ++b) part.blocks.push_back(b);
  }
  std::sort(part.blocks.begin(), part.blocks.end());
  TESSERA_CHECK_ARG(std::adjacent_find(part.blocks.begin(), part.blocks.end()) == part.blocks.end(),
                    "GptPart::ofChunks: the chunks' block ranges overlap");
  return part;
}

std::vector<std::pair<int64_t, int64_t>> gptChunkBlocks(int64_t nLayer, int64_t chunks,
                                                        const std::vector<int64_t>& layersPerChunk,
                                                        const std::string& key) {
  TESSERA_CHECK_ARG(nLayer >= 1 && chunks >= 1,
                    "gptChunkBlocks: n_layer (" << nLayer << ") and chunks (" << chunks << ") must be >= 1");
  std::vector<int64_t> counts = layersPerChunk;
  if (counts.empty()) {
    TESSERA_CHECK_CONFIG(chunks <= nLayer, key,
                         "cannot balance model.n_layer = " << nLayer << " blocks over " << chunks
                                                           << " pipeline chunks (stages x virtual stages): every "
                                                              "chunk needs a block; use fewer stages or more layers");
    for (int64_t c = 0; c < chunks; ++c) counts.push_back(nLayer / chunks + (c < nLayer % chunks ? 1 : 0));
  } else {
    TESSERA_CHECK_CONFIG(static_cast<int64_t>(counts.size()) == chunks, key,
                         "has " << counts.size() << " entries; the pipeline has " << chunks
                                << " chunks (stages x virtual stages): give one count per chunk");
    int64_t sum = 0;
    for (size_t c = 0; c < counts.size(); ++c) {
      TESSERA_CHECK_CONFIG(counts[c] >= 0, key, "entry " << c << " is " << counts[c] << "; counts must be >= 0");
      const bool end = c == 0 || c + 1 == counts.size();  // holds the embedding or the head
      TESSERA_CHECK_CONFIG(counts[c] >= 1 || end, key,
                           "entry " << c << " is 0: only the first chunk (embedding) and the last (head) may "
                                       "hold no block");
      sum += counts[c];
    }
    TESSERA_CHECK_CONFIG(sum == nLayer, key,
                         "sums to " << sum << " blocks; model.n_layer is " << nLayer << ": the counts must add up to it");
  }
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t at = 0;
  for (int64_t n : counts) {
    out.emplace_back(at, at + n);
    at += n;
  }
  return out;
}

std::map<std::string, std::vector<int64_t>> gptParameterShapes(const GptConfig& config) {
  config.validate();
  // Mirrors the registrations of GptImpl / BlockImpl / FeedForward /
  // MoeFeedForward; gpt_part_test checks it against a built model's
  // logicalParameters for every option that changes the list.
  const int64_t V = config.vocab_size, C = config.d_model, H = config.mlp_ratio * config.d_model;
  std::map<std::string, std::vector<int64_t>> out;
  out["wte.weight"] = {V, C};
  if (config.positions == "learned") out["wpe.weight"] = {config.block_size, C};
  const auto linear = [&](const std::string& name, int64_t in, int64_t outFeatures, bool bias) {
    out[name + ".weight"] = {outFeatures, in};
    if (bias) out[name + ".bias"] = {outFeatures};
  };
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    for (const char* norm : {"ln1", "ln2"}) {
      out[b + norm + ".weight"] = {C};
      out[b + norm + ".bias"] = {C};
    }
    linear(b + "attn.qkv", C, 3 * C, true);
    linear(b + "attn.proj", C, C, true);
    if (config.use_moe) {
      linear(b + "moe.router", C, config.moe.num_experts, false);
      for (int64_t e = 0; e < config.moe.num_experts; ++e) {
        const std::string expert = b + "moe.experts." + std::to_string(e);
        linear(expert + ".fc", C, H, true);
        linear(expert + ".proj", H, C, true);
      }
    } else {
      linear(b + "mlp.fc", C, H, true);
      linear(b + "mlp.proj", H, C, true);
    }
  }
  out["ln_f.weight"] = {C};
  out["ln_f.bias"] = {C};
  if (!config.tie_weights) out["head.weight"] = {V, C};
  return out;
}

// ---- BlockList ----------------------------------------------------------------

void BlockListImpl::push(int64_t globalIndex, Block block) {
  TESSERA_CHECK_ARG(globalIndex >= 0 && (indices_.empty() || globalIndex > indices_.back()),
                    "BlockList::push: global index " << globalIndex << " must be >= 0 and above the last one ("
                                                     << (indices_.empty() ? -1 : indices_.back()) << ")");
  blocks_.push_back(register_module(std::to_string(globalIndex), std::move(block)));
  indices_.push_back(globalIndex);
}

BlockImpl& BlockListImpl::at(size_t position) const {
  TESSERA_CHECK_ARG(position < blocks_.size(),
                    "BlockList::at: position " << position << " not in [0, " << blocks_.size() << ")");
  return *blocks_[position].ptr();  // ptr(): the non-const module (a const list of mutable blocks)
}

int64_t BlockListImpl::globalIndex(size_t position) const {
  TESSERA_CHECK_ARG(position < indices_.size(),
                    "BlockList::globalIndex: position " << position << " not in [0, " << indices_.size() << ")");
  return indices_[position];
}

bool BlockListImpl::contains(int64_t globalIndex) const {
  return std::binary_search(indices_.begin(), indices_.end(), globalIndex);
}

size_t BlockListImpl::positionOf(int64_t globalIndex) const {
  const auto it = std::lower_bound(indices_.begin(), indices_.end(), globalIndex);
  if (it == indices_.end() || *it != globalIndex) {
    std::ostringstream held;
    for (size_t i = 0; i < indices_.size(); ++i) held << (i ? ", " : "") << indices_[i];
    TESSERA_CHECK_ARG(false, "block " << globalIndex << " is not held by this part (it holds blocks ["
                                      << held.str() << "])");
  }
  return static_cast<size_t>(it - indices_.begin());
}

}  // namespace tessera::models
