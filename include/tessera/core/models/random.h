// Randomness that does not depend on layout: every random number a model draws
// (initial values, dropout masks) is a pure function of a key and the element's
// index in the *logical* (global) tensor, never of which process computes it or
// in what order. So a tensor-parallel shard, a pipeline stage or FSDP's
// recomputation in backward draws exactly the numbers one process would, and a
// rank can produce its slice of a tensor without producing the rest.
//
// The construction (counter-based, Salmon et al., "Parallel Random Numbers: As
// Easy as 1, 2, 3", SC 2011):
//   key     = 64 bits: splitmix64(splitmix64(seed) ^ fnv1a64(label)), where the
//             label names the stream ("init:blocks.0.attn.qkv.weight",
//             "dropout:7"), so streams of different labels are unrelated;
//   block   = Philox4x32-10(counter, key): four 32-bit words per 128-bit counter;
//   counter = (g / n mod 2^32, g / n div 2^32, c2, c3), g the element's
//             row-major index in the global tensor, n the elements one block
//             serves (2 for init, 4 for dropout), (c2, c3) = (step, micro-batch)
//             for dropout and (0, 0) for init.
// Unlike torch's generator, there is no state to save, restore or advance.
//
// Deliberately not here: sampling at generation time (per-rank state, saved
// in the training state by the trainer).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/state.h"

namespace tessera::models {

// ---- The generator ------------------------------------------------------------

// Philox4x32 with 10 rounds (Random123's philox4x32_10): the block for
// `counter` under `key`. Pure; thread-safe.
std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// The 64-bit key of the stream named `label` under `seed` (see above).
uint64_t streamKey(uint64_t seed, const std::string& label);

// ---- Global indices of a slice ---------------------------------------------------

// Walks the elements a TensorSlice holds, in the local (row-major box, then
// flat range) order, yielding each one's row-major index in the global tensor.
// O(1) per element, amortized. Throws InvalidArgument when the slice does not
// fit `globalShape`.
class SliceIndexer {
 public:
  SliceIndexer(const std::vector<int64_t>& globalShape, const TensorSlice& slice);

  int64_t numel() const { return slice_.numel; }

  // Calls fn(local, global, length) for each run of elements in [begin, end)
  // that is contiguous in the global tensor (a row of the box's last
  // dimension, or part of one), in order: local elements local .. local +
  // length - 1 are global elements global .. global + length - 1.
  template <typename Fn>
  void forRuns(int64_t begin, int64_t end, Fn&& fn) const {
    if (begin >= end) return;
    const size_t rank = slice_.sizes.size();
    if (rank == 0) {  // a scalar: one element
      fn(begin, int64_t{0}, end - begin);
      return;
    }
    std::vector<int64_t> coord(rank);  // position within the box
    int64_t rest = slice_.flatOffset + begin;
    for (size_t d = rank; d-- > 0;) {
      coord[d] = rest % slice_.sizes[d];
      rest /= slice_.sizes[d];
    }
    const int64_t row = slice_.sizes[rank - 1];
    for (int64_t local = begin; local < end;) {
      const int64_t length = std::min(row - coord[rank - 1], end - local);
      fn(local, globalIndex(coord), length);
      local += length;
      // Odometer step to the start of the next row of the box.
      coord[rank - 1] = 0;
      for (size_t d = rank - 1; d-- > 0;) {
        if (++coord[d] < slice_.sizes[d]) break;
        coord[d] = 0;
      }
    }
  }

  // Calls fn(local, global) for each element in [begin, end), in order.
  template <typename Fn>
  void forRange(int64_t begin, int64_t end, Fn&& fn) const {
    forRuns(begin, end, [&](int64_t local, int64_t global, int64_t length) {
      for (int64_t i = 0; i < length; ++i) fn(local + i, global + i);
    });
  }

 private:
  int64_t globalIndex(const std::vector<int64_t>& coord) const;

  TensorSlice slice_;
  std::vector<int64_t> global_strides_;  // row-major strides of the global shape
};

// ---- Dropout -----------------------------------------------------------------------

// Identifies one dropout mask: which model (seed), which forward (step,
// micro-batch) and which dropout site of the model (a fixed id per site, the
// same in every process: a pipeline stage or tp rank uses the global block
// index). The training loop sets step and micro_batch before each forward
// (GptImpl::setRandomKey). micro_batch must differ between micro-batches that
// different data-parallel ranks run in one step (e.g. dp_rank *
// accumulation_steps + i), or they draw the same masks for different examples.
struct DropoutKey {
  uint64_t seed = 0;
  int64_t step = 0;         // in [0, 2^32)
  int64_t micro_batch = 0;  // in [0, 2^32)
  uint64_t site = 0;

  // Sets step and micro_batch. Throws InvalidArgument naming the value when
  // either is outside [0, 2^32) (they are Philox counter words).
  void setStep(int64_t new_step, int64_t new_micro_batch);
};

// The mask of the elements `slice` holds of a global tensor of `globalShape`:
// each element is 1 / (1 - p) (kept) or 0 (dropped), in local order, shaped
// slice.sizes when slice.isWholeBox() and (slice.numel) otherwise. An element
// is kept when its 32-bit word of the Philox block is >= round(p * 2^32), so
// the keep probability is 1 - p (to 2^-32). Deterministic in (key, p, global
// index); computed by a parallel C++ loop. Throws InvalidArgument for p
// outside [0, 1), a step or micro-batch outside [0, 2^32), a slice that does
// not fit, or a non-floating dtype.
at::Tensor dropoutMask(const DropoutKey& key, double p, const std::vector<int64_t>& globalShape,
                       const TensorSlice& slice, at::ScalarType dtype = at::kFloat);

// Inverted dropout of x: x * mask, the mask above (so backward multiplies the
// gradient by the same mask; ordinary autograd). x holds `slice` of a global
// tensor of `globalShape`; the defaults mean x is the whole tensor. Identity
// when !training or p == 0. Throws as dropoutMask, and InvalidArgument when x
// does not have the slice's shape.
at::Tensor dropout(const at::Tensor& x, double p, bool training, const DropoutKey& key);
at::Tensor dropout(const at::Tensor& x, double p, bool training, const DropoutKey& key,
                   const std::vector<int64_t>& globalShape, const TensorSlice& slice);

}  // namespace tessera::models
