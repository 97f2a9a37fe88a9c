// Which examples each data-parallel rank reads at each step.
//
// Every epoch has one order of the dataset's examples (a seeded shuffle, the
// same on every rank). Step k of the epoch consumes the global batch
// order[k*G, (k+1)*G) with G = dp_size x batch_size, and rank r reads the
// contiguous slice order[k*G + r*b, k*G + (r+1)*b). Hence the per-rank batches
// concatenated in rank order are exactly the batch one process with
// batch_size G reads: DP on N ranks sees the same examples in the same order
// as a single process with N times the batch. Worked example, 10 examples,
// dp_size 2, b 2, order [7 2 9 0 4 | 1 8 3 5 6]:
//   step 0: rank 0 reads [7 2], rank 1 [9 0]    (1 rank, b 4: [7 2 9 0])
//   step 1: rank 0 reads [4 1], rank 1 [8 3]
//   then 2 examples remain < G: they are dropped and epoch 1 starts with a
//   new order.
// The position (epoch, offset) is training state: state() after step k, fed to
// loadState() in a fresh sampler, makes its next() return what step k + 1 of
// an uninterrupted run would. The offset counts examples, not steps, so a
// resume with another dp_size but the same global batch continues exactly.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tessera::data {

// A sampler's position; small and serializable (checkpoints store toMap()).
struct SamplerState {
  int64_t epoch = 0;         // epochs completed
  int64_t offset = 0;        // examples of this epoch's order already consumed
  int64_t seed = 0;          // the shuffle seed (checked on load)
  int64_t num_examples = 0;  // dataset size (checked on load)

  // {"epoch", "offset", "seed", "num_examples"} -> value.
  std::map<std::string, int64_t> toMap() const;
  // Inverse of toMap(); throws InvalidArgument naming a missing key.
  static SamplerState fromMap(const std::map<std::string, int64_t>& map);
};

class DistributedSampler {
 public:
  struct Options {
    int64_t numExamples = 0;  // dataset size
    int64_t batchSize = 1;    // examples per rank per step (b)
    int dpRank = 0;           // this rank's index on the data-parallel axis
    int dpSize = 1;           // data-parallel degree
    int64_t seed = 0;         // same on every rank
    bool shuffle = true;      // false: every epoch in index order
  };

  // Not collective: every rank builds its own from the same options (but its
  // dpRank). Throws InvalidArgument on a bad option or a dataset smaller than
  // one global batch.
  explicit DistributedSampler(const Options& options);

  // This rank's indices for the next step (batchSize of them); starts a new
  // epoch first when fewer than a global batch remain in this one.
  std::vector<int64_t> next();

  // Steps per epoch: numExamples / (dpSize x batchSize), rounded down.
  int64_t batchesPerEpoch() const;
  int64_t globalBatchSize() const { return options_.batchSize * options_.dpSize; }
  int64_t epoch() const { return epoch_; }

  SamplerState state() const;
  // Continues from `state`. Throws InvalidArgument if it was saved with
  // another seed or dataset size, or its position is out of range.
  void loadState(const SamplerState& state);

  // The order of the examples in `epoch`: a permutation of [0, numExamples)
  // from the seed and the epoch (Fisher-Yates on splitmix64, so the same on
  // every platform and standard library), or the identity if !shuffle.
  static std::vector<int64_t> epochOrder(int64_t numExamples, int64_t seed, int64_t epoch,
                                         bool shuffle);

 private:
  Options options_;
  int64_t epoch_ = 0;
  int64_t offset_ = 0;
  std::vector<int64_t> order_;  // epochOrder(..., epoch_, ...)
};

}  // namespace tessera::data
