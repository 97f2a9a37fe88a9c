// Private to comm/ (and the quantize benchmark): the int8 quantizer of the
// compressed all-reduce (REFERENCE §4, PRIME's compression.cpp), on raw
// float32 buffers.
//
//   std   = ||x|| / sqrt(n - 1)            (n = 1: |x|; all zeros: 0)
//   scale = 6 * std / 256                   (256 bins over about +-3 sigma)
//   code  = clamp(round(x / scale) + 128, 0, 255)
//   table[k] = mean of the x whose code is k (0 for empty bins)
//
// Decoding is a table lookup, so values that take at most 256 distinct
// values, each alone in its bin, come back exactly. Written for speed: plain
// loops over __restrict pointers that GCC vectorizes at -O3 without -march
// flags, and the code + bucket-sum passes fused block by block so the second
// pass reads from L1. Nothing here allocates or touches torch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tessera::comm::int8 {

constexpr int kBins = 256;
constexpr int kZeroPoint = 128;
constexpr double kRangeInSigmas = 6.0;

// Quantizes x[0..n) into codes[0..n) and table[0..256). Returns false, and
// writes nothing, when x holds a NaN or an infinity. Finite values whose
// squares overflow float32 are handled (the norm is then taken in double).
bool quantize(const float* x, int64_t n, uint8_t* codes, float* table);

// out[i] = table[codes[i]].
void dequantize(const uint8_t* codes, const float* table, int64_t n, float* out);

// acc[i] += table[codes[i]] (float32 accumulation).
void dequantizeAccumulate(const uint8_t* codes, const float* table, int64_t n, float* acc);

// The scale quantize() uses for x (0 for an empty or all-zero x); for tests.
// Returns a negative value when x holds a NaN or an infinity.
float quantizationScale(const float* x, int64_t n);

// The straightforward scalar version of quantize() (a pass per step, a
// division and std::nearbyint per value, one bucket table); the same
// quantizer up to ties at bin edges. Kept as the baseline the benchmark
// prints next to quantize().
bool quantizeNaive(const float* x, int64_t n, uint8_t* codes, float* table);

}  // namespace tessera::comm::int8
