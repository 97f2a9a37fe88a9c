// The FP8 codecs (fp8.h) against the OCP spec (REFERENCE.md §10), through
// references written here from the spec alone: a decoder from the bit fields
// (std::ldexp) and an encoder that picks the nearest code by comparing with
// every finite code's value (ties to the even code), in double. Where the
// build's libtorch has float8 dtypes, also against torch's own conversion.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/numerics/fp8.h"

namespace tessera::numerics {
namespace {

constexpr Fp8Format kFormats[] = {Fp8Format::kE4M3, Fp8Format::kE5M2};
constexpr Overflow kModes[] = {Overflow::kSaturate, Overflow::kNonSaturating};
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

int mantissaBits(Fp8Format f) { return f == Fp8Format::kE4M3 ? 3 : 2; }
int bias(Fp8Format f) { return f == Fp8Format::kE4M3 ? 7 : 15; }
// The largest finite positive code: S.1111.110 / S.11110.11.
int maxCode(Fp8Format f) { return f == Fp8Format::kE4M3 ? 0x7E : 0x7B; }

// |value| of a non-negative code from its fields, specials ignored (so
// maxCode + 1 gives the first value past the largest: 480 / 65536).
double fieldValue(int code, Fp8Format f) {
  const int m = mantissaBits(f);
  const int exponent = code >> m;
  const int mantissa = code & ((1 << m) - 1);
  if (exponent == 0) return std::ldexp(static_cast<double>(mantissa), 1 - bias(f) - m);
  return std::ldexp(static_cast<double>((1 << m) + mantissa), exponent - bias(f) - m);
}

// The spec's value of any code, NaN and infinities included.
double specValue(int code, Fp8Format f) {
  const int magnitude = code & 0x7F;
  const double sign = (code & 0x80) ? -1.0 : 1.0;
  if (f == Fp8Format::kE4M3 && magnitude == 0x7F) return std::nan("");
  if (f == Fp8Format::kE5M2 && magnitude >= 0x7C) {
    return magnitude == 0x7C ? sign * std::numeric_limits<double>::infinity() : std::nan("");
  }
  return sign * fieldValue(magnitude, f);
}

// Nearest code by comparison with every finite value; ties go to the even
// code (the code's lowest bit is the mantissa's). Overflow per fp8.h.
uint8_t referenceEncode(float v, Fp8Format f, Overflow mode) {
  const int sign = std::signbit(v) ? 0x80 : 0;
  if (std::isnan(v)) return static_cast<uint8_t>(0x7F | sign);
  const bool e4m3 = f == Fp8Format::kE4M3;
  const bool saturate = mode == Overflow::kSaturate;
  const int overflowCode = saturate ? maxCode(f) : (e4m3 ? 0x7F : 0x7C);
  if (std::isinf(v)) return static_cast<uint8_t>((e4m3 ? overflowCode : 0x7C) | sign);
  const double a = std::fabs(static_cast<double>(v));
  const int top = maxCode(f) + 1;  // the virtual code past max
  int lo = 0;
  while (lo < top && fieldValue(lo + 1, f) <= a) ++lo;
  int code;
  if (lo == top) {
    code = top;
  } else {
    // 2a against the sum of neighbours: both exact in double.
    const double twiceA = 2 * a;
    const double sum = fieldValue(lo, f) + fieldValue(lo + 1, f);
    code = twiceA < sum ? lo : twiceA > sum ? lo + 1 : (lo % 2 == 0 ? lo : lo + 1);
  }
  if (code == top) code = overflowCode;
  return static_cast<uint8_t>(code | sign);
}

uint32_t bitsOf(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
float floatOf(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
// Same value bit for bit (any NaN equals any NaN).
bool sameFloat(float a, float b) { return (std::isnan(a) && std::isnan(b)) || bitsOf(a) == bitsOf(b); }

// Values at and around every boundary of `f`: each code's value, each
// midpoint and their fp32 neighbours, past max, tiny values; both signs.
std::vector<float> boundaryValues(Fp8Format f) {
  std::vector<float> out;
  auto addAround = [&](float v) {
    out.push_back(v);
    out.push_back(std::nextafter(v, kInf));
    out.push_back(std::nextafter(v, 0.0f));
  };
  for (int code = 0; code <= maxCode(f) + 1; ++code) {
    addAround(static_cast<float>(fieldValue(code, f)));
    if (code <= maxCode(f)) addAround(static_cast<float>((fieldValue(code, f) + fieldValue(code + 1, f)) / 2));
  }
  for (float v : {1e-30f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), 1e6f, 1e30f,
                  std::numeric_limits<float>::max(), kInf, kNan}) {
    out.push_back(v);
  }
  const size_t positives = out.size();
  for (size_t i = 0; i < positives; ++i) out.push_back(-out[i]);
  return out;
}

// Random fp32 bit patterns: fp8's exponent range and beyond, and all bits.
std::vector<float> randomValues(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<float> out;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits = gen();
    if (i % 4 != 0) {  // exponent within 2^-30 .. 2^20
      const uint32_t exponent = 127 - 30 + gen() % 51;
      bits = (bits & 0x807FFFFFu) | (exponent << 23);
    }
    out.push_back(floatOf(bits));
  }
  return out;
}

TEST(Fp8Codec, EveryCodeDecodesToItsSpecValue) {
  for (Fp8Format f : kFormats) {
    std::vector<uint8_t> codes(256);
    for (int c = 0; c < 256; ++c) codes[c] = static_cast<uint8_t>(c);
    std::vector<float> decoded(256);
    decodeFp8(codes.data(), 256, 1.0f, decoded.data(), f);
    for (int c = 0; c < 256; ++c) {
      const float expected = static_cast<float>(specValue(c, f));
      EXPECT_TRUE(sameFloat(decodeFp8(static_cast<uint8_t>(c), f), expected))
          << toString(f) << " code 0x" << std::hex << c << ": " << decodeFp8(static_cast<uint8_t>(c), f)
          << " vs " << expected;
      EXPECT_TRUE(sameFloat(decoded[c], expected)) << toString(f) << " buffer, code 0x" << std::hex << c;
    }
  }
  // Anchors from the spec's table.
  EXPECT_EQ(decodeFp8(0x7E, Fp8Format::kE4M3), 448.0f);
  EXPECT_EQ(decodeFp8(0x08, Fp8Format::kE4M3), std::ldexp(1.0f, -6));
  EXPECT_EQ(decodeFp8(0x01, Fp8Format::kE4M3), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(decodeFp8(0xFF, Fp8Format::kE4M3)));
  EXPECT_EQ(decodeFp8(0x7B, Fp8Format::kE5M2), 57344.0f);
  EXPECT_EQ(decodeFp8(0xFC, Fp8Format::kE5M2), -kInf);
  EXPECT_EQ(decodeFp8(0x04, Fp8Format::kE5M2), std::ldexp(1.0f, -14));
  EXPECT_EQ(decodeFp8(0x01, Fp8Format::kE5M2), std::ldexp(1.0f, -16));
  EXPECT_TRUE(std::signbit(decodeFp8(0x80, Fp8Format::kE5M2)));
  EXPECT_EQ(fp8Max(Fp8Format::kE4M3), 448.0f);
  EXPECT_EQ(fp8Max(Fp8Format::kE5M2), 57344.0f);
}

TEST(Fp8Codec, EncodingIsRoundToNearestEvenAtEveryBoundary) {
  for (Fp8Format f : kFormats) {
    for (Overflow mode : kModes) {
      for (int lo = 0; lo < maxCode(f); ++lo) {
        const int hi = lo + 1;
        const float low = static_cast<float>(fieldValue(lo, f));
        const float high = static_cast<float>(fieldValue(hi, f));
        const float mid = static_cast<float>((fieldValue(lo, f) + fieldValue(hi, f)) / 2);
        ASSERT_EQ(static_cast<double>(mid), (fieldValue(lo, f) + fieldValue(hi, f)) / 2);  // exact in fp32
        const int even = lo % 2 == 0 ? lo : hi;
        for (int sign : {0, 0x80}) {
          const float s = sign ? -1.0f : 1.0f;
          EXPECT_EQ(encodeFp8(s * low, f, mode), lo | sign) << toString(f) << " " << s * low;
          EXPECT_EQ(encodeFp8(s * high, f, mode), hi | sign) << toString(f) << " " << s * high;
          EXPECT_EQ(encodeFp8(s * mid, f, mode), even | sign) << toString(f) << " tie " << s * mid;
          EXPECT_EQ(encodeFp8(s * std::nextafter(mid, 0.0f), f, mode), lo | sign) << toString(f) << " " << mid;
          EXPECT_EQ(encodeFp8(s * std::nextafter(mid, kInf), f, mode), hi | sign) << toString(f) << " " << mid;
        }
      }
      for (float v : boundaryValues(f)) {
        EXPECT_EQ(encodeFp8(v, f, mode), referenceEncode(v, f, mode)) << toString(f) << " " << v;
      }
    }
  }
}

TEST(Fp8Codec, OverflowFollowsTheMode) {
  struct Case {
    Fp8Format format;
    float value;
    uint8_t saturating, nonSaturating;
  };
  const float e4m3Tie = 464.0f;    // halfway from 448 to 480 (odd mantissa): rounds to 448
  const float e5m2Tie = 61440.0f;  // halfway from 57344 to 65536 (even): rounds up, overflows
  const Case cases[] = {
      {Fp8Format::kE4M3, 448.0f, 0x7E, 0x7E},
      {Fp8Format::kE4M3, 450.0f, 0x7E, 0x7E},
      {Fp8Format::kE4M3, e4m3Tie, 0x7E, 0x7E},
      {Fp8Format::kE4M3, std::nextafter(e4m3Tie, kInf), 0x7E, 0x7F},
      {Fp8Format::kE4M3, 480.0f, 0x7E, 0x7F},
      {Fp8Format::kE4M3, -1e30f, 0xFE, 0xFF},
      {Fp8Format::kE4M3, std::numeric_limits<float>::max(), 0x7E, 0x7F},
      {Fp8Format::kE4M3, kInf, 0x7E, 0x7F},
      {Fp8Format::kE4M3, -kInf, 0xFE, 0xFF},
      {Fp8Format::kE4M3, kNan, 0x7F, 0x7F},
      {Fp8Format::kE4M3, -kNan, 0xFF, 0xFF},
      {Fp8Format::kE5M2, 57344.0f, 0x7B, 0x7B},
      {Fp8Format::kE5M2, std::nextafter(e5m2Tie, 0.0f), 0x7B, 0x7B},
      {Fp8Format::kE5M2, e5m2Tie, 0x7B, 0x7C},
      {Fp8Format::kE5M2, -65536.0f, 0xFB, 0xFC},
      {Fp8Format::kE5M2, 1e30f, 0x7B, 0x7C},
      {Fp8Format::kE5M2, kInf, 0x7C, 0x7C},
      {Fp8Format::kE5M2, -kInf, 0xFC, 0xFC},
      {Fp8Format::kE5M2, kNan, 0x7F, 0x7F},
      {Fp8Format::kE5M2, -kNan, 0xFF, 0xFF},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(encodeFp8(c.value, c.format, Overflow::kSaturate), c.saturating) << toString(c.format) << " " << c.value;
    EXPECT_EQ(encodeFp8(c.value, c.format, Overflow::kNonSaturating), c.nonSaturating)
        << toString(c.format) << " " << c.value;
  }
  // NaN stays NaN in every mode.
  for (Fp8Format f : kFormats) {
    for (Overflow mode : kModes) EXPECT_TRUE(std::isnan(decodeFp8(encodeFp8(kNan, f, mode), f)));
  }
}

TEST(Fp8Codec, UnderflowGoesToSubnormalsThenSignedZero) {
  for (Fp8Format f : kFormats) {
    const float s = static_cast<float>(fieldValue(1, f));  // smallest subnormal
    for (Overflow mode : kModes) {
      EXPECT_EQ(encodeFp8(s / 2, f, mode), 0x00) << toString(f);  // tie to the even zero
      EXPECT_EQ(encodeFp8(-s / 2, f, mode), 0x80) << toString(f);
      EXPECT_EQ(encodeFp8(std::nextafter(s / 2, kInf), f, mode), 0x01) << toString(f);
      EXPECT_EQ(encodeFp8(-std::nextafter(s / 2, kInf), f, mode), 0x81) << toString(f);
      EXPECT_EQ(encodeFp8(1.5f * s, f, mode), 0x02) << toString(f);
      EXPECT_EQ(encodeFp8(2.5f * s, f, mode), 0x02) << toString(f);
      EXPECT_EQ(encodeFp8(3.0f * s, f, mode), 0x03) << toString(f);
      EXPECT_EQ(encodeFp8(1e-30f, f, mode), 0x00) << toString(f);
      EXPECT_EQ(encodeFp8(-std::numeric_limits<float>::denorm_min(), f, mode), 0x80) << toString(f);
      EXPECT_EQ(encodeFp8(0.0f, f, mode), 0x00) << toString(f);
      EXPECT_EQ(encodeFp8(-0.0f, f, mode), 0x80) << toString(f);
    }
  }
}

TEST(Fp8Codec, RandomValuesMatchTheReference) {
  const std::vector<float> values = randomValues(40001, 7);
  for (Fp8Format f : kFormats) {
    for (Overflow mode : kModes) {
      std::vector<uint8_t> codes(values.size());
      encodeFp8(values.data(), static_cast<int64_t>(values.size()), 1.0f, codes.data(), f, mode);
      int mismatches = 0;
      for (size_t i = 0; i < values.size() && mismatches < 10; ++i) {
        const uint8_t expected = referenceEncode(values[i], f, mode);
        if (codes[i] != expected || encodeFp8(values[i], f, mode) != expected) {
          ++mismatches;
          ADD_FAILURE() << toString(f) << " " << values[i] << " (0x" << std::hex << bitsOf(values[i])
                        << "): buffer 0x" << int{codes[i]} << ", scalar 0x" << int{encodeFp8(values[i], f, mode)}
                        << ", reference 0x" << int{expected};
        }
      }
    }
  }
}

TEST(Fp8Codec, Bf16EncodesLikeTheSameFp32Value) {
  std::vector<uint16_t> bf16(65536);
  std::vector<float> widened(65536);
  for (uint32_t b = 0; b < 65536; ++b) {
    bf16[b] = static_cast<uint16_t>(b);
    widened[b] = floatOf(b << 16);
  }
  for (Fp8Format f : kFormats) {
    for (Overflow mode : kModes) {
      for (float scale : {1.0f, 3.0f, 0.3f}) {
        std::vector<uint8_t> fromBf16(65536), fromFp32(65536);
        encodeFp8Bf16(bf16.data(), 65536, scale, fromBf16.data(), f, mode);
        encodeFp8(widened.data(), 65536, scale, fromFp32.data(), f, mode);
        EXPECT_EQ(fromBf16, fromFp32) << toString(f) << " scale " << scale;
        if (scale == 1.0f) {
          for (uint32_t b = 0; b < 65536; b += 7) {
            ASSERT_EQ(fromBf16[b], referenceEncode(widened[b], f, mode)) << toString(f) << " bf16 0x" << std::hex << b;
          }
        }
      }
    }
  }
}

TEST(Fp8Codec, BuffersEqualTheScalarFunctions) {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t n : {1, 3, 17, 1001, 4099}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[i] = normal(gen) * std::ldexp(1.0f, static_cast<int>(gen() % 40) - 20);
    if (n > 10) {
      x[1] = kNan;
      x[2] = -kInf;
      x[3] = -0.0f;
      x[4] = 1e38f;
    }
    for (Fp8Format f : kFormats) {
      for (Overflow mode : kModes) {
        for (float scale : {1.0f, 3.7f, 0.0123f, std::ldexp(1.0f, -7)}) {
          std::vector<uint8_t> codes(static_cast<size_t>(n));
          encodeFp8(x.data(), n, scale, codes.data(), f, mode);
          for (int64_t i = 0; i < n; ++i) {
            const float product = x[i] * scale;
            ASSERT_EQ(codes[i], encodeFp8(product, f, mode)) << toString(f) << " n " << n << " i " << i;
          }
          const float inverse = 1.0f / scale;
          std::vector<float> out(static_cast<size_t>(n)), acc(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<float>(i) * 0.25f;
          decodeFp8(codes.data(), n, inverse, out.data(), f);
          decodeFp8Accumulate(codes.data(), n, inverse, acc.data(), f);
          for (int64_t i = 0; i < n; ++i) {
            const float value = decodeFp8(codes[i], f) * inverse;
            ASSERT_TRUE(sameFloat(out[i], value)) << toString(f) << " n " << n << " i " << i;
            ASSERT_TRUE(sameFloat(acc[i], static_cast<float>(i) * 0.25f + value)) << toString(f) << " i " << i;
          }
        }
      }
    }
  }
}

TEST(Fp8Codec, TensorsTakePerRowScales) {
  at::manual_seed(3);
  const at::Tensor x = at::randn({5, 33}) * 100;
  const at::Tensor scale = at::rand({5, 1}) * 4 + 0.1;
  for (Fp8Format f : kFormats) {
    const at::Tensor codes = encodeFp8(x, scale, f, Overflow::kSaturate);
    ASSERT_EQ(codes.scalar_type(), at::kByte);
    ASSERT_EQ(codes.sizes(), x.sizes());
    const at::Tensor values = decodeFp8(codes, scale, f);
    ASSERT_EQ(values.scalar_type(), at::kFloat);
    for (int64_t r = 0; r < 5; ++r) {
      const float s = scale[r][0].item<float>();
      for (int64_t c = 0; c < 33; ++c) {
        const uint8_t code = codes[r][c].item<uint8_t>();
        ASSERT_EQ(code, encodeFp8(x[r][c].item<float>() * s, f, Overflow::kSaturate)) << r << "," << c;
        ASSERT_TRUE(sameFloat(values[r][c].item<float>(), decodeFp8(code, f) / s)) << r << "," << c;
      }
    }
    // A transposed (non-contiguous) input with a per-column scale gives the transpose.
    const at::Tensor transposed = encodeFp8(x.t(), scale.t(), f, Overflow::kSaturate);
    EXPECT_TRUE(at::equal(transposed, codes.t()));
    EXPECT_TRUE(at::equal(decodeFp8(codes, at::Tensor(), f), decodeFp8(codes, at::ones({1}), f)));
  }
  // bf16 input with a 0-dim scale: widened first, one rounding.
  const at::Tensor xb = x.to(at::kBFloat16);
  const at::Tensor codes = encodeFp8(xb, at::scalar_tensor(0.37, at::kFloat), Fp8Format::kE4M3, Overflow::kSaturate);
  const at::Tensor widened = xb.to(at::kFloat).contiguous();
  std::vector<uint8_t> expected(static_cast<size_t>(widened.numel()));
  encodeFp8(widened.data_ptr<float>(), widened.numel(), 0.37f, expected.data(), Fp8Format::kE4M3, Overflow::kSaturate);
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), codes.contiguous().data_ptr<uint8_t>()));
  // Bad input names the problem.
  EXPECT_THROW(encodeFp8(x.to(at::kInt), scale, Fp8Format::kE4M3, Overflow::kSaturate), InvalidArgument);
  EXPECT_THROW(encodeFp8(x, at::ones({3, 1}), Fp8Format::kE4M3, Overflow::kSaturate), InvalidArgument);
  EXPECT_THROW(encodeFp8(x, at::ones({5, 1}, at::kDouble), Fp8Format::kE4M3, Overflow::kSaturate), InvalidArgument);
  EXPECT_THROW(decodeFp8(x, scale, Fp8Format::kE4M3), InvalidArgument);
}

TEST(Fp8Codec, FormatNamesParse) {
  EXPECT_EQ(parseFp8Format("e4m3", "f"), Fp8Format::kE4M3);
  EXPECT_EQ(parseFp8Format(toString(Fp8Format::kE5M2), "f"), Fp8Format::kE5M2);
  try {
    parseFp8Format("fp8", "precision.format");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "precision.format");
    EXPECT_NE(std::string(e.what()).find("e5m2"), std::string::npos) << e.what();
  }
}

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)

// Non-saturating mode is torch's plain .to(float8_*), bit for bit; decoding
// is torch's float8 -> float.
TEST(Fp8Codec, MatchesTorchFloat8BitForBit) {
  ASSERT_TRUE(torchHasFloat8());
  std::vector<float> values = randomValues(200001, 19);
  for (uint32_t b = 0; b < 65536; ++b) values.push_back(floatOf(b << 16));
  for (Fp8Format f : kFormats) {
    const std::vector<float> boundaries = boundaryValues(f);
    values.insert(values.end(), boundaries.begin(), boundaries.end());
  }
  const at::Tensor input = at::from_blob(values.data(), {static_cast<int64_t>(values.size())}, at::kFloat);
  for (Fp8Format f : kFormats) {
    const at::ScalarType dtype = f == Fp8Format::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
    const at::Tensor torchCodes = torchFloat8AsCodes(input.to(dtype)).contiguous();
    std::vector<uint8_t> codes(values.size());
    encodeFp8(values.data(), static_cast<int64_t>(values.size()), 1.0f, codes.data(), f, Overflow::kNonSaturating);
    const uint8_t* expected = torchCodes.data_ptr<uint8_t>();
    int mismatches = 0;
    for (size_t i = 0; i < values.size() && mismatches < 10; ++i) {
      if (codes[i] != expected[i]) {
        ++mismatches;
        ADD_FAILURE() << toString(f) << " " << values[i] << " (0x" << std::hex << bitsOf(values[i]) << "): 0x"
                      << int{codes[i]} << ", torch 0x" << int{expected[i]};
      }
    }
    const at::Tensor all = at::arange(256, at::kInt).to(at::kByte);
    const at::Tensor asTorch = codesAsTorchFloat8(all, f);
    ASSERT_EQ(asTorch.scalar_type(), dtype);
    EXPECT_TRUE(at::equal(torchFloat8AsCodes(asTorch), all));
    const at::Tensor torchValues = asTorch.to(at::kFloat);
    for (int c = 0; c < 256; ++c) {
      EXPECT_TRUE(sameFloat(torchValues[c].item<float>(), decodeFp8(static_cast<uint8_t>(c), f)))
          << toString(f) << " code " << c;
    }
  }
}

#else

TEST(Fp8Codec, TorchFloat8IsNotSupportedOnThisTorch) {
  EXPECT_FALSE(torchHasFloat8());
  const at::Tensor codes = at::zeros({4}, at::kByte);
  try {
    codesAsTorchFloat8(codes, Fp8Format::kE4M3);
    FAIL() << "expected NotSupported";
  } catch (const NotSupported& e) {
    EXPECT_NE(std::string(e.what()).find(TORCH_VERSION), std::string::npos) << e.what();
  }
  EXPECT_THROW(torchFloat8AsCodes(codes), NotSupported);
}

#endif

}  // namespace
}  // namespace tessera::numerics
