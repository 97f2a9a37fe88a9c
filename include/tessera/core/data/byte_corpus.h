// Byte-level language-model data: a corpus of text files read as raw bytes
// (vocab 256, no tokenizer), a train/validation split by position, and
// batches of (B, T) inputs with next-byte targets.
//
// The default corpus is Debian's `fortunes` package (about 2.5 MB of text).
// Not done here: tokenization, document boundaries (files are simply
// concatenated), streaming of corpora that do not fit in memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/data/config.h"

namespace tessera::data {

// Every regular file under a directory, concatenated as bytes.
class ByteCorpus {
 public:
  // Reads every regular file under `dir`, recursively, in sorted path order
  // (so every rank and every run sees the same bytes), skipping the `.dat`
  // indexes and `.u8` links of the fortune format. Throws DataError naming
  // the path and `package` when `dir` is missing, holds no text file, or a
  // file cannot be read.
  static ByteCorpus load(const std::string& dir = kFortunesDir,
                         const std::string& package = kFortunesPackage);

  // (N,) uint8, contiguous; owned by the corpus, shared by the views below.
  const at::Tensor& bytes() const { return bytes_; }
  int64_t size() const { return bytes_.numel(); }
  // The files read, in the order they were concatenated.
  const std::vector<std::string>& files() const { return files_; }

 private:
  at::Tensor bytes_;
  std::vector<std::string> files_;
};

// One batch: inputs[b][t] predicts targets[b][t] == inputs[b][t + 1].
struct LmBatch {
  at::Tensor inputs;   // (B, T) int64, values in [0, 256)
  at::Tensor targets;  // (B, T) int64, inputs shifted left by one
};

// A range of bytes cut into examples: example i is the T + 1 bytes starting at
// i * T (non-overlapping inputs; the last target of one example is the first
// input of the next). A trailing remainder shorter than that is unused.
class LmDataset {
 public:
  // tokens: (N,) uint8; the dataset keeps a view, not a copy. Throws
  // InvalidArgument unless N >= seqLen + 1.
  LmDataset(at::Tensor tokens, int64_t seqLen);

  // Number of examples: (N - 1) / T.
  int64_t size() const { return windows_.size(0); }
  int64_t seqLen() const { return seqLen_; }
  // The bytes this dataset was built from: (N,) uint8.
  const at::Tensor& tokens() const { return tokens_; }
  // Gathers examples `indices` (each in [0, size())) in the given order.
  LmBatch batch(const std::vector<int64_t>& indices) const;

 private:
  at::Tensor tokens_;   // (N,) uint8
  at::Tensor windows_;  // (size(), T + 1) uint8, a strided view of tokens_
  int64_t seqLen_;
};

// The corpus split by position: train is the first (1 - val_fraction) of the
// bytes, validation the rest; the two share no byte. Deterministic.
struct LmSplit {
  LmDataset train;
  LmDataset val;
};

// Splits `corpus` with config.seq_len and config.val_fraction (validated).
// Throws InvalidArgument if either side is shorter than seq_len + 1 bytes.
LmSplit splitCorpus(const ByteCorpus& corpus, const DataConfig& config);

}  // namespace tessera::data
