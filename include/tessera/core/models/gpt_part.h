// Which part of the GPT one pipeline rank holds, and how the model's blocks
// are cut into pipeline chunks (issue 16 §1).
//
// A pipeline of p stages with v chunks per stage cuts the n_layer blocks into
// p * v contiguous chunks c = 0 … p·v−1 (gptChunkBlocks). Chunk 0 also holds
// the embedding (wte, wpe), the last chunk ln_f and the head. A rank holding
// several chunks (interleaved 1F1B: chunks r, r + p, …; ZB-V: r and 2p−1−r)
// holds the union of their blocks in ONE GptImpl, described by a GptPart.
// Parameter names are always the whole model's: a block keeps its global
// index ("blocks.7.attn.qkv.weight" on whichever rank holds block 7), so a
// checkpoint of any pipeline layout is a checkpoint of the whole model and
// reshards across pp degrees. Initial values depend only on (seed, name,
// logical shape) (init.h), so a part starts with the whole model's values.
//
// Not here: which rank holds which chunks (the schedule's), the executor.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tessera::models {

// The part of the GPT a module holds. Plain data; GptImpl's constructor
// validates it against the config (InvalidArgument naming the problem).
struct GptPart {
  bool embedding = true;            // wte (+ wpe): the rank holding chunk 0
  std::vector<int64_t> blocks;      // global block indices held, ascending, when !all_blocks
  bool all_blocks = true;           // every block (then `blocks` is ignored)
  // ln_f + head (untied) or, tied, the head that attends with wte: the rank
  // holding the last chunk. A part with head && !embedding && tie_weights
  // holds its own copy of wte ("wte.weight", the same init, so the same
  // values): Megatron's embedding group, whose gradient the pipeline
  // all-reduces with the first stage's (GptImpl::holdsTiedCopy).
  bool head = true;

  // The whole model: embedding, every block, head.
  static GptPart whole() { return GptPart{}; }
  // The union of the block ranges [begin, end) of one rank's chunks (from
  // gptChunkBlocks, any order; empty ranges allowed), with the embedding when
  // the rank holds chunk 0 and the head when it holds the last chunk. Throws
  // InvalidArgument for overlapping or negative ranges.
  static GptPart ofChunks(const std::vector<std::pair<int64_t, int64_t>>& ranges, bool hasFirstChunk,
                          bool hasLastChunk);
  // embedding && head && all_blocks. A part listing every block explicitly is
  // not "whole" by this test; GptImpl::holdsWholeModel() checks what is held.
  bool isWhole() const { return embedding && head && all_blocks; }
};

// The contiguous block ranges [begin, end) of `chunks` chunks over `nLayer`
// blocks, in chunk order (chunk 0 first; ranges[c].second == ranges[c+1].first).
//  - `layersPerChunk` empty: balanced: every chunk gets nLayer / chunks blocks
//    and the FIRST nLayer % chunks chunks one more each (the last chunk
//    carries the head and the loss, the heaviest non-block work, so it never
//    gets an extra block). Needs chunks <= nLayer.
//  - else: the given counts, one per chunk, summing to nLayer. Chunk 0 (which
//    holds the embedding) and the last chunk (the head) may hold 0 blocks;
//    every other chunk must hold >= 1 (a chunk with nothing to run would only
//    add a hop to the pipeline).
// Throws ConfigError naming `key` and both numbers: more chunks than layers
// with the balanced default, a count list of the wrong length, counts not
// summing to nLayer, a negative count or an empty middle chunk.
// InvalidArgument for nLayer < 1 or chunks < 1.
std::vector<std::pair<int64_t, int64_t>> gptChunkBlocks(int64_t nLayer, int64_t chunks,
                                                        const std::vector<int64_t>& layersPerChunk,
                                                        const std::string& key = "pipeline.layers_per_stage");

}  // namespace tessera::models
