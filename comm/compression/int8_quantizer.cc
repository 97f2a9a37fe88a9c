// The int8 quantizer's kernels. Compiled with -O3 (see CMakeLists.txt) and no
// -march: the loops below are shaped so that GCC vectorizes them with the
// baseline instruction set (SSE2 on x86-64), which every CI machine has; one
// loop spells SSE2 out, with a plain fallback elsewhere.
//
// Where the time goes, and why the loops look the way they do:
// - The norm: a float reduction does not vectorize without -ffast-math, so
//   the sum of squares runs on 32 explicit independent accumulators (eight
//   4-wide vectors), flushed into a double every block.
// - Codes and bucket sums are fused per block of kBlock elements: the codes
//   loop is SSE2 (see encodeBlock); the bucket loop is a scatter that cannot be, so it
//   spreads its updates over kTables partial tables (consecutive elements in
//   the same bin would otherwise wait on each other's store) and keeps
//   {sum, count} as one pair of doubles, updated by a single 16-byte
//   add. The block's floats and codes are still in L1 when it runs.
// - Bucket sums are doubles so that k copies of one float average back to
//   exactly that float (exact for up to 2^29 elements per bin).
#include "comm/compression/int8_quantizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tessera::comm::int8 {
namespace {

constexpr int64_t kBlock = 2048;  // elements per fused block: 8 KiB of floats + 2 KiB of codes
constexpr int kTables = 8;        // partial bucket tables
constexpr int kNormLanes = 32;    // independent accumulators of the norm pass

// Sum of squares in float partials; +inf/NaN when x holds a non-finite value
// (squares are >= 0, so nothing cancels) or a partial sum overflows.
double sumSquaresFast(const float* __restrict x, int64_t n) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float acc[kNormLanes] = {};
    int64_t i = start;
    for (; i + kNormLanes <= end; i += kNormLanes) {
      for (int j = 0; j < kNormLanes; ++j) acc[j] += x[i + j] * x[i + j];
    }
    for (; i < end; ++i) acc[0] += x[i] * x[i];
    float blockSum = 0;
    for (int j = 0; j < kNormLanes; ++j) blockSum += acc[j];
    total += blockSum;
  }
  return total;
}

// The slow, exact path, only taken when the fast sum is not finite: tells a
// real NaN/Inf (returns -1) from float32 overflow of finite squares.
double sumSquaresCareful(const float* x, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return -1;
    total += static_cast<double>(x[i]) * x[i];
  }
  return total;
}

// Sum of squares, or -1 when x holds a non-finite value.
double sumSquares(const float* x, int64_t n) {
  const double fast = sumSquaresFast(x, n);
  return std::isfinite(fast) ? fast : sumSquaresCareful(x, n);
}

float scaleFromSumSquares(double sumSq, int64_t n) {
  const double variance = sumSq / static_cast<double>(std::max<int64_t>(n - 1, 1));
  return static_cast<float>(kRangeInSigmas * std::sqrt(variance) / kBins);
}

// codes[i] = clamp(round(x[i] * inverseScale) + 128, 0, 255). Rounds half up
// (floor of y + 0.5 once y >= 0): any rounding works, the table stores means.
float codeOf(float x, float inverseScale) {
  const float y = x * inverseScale + (kZeroPoint + 0.5f);
  return std::min(std::max(y, 0.0f), 255.0f);
}

void encodeBlock(const float* __restrict x, int64_t n, float inverseScale, uint8_t* __restrict codes) {
  int64_t i = 0;
#if defined(__SSE2__)
  // GCC turns the scalar loop's clamp and float->uint8 narrowing into masks
  // and shuffles (3.5 GB/s); with SSE2 spelled out it is min/max, one
  // conversion and two saturating packs per 16 values (15 GB/s). SSE2 is
  // part of x86-64 itself, so this needs no -march flag.
  const __m128 scale = _mm_set1_ps(inverseScale);
  const __m128 offset = _mm_set1_ps(kZeroPoint + 0.5f);
  const __m128 lowest = _mm_setzero_ps();
  const __m128 highest = _mm_set1_ps(255.0f);
  for (; i + 16 <= n; i += 16) {
    __m128i q[4];
    for (int k = 0; k < 4; ++k) {
      __m128 y = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(x + i + 4 * k), scale), offset);
      q[k] = _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(y, lowest), highest));
    }
    // int32 -> int16 (values are in [0, 255], so saturation never bites) -> uint8.
    const __m128i low = _mm_packs_epi32(q[0], q[1]);
    const __m128i high = _mm_packs_epi32(q[2], q[3]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(low, high));
  }
#endif
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(static_cast<int32_t>(codeOf(x[i], inverseScale)));
}

struct alignas(16) Bucket {
  double sum;
  double count;
};

// Adds the block's values and counts into the partial tables.
void accumulateBuckets(const float* __restrict x, const uint8_t* __restrict codes, int64_t n,
                       Bucket (*__restrict tables)[kBins]) {
  int64_t i = 0;
  for (; i + kTables <= n; i += kTables) {
    for (int t = 0; t < kTables; ++t) {
      Bucket& b = tables[t][codes[i + t]];
      b.sum += x[i + t];
      b.count += 1.0;
    }
  }
  for (; i < n; ++i) {
    Bucket& b = tables[0][codes[i]];
    b.sum += x[i];
    b.count += 1.0;
  }
}

void writeTable(const Bucket (*tables)[kBins], int tableCount, float* table) {
  for (int k = 0; k < kBins; ++k) {
    double sum = 0, count = 0;
    for (int t = 0; t < tableCount; ++t) {
      sum += tables[t][k].sum;
      count += tables[t][k].count;
    }
    table[k] = count > 0 ? static_cast<float>(sum / count) : 0.0f;
  }
}

}  // namespace

float quantizationScale(const float* x, int64_t n) {
  if (n <= 0) return 0.0f;
  const double sumSq = sumSquares(x, n);
  return sumSq < 0 ? -1.0f : scaleFromSumSquares(sumSq, n);
}

bool quantize(const float* x, int64_t n, uint8_t* codes, float* table) {
  const float scale = quantizationScale(x, n);
  if (scale < 0) return false;
  // All zeros (or empty): every value is the zero point, whose mean is 0.
  const float inverseScale = scale > 0 ? 1.0f / scale : 0.0f;
  Bucket tables[kTables][kBins];
  std::memset(tables, 0, sizeof(tables));
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    encodeBlock(x + start, len, inverseScale, codes + start);
    accumulateBuckets(x + start, codes + start, len, tables);
  }
  writeTable(tables, kTables, table);
  return true;
}

void dequantize(const uint8_t* __restrict codes, const float* __restrict table, int64_t n, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]];
}

void dequantizeAccumulate(const uint8_t* __restrict codes, const float* __restrict table, int64_t n,
                          float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += table[codes[i]];
}

bool quantizeNaive(const float* x, int64_t n, uint8_t* codes, float* table) {
  double sumSq = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    sumSq += static_cast<double>(x[i]) * x[i];
  }
  const float scale = n > 0 ? scaleFromSumSquares(sumSq, n) : 0.0f;
  Bucket buckets[1][kBins];
  std::memset(buckets, 0, sizeof(buckets));
  for (int64_t i = 0; i < n; ++i) {
    const float q = scale > 0 ? std::nearbyint(x[i] / scale) : 0.0f;
    const int code = static_cast<int>(std::clamp(q + kZeroPoint, 0.0f, 255.0f));
    codes[i] = static_cast<uint8_t>(code);
    buckets[0][code].sum += x[i];
    buckets[0][code].count += 1.0;
  }
  writeTable(buckets, 1, table);
  return true;
}

}  // namespace tessera::comm::int8
