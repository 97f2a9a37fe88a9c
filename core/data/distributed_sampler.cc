#include "tessera/core/data/distributed_sampler.h"

#include <numeric>

#include "tessera/core/error.h"

namespace tessera::data {

namespace {

// splitmix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed
// by its definition, unlike std::shuffle's, which differs between libraries.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, bound) without modulo bias (rejects the short last range).
uint64_t uniformBelow(uint64_t& state, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
  for (;;) {
    const uint64_t r = splitmix64(state);
    if (r >= threshold) return r % bound;
  }
}

}  // namespace

std::map<std::string, int64_t> SamplerState::toMap() const {
  return {{"epoch", epoch}, {"offset", offset}, {"seed", seed}, {"num_examples", num_examples}};
}

SamplerState SamplerState::fromMap(const std::map<std::string, int64_t>& map) {
  const auto get = [&](const char* key) {
    const auto it = map.find(key);
    TESSERA_CHECK_ARG(it != map.end(), "sampler state has no key \"" << key << "\"");
    return it->second;
  };
  SamplerState state;
  state.epoch = get("epoch");
  state.offset = get("offset");
  state.seed = get("seed");
  state.num_examples = get("num_examples");
  return state;
}

DistributedSampler::DistributedSampler(const Options& options) : options_(options) {
  TESSERA_CHECK_ARG(options.batchSize >= 1, "batch size must be >= 1, got " << options.batchSize);
  TESSERA_CHECK_ARG(options.dpSize >= 1, "dp size must be >= 1, got " << options.dpSize);
  TESSERA_CHECK_ARG(options.dpRank >= 0 && options.dpRank < options.dpSize,
                    "dp rank " << options.dpRank << " not in [0, " << options.dpSize << ")");
  TESSERA_CHECK_ARG(options.numExamples >= globalBatchSize(),
                    "the dataset has " << options.numExamples
                                       << " examples, fewer than one global batch (dp size "
                                       << options.dpSize << " x batch size " << options.batchSize
                                       << " = " << globalBatchSize() << ")");
  order_ = epochOrder(options_.numExamples, options_.seed, epoch_, options_.shuffle);
}

std::vector<int64_t> DistributedSampler::next() {
  const int64_t global = globalBatchSize();
  if (offset_ + global > options_.numExamples) {  // drop the tail: every step is a full batch
    ++epoch_;
    offset_ = 0;
    order_ = epochOrder(options_.numExamples, options_.seed, epoch_, options_.shuffle);
  }
  const auto first = order_.begin() + offset_ + options_.dpRank * options_.batchSize;
  offset_ += global;
  return {first, first + options_.batchSize};
}

int64_t DistributedSampler::batchesPerEpoch() const {
  return options_.numExamples / globalBatchSize();
}

SamplerState DistributedSampler::state() const {
  return {epoch_, offset_, options_.seed, options_.numExamples};
}

void DistributedSampler::loadState(const SamplerState& state) {
  TESSERA_CHECK_ARG(state.seed == options_.seed,
                    "sampler state was saved with seed " << state.seed << ", this sampler has "
                                                         << options_.seed);
  TESSERA_CHECK_ARG(state.num_examples == options_.numExamples,
                    "sampler state was saved for " << state.num_examples
                                                   << " examples, this dataset has "
                                                   << options_.numExamples);
  TESSERA_CHECK_ARG(state.epoch >= 0, "sampler state has epoch " << state.epoch);
  TESSERA_CHECK_ARG(state.offset >= 0 && state.offset <= options_.numExamples,
                    "sampler state has offset " << state.offset << ", not in [0, "
                                                << options_.numExamples << "]");
  if (state.epoch != epoch_) {
    order_ = epochOrder(options_.numExamples, options_.seed, state.epoch, options_.shuffle);
  }
  epoch_ = state.epoch;
  offset_ = state.offset;
}

std::vector<int64_t> DistributedSampler::epochOrder(int64_t numExamples, int64_t seed,
                                                    int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(numExamples));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (!shuffle) return order;
  // One stream per (seed, epoch): mix the seed first so that nearby seeds and
  // epochs do not give overlapping streams.
  uint64_t mixer = static_cast<uint64_t>(seed);
  uint64_t state = splitmix64(mixer) ^ static_cast<uint64_t>(epoch);
  state = splitmix64(state);
  for (int64_t i = numExamples - 1; i > 0; --i) {  // Fisher-Yates
    const auto j = static_cast<int64_t>(uniformBelow(state, static_cast<uint64_t>(i) + 1));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

}  // namespace tessera::data
