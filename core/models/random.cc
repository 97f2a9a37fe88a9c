// Counter-based randomness: Philox4x32-10, stream keys, the slice walker and
// dropout masks (see random.h for the construction).
#include "tessera/core/models/random.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "tessera/core/error.h"

namespace tessera::models {
namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53;  // round multipliers (Salmon et al. 2011, table 2)
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9;  // key schedule: golden ratio, sqrt(3) - 1
constexpr uint32_t kPhiloxW1 = 0xBB67AE85;

// The splitmix64 output function (Steele et al. 2014): a bijective 64-bit mixer.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t fnv1a64(const std::string& text) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001B3ULL;
  }
  return h;
}

std::array<uint32_t, 2> splitKey(uint64_t key) {
  return {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)};
}

void checkCounterWord(int64_t value, const char* what) {
  TESSERA_CHECK_ARG(value >= 0 && value <= int64_t{0xFFFFFFFF},
                    "dropout key: " << what << " must be in [0, 2^32), got " << value);
}

}  // namespace

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kPhiloxW0;
      k[1] += kPhiloxW1;
    }
    const uint64_t p0 = uint64_t{kPhiloxM0} * c[0];
    const uint64_t p1 = uint64_t{kPhiloxM1} * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
  }
  return c;
}

uint64_t streamKey(uint64_t seed, const std::string& label) { return mix64(mix64(seed) ^ fnv1a64(label)); }

// ---- SliceIndexer --------------------------------------------------------------

SliceIndexer::SliceIndexer(const std::vector<int64_t>& globalShape, const TensorSlice& slice) : slice_(slice) {
  slice_.check(globalShape, "SliceIndexer");
  global_strides_.assign(globalShape.size(), 1);
  for (size_t d = globalShape.size(); d-- > 1;) global_strides_[d - 1] = global_strides_[d] * globalShape[d];
}

int64_t SliceIndexer::globalIndex(const std::vector<int64_t>& coord) const {
  int64_t g = 0;
  for (size_t d = 0; d < coord.size(); ++d) g += (slice_.offsets[d] + coord[d]) * global_strides_[d];
  return g;
}

// ---- Dropout -----------------------------------------------------------------------

void DropoutKey::setStep(int64_t new_step, int64_t new_micro_batch) {
  checkCounterWord(new_step, "step");
  checkCounterWord(new_micro_batch, "micro_batch");
  step = new_step;
  micro_batch = new_micro_batch;
}

at::Tensor dropoutMask(const DropoutKey& key, double p, const std::vector<int64_t>& globalShape,
                       const TensorSlice& slice, at::ScalarType dtype) {
  TESSERA_CHECK_ARG(p >= 0 && p < 1, "dropout probability must be in [0, 1), got " << p);
  TESSERA_CHECK_ARG(at::isFloatingType(dtype), "dropout mask dtype must be floating, got " << dtype);
  checkCounterWord(key.step, "step");
  checkCounterWord(key.micro_batch, "micro_batch");
  const SliceIndexer indexer(globalShape, slice);
  const auto k = splitKey(streamKey(key.seed, "dropout:" + std::to_string(key.site)));
  const auto step = static_cast<uint32_t>(key.step);
  const auto micro = static_cast<uint32_t>(key.micro_batch);
  // Keep when the element's word >= threshold: P(keep) = 1 - threshold / 2^32.
  const auto threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  const double scale = 1.0 / (1.0 - p);

  at::Tensor mask = at::empty({indexer.numel()}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dropoutMask", [&] {
    scalar_t* out = mask.data_ptr<scalar_t>();
    const auto kept = static_cast<scalar_t>(scale);
    const auto dropped = static_cast<scalar_t>(0);
    at::parallel_for(0, indexer.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      indexer.forRuns(begin, end, [&](int64_t local, int64_t global, int64_t length) {
        // One Philox block serves 4 consecutive global elements.
        for (int64_t i = 0; i < length;) {
          const int64_t g = global + i;
          const int64_t block = g >> 2;
          const auto words =
              philox4x32({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), step, micro}, k);
          for (int64_t w = g & 3; w < 4 && i < length; ++w, ++i) {
            out[local + i] = words[static_cast<size_t>(w)] >= threshold ? kept : dropped;
          }
        }
      });
    });
  });
  return slice.isWholeBox() ? mask.view(slice.sizes) : mask;
}

at::Tensor dropout(const at::Tensor& x, double p, bool training, const DropoutKey& key) {
  const auto shape = x.sizes().vec();
  return dropout(x, p, training, key, shape, TensorSlice::whole(shape));
}

at::Tensor dropout(const at::Tensor& x, double p, bool training, const DropoutKey& key,
                   const std::vector<int64_t>& globalShape, const TensorSlice& slice) {
  TESSERA_CHECK_ARG(p >= 0 && p < 1, "dropout probability must be in [0, 1), got " << p);
  if (!training || p == 0) return x;
  const bool fits = slice.isWholeBox() ? x.sizes().vec() == slice.sizes : x.dim() == 1 && x.numel() == slice.numel;
  TESSERA_CHECK_ARG(fits, "dropout: x has shape " << x.sizes() << " but is said to hold the slice " << slice.text()
                                                  << " of " << shapeText(globalShape));
  // The mask is a constant of the graph: autograd multiplies the gradient by
  // the same mask (no generator state to replay in backward or recomputation).
  return x * dropoutMask(key, p, globalShape, slice, x.scalar_type()).to(x.device());  // x * mask / (1 - p)
}

}  // namespace tessera::models
