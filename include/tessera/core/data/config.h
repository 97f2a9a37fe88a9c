// The [data] section of a training config, and the error a missing or corrupt
// data file raises.
//
// The datasets are Debian packages installed by scripts/setup.sh; nothing is
// downloaded. An error about a data file names the path, what is wrong, and the
// package that provides it.
#pragma once

#include <cstdint>
#include <string>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::data {

// A data file or directory is missing, unreadable or corrupt. The message names
// the path, the problem and the Debian package that provides the file.
class DataError : public Error {
 public:
  using Error::Error;
};

// Where the Debian packages put the data, and the packages' names.
inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";
inline constexpr const char* kFortunesPackage = "fortunes";
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
inline constexpr const char* kFashionMnistPackage = "dataset-fashion-mnist";

// [data]: which dataset, how it is cut into examples, and how examples are
// batched and shuffled. Plain struct; validate() before use.
struct DataConfig {
  // "fortunes" (byte-level language modelling, vocab 256) or "fashion-mnist"
  // (28x28 grey images, 10 classes).
  std::string dataset = "fortunes";
  // Directory holding the dataset; empty means the Debian package's location
  // (kFortunesDir or kFashionMnistDir).
  std::string dir;
  // fortunes: tokens per example (T); each example holds T inputs and the T
  // next-byte targets.
  int64_t seq_len = 128;
  // fortunes: fraction of the corpus, taken from its end, held out for
  // validation. In (0, 1).
  double val_fraction = 0.1;
  // fashion-mnist: subtract the training set's mean pixel and divide by its
  // standard deviation (kFashionMnistMean/Std) after scaling to [0, 1].
  bool normalize = false;
  // Examples per data-parallel rank per step; the global batch is
  // dp_size x batch_size.
  int64_t batch_size = 32;
  // Seed of the per-epoch shuffle; every rank must use the same one.
  int64_t seed = 0;
  // Shuffle the training examples every epoch (false: file order).
  bool shuffle = true;

  // Throws ConfigError naming the field ("data.seq_len") and the valid values.
  void validate() const;
  // dir, or the default directory of `dataset` when dir is empty.
  std::string resolvedDir() const;
};

}  // namespace tessera::data
