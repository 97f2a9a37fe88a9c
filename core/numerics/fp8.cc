// The FP8 codecs of fp8.h. Compiled with -O3 (core/numerics/CMakeLists.txt)
// and no -march flags: the encode loop below is branch-free 32-bit integer
// arithmetic (adds, constant shifts, compares and selects) that GCC
// vectorizes with the baseline SSE2 instruction set.
//
// How one fp32 value v becomes a code (|v| bits u, sign s):
//   normal range (|v| >= smallest normal): add the exponent re-bias and the
//     round-to-nearest-even bias (half an fp8 ulp minus one, plus the lowest
//     kept mantissa bit) to u, then shift the mantissa into place; a carry
//     out of the mantissa correctly bumps the exponent.
//   subnormal range: |v| + 2^(emin - m + 23) in fp32 lands on a float whose
//     ulp is the fp8 subnormal step, so the hardware's own RNE add does the
//     rounding; the code is the sum's bits minus the magic's bits (the
//     result 2^m, the smallest normal, is the right code too).
//   a result above the largest finite code is an overflow, resolved by the
//     mode (fp8.h); NaN -> 0x7F.
// The same steps as c10's fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value,
// so the non-saturating mode is bit-identical to torch's .to(float8_*).
//
// Decoding is a table lookup: 256 floats per format, built once from the bit
// fields.
#include "tessera/core/numerics/fp8.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define TESSERA_HAS_TORCH_FLOAT8 1
#else
#define TESSERA_HAS_TORCH_FLOAT8 0
#endif

namespace tessera::numerics {
namespace {

constexpr uint32_t kFp32AbsMask = 0x7FFFFFFFu;
constexpr int32_t kFp32InfBits = 0x7F800000;
constexpr uint32_t kNanCode = 0x7F;  // S.1111.111 (E4M3) / S.11111.11 (E5M2), as torch writes NaN

// Bit layout and overflow codes of one format; everything a loop needs is a
// compile-time constant, so each (format, mode) pair gets its own loop.
template <Fp8Format kFormat, Overflow kOverflow>
struct Codec {
  static constexpr bool kE4M3 = kFormat == Fp8Format::kE4M3;
  static constexpr int kMantissaBits = kE4M3 ? 3 : 2;
  static constexpr int kBias = kE4M3 ? 7 : 15;
  static constexpr int kShift = 23 - kMantissaBits;  // fp32 mantissa bits dropped
  static constexpr bool kSaturate = kOverflow == Overflow::kSaturate;
  static constexpr int32_t kMaxCode = kE4M3 ? 0x7E : 0x7B;  // +448 / +57344
  static constexpr int32_t kInfCode = 0x7C;                  // E5M2 only
  // Codes for |v| beyond the largest finite value, per input kind.
  static constexpr int32_t kFiniteOverflowCode = kSaturate ? kMaxCode : (kE4M3 ? int32_t{kNanCode} : kInfCode);
  static constexpr int32_t kInfInputCode = kE4M3 ? (kSaturate ? kMaxCode : int32_t{kNanCode}) : kInfCode;
  // fp32 bits of the smallest normal, 2^(1 - bias).
  static constexpr int32_t kMinNormalBits = (127 - kBias + 1) << 23;
  // fp32 bits of 2^(1 - bias - m + 23): adding |v| rounds it to the subnormal step.
  static constexpr uint32_t kDenormMagicBits = uint32_t{127 - kBias + 23 - kMantissaBits + 1} << 23;
  // Re-bias (2^-(127 - bias) in exponent units, wraps as unsigned) + half an ulp - 1.
  static constexpr uint32_t kNormalBias = (uint32_t{kBias} << 23) - (uint32_t{127} << 23) + ((1u << (kShift - 1)) - 1);

  static inline uint32_t encodeBits(uint32_t bits) {
    const uint32_t sign = (bits >> 24) & 0x80u;
    const uint32_t magnitude = bits & kFp32AbsMask;
    const int32_t u = static_cast<int32_t>(magnitude);  // >= 0: signed compares suffice (SSE2)

    const uint32_t odd = (magnitude >> kShift) & 1u;
    const int32_t normal = static_cast<int32_t>((magnitude + kNormalBias + odd) >> kShift);

    const float shifted = bitsToFloat(magnitude) + bitsToFloat(kDenormMagicBits);
    const int32_t subnormal = static_cast<int32_t>(floatToBits(shifted) - kDenormMagicBits);

    int32_t code = select(u < kMinNormalBits, subnormal, normal);
    const int32_t overflowCode =
        select(u > kFp32InfBits, int32_t{kNanCode}, select(u == kFp32InfBits, kInfInputCode, kFiniteOverflowCode));
    code = select(code > kMaxCode, overflowCode, code);
    return static_cast<uint32_t>(code) | sign;
  }

  // cond ? a : b through a mask: GCC does not if-convert the nested ?: of
  // encodeBits (the loop would not vectorize), but it does vectorize this.
  static inline int32_t select(bool cond, int32_t a, int32_t b) {
    const int32_t mask = -static_cast<int32_t>(cond);
    return (a & mask) | (b & ~mask);
  }

  static inline float bitsToFloat(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline uint32_t floatToBits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
  }

  static void encode(const float* __restrict x, int64_t n, float scale, uint8_t* __restrict codes) {
    for (int64_t i = 0; i < n; ++i) {
      codes[i] = static_cast<uint8_t>(encodeBits(floatToBits(x[i] * scale)));
    }
  }

  // bf16 -> fp32 is the bits shifted up (exact), then the same multiply.
  static void encodeBf16(const uint16_t* __restrict x, int64_t n, float scale, uint8_t* __restrict codes) {
    for (int64_t i = 0; i < n; ++i) {
      const float widened = bitsToFloat(uint32_t{x[i]} << 16);
      codes[i] = static_cast<uint8_t>(encodeBits(floatToBits(widened * scale)));
    }
  }
};

// The exact value of each code, from its bit fields.
std::array<float, 256> buildDecodeTable(Fp8Format format) {
  const bool e4m3 = format == Fp8Format::kE4M3;
  const int mantissaBits = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  const int exponentMask = e4m3 ? 0xF : 0x1F;
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) {
    const int magnitude = code & 0x7F;
    const int exponent = magnitude >> mantissaBits;
    const int mantissa = magnitude & ((1 << mantissaBits) - 1);
    float value;
    if (e4m3 && magnitude == 0x7F) {
      value = std::numeric_limits<float>::quiet_NaN();
    } else if (!e4m3 && exponent == exponentMask) {
      value = mantissa == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      value = std::ldexp(static_cast<float>(mantissa), 1 - bias - mantissaBits);
    } else {
      value = std::ldexp(static_cast<float>(mantissa + (1 << mantissaBits)), exponent - bias - mantissaBits);
    }
    table[static_cast<size_t>(code)] = (code & 0x80) ? -value : value;
  }
  return table;
}

const float* decodeTable(Fp8Format format) {
  static const std::array<float, 256> e4m3 = buildDecodeTable(Fp8Format::kE4M3);
  static const std::array<float, 256> e5m2 = buildDecodeTable(Fp8Format::kE5M2);
  return format == Fp8Format::kE4M3 ? e4m3.data() : e5m2.data();
}

template <typename Fn>
void dispatchCodec(Fp8Format format, Overflow overflow, Fn&& fn) {
  if (format == Fp8Format::kE4M3) {
    if (overflow == Overflow::kSaturate) {
      fn(Codec<Fp8Format::kE4M3, Overflow::kSaturate>{});
    } else {
      fn(Codec<Fp8Format::kE4M3, Overflow::kNonSaturating>{});
    }
  } else {
    if (overflow == Overflow::kSaturate) {
      fn(Codec<Fp8Format::kE5M2, Overflow::kSaturate>{});
    } else {
      fn(Codec<Fp8Format::kE5M2, Overflow::kNonSaturating>{});
    }
  }
}

// The broadcast of `scale` against a tensor of `sizes` must not grow it.
void checkScale(const at::Tensor& scale, at::IntArrayRef sizes, const char* function) {
  TESSERA_CHECK_ARG(scale.device().is_cpu() && scale.scalar_type() == at::kFloat,
                    function << ": scale must be a float32 CPU tensor, got " << scale.scalar_type() << " on "
                             << scale.device() << "; pass at::tensor(s) or a float32 column");
  TESSERA_CHECK_ARG(scale.dim() <= static_cast<int64_t>(sizes.size()),
                    function << ": scale of shape " << scale.sizes() << " does not broadcast to " << sizes);
  for (int64_t d = 1; d <= scale.dim(); ++d) {
    const int64_t s = scale.size(-d);
    const int64_t t = sizes[sizes.size() - static_cast<size_t>(d)];
    TESSERA_CHECK_ARG(s == 1 || s == t, function << ": scale of shape " << scale.sizes()
                                                 << " does not broadcast to " << sizes
                                                 << "; give one scale per row as a (rows, 1) column");
  }
}

}  // namespace

const char* toString(Fp8Format format) { return format == Fp8Format::kE4M3 ? "e4m3" : "e5m2"; }

Fp8Format parseFp8Format(const std::string& value, const std::string& field) {
  if (value == "e4m3") return Fp8Format::kE4M3;
  if (value == "e5m2") return Fp8Format::kE5M2;
  throw ConfigError(field, "unknown FP8 format '" + value + "'; use \"e4m3\" or \"e5m2\"");
}

float fp8Max(Fp8Format format) { return format == Fp8Format::kE4M3 ? 448.0f : 57344.0f; }

uint8_t encodeFp8(float value, Fp8Format format, Overflow overflow) {
  uint8_t code = 0;
  dispatchCodec(format, overflow, [&](auto codec) {
    code = static_cast<uint8_t>(decltype(codec)::encodeBits(decltype(codec)::floatToBits(value)));
  });
  return code;
}

float decodeFp8(uint8_t code, Fp8Format format) { return decodeTable(format)[code]; }

void encodeFp8(const float* x, int64_t n, float scale, uint8_t* codes, Fp8Format format, Overflow overflow) {
  dispatchCodec(format, overflow, [&](auto codec) { decltype(codec)::encode(x, n, scale, codes); });
}

void encodeFp8Bf16(const uint16_t* x, int64_t n, float scale, uint8_t* codes, Fp8Format format,
                   Overflow overflow) {
  dispatchCodec(format, overflow, [&](auto codec) { decltype(codec)::encodeBf16(x, n, scale, codes); });
}

void decodeFp8(const uint8_t* __restrict codes, int64_t n, float inverseScale, float* __restrict out,
               Fp8Format format) {
  const float* __restrict table = decodeTable(format);
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]] * inverseScale;
}

void decodeFp8Accumulate(const uint8_t* __restrict codes, int64_t n, float inverseScale, float* __restrict acc,
                         Fp8Format format) {
  const float* __restrict table = decodeTable(format);
  for (int64_t i = 0; i < n; ++i) acc[i] += table[codes[i]] * inverseScale;
}

// x * scale in fp32 by ATen (an IEEE multiply, as the buffer loop's), then the
// buffer encoder with scale 1. bf16 is widened first: a bf16 tensor times a
// 0-dim float scale would otherwise stay bf16 and round twice.
at::Tensor encodeFp8(const at::Tensor& x, const at::Tensor& scale, Fp8Format format, Overflow overflow) {
  TESSERA_CHECK_ARG(x.device().is_cpu(), "encodeFp8: x must be a CPU tensor, got one on " << x.device());
  TESSERA_CHECK_ARG(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "encodeFp8: x must be float32 or bfloat16, got " << x.scalar_type()
                                                                      << "; convert it with .to(at::kFloat)");
  checkScale(scale, x.sizes(), "encodeFp8");
  const at::Tensor scaled = at::mul(x.to(at::kFloat), scale).contiguous();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  encodeFp8(scaled.data_ptr<float>(), scaled.numel(), 1.0f, codes.data_ptr<uint8_t>(), format, overflow);
  return codes;
}

// decode(codes) / scale by a true division (ATen's at::div), so that a value
// encoded with a scale s comes back as the correctly rounded quotient; the
// buffer decoder multiplies by a precomputed inverse instead (faster, and
// equal to this where s is a power of two, which is what recipes pick).
at::Tensor decodeFp8(const at::Tensor& codes, const at::Tensor& scale, Fp8Format format) {
  TESSERA_CHECK_ARG(codes.device().is_cpu() && codes.scalar_type() == at::kByte,
                    "decodeFp8: codes must be a uint8 CPU tensor, got " << codes.scalar_type() << " on "
                                                                        << codes.device());
  const at::Tensor contiguous = codes.contiguous();
  at::Tensor values = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  decodeFp8(contiguous.data_ptr<uint8_t>(), contiguous.numel(), 1.0f, values.data_ptr<float>(), format);
  if (!scale.defined()) return values;
  checkScale(scale, codes.sizes(), "decodeFp8");
  return at::div(values, scale);
}

bool torchHasFloat8() { return TESSERA_HAS_TORCH_FLOAT8 != 0; }

#if TESSERA_HAS_TORCH_FLOAT8

at::Tensor codesAsTorchFloat8(const at::Tensor& codes, Fp8Format format) {
  TESSERA_CHECK_ARG(codes.scalar_type() == at::kByte,
                    "codesAsTorchFloat8: codes must be uint8, got " << codes.scalar_type());
  return codes.view(format == Fp8Format::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2);
}

at::Tensor torchFloat8AsCodes(const at::Tensor& values) {
  TESSERA_CHECK_ARG(values.scalar_type() == at::kFloat8_e4m3fn || values.scalar_type() == at::kFloat8_e5m2,
                    "torchFloat8AsCodes: values must be float8_e4m3fn or float8_e5m2, got "
                        << values.scalar_type());
  return values.view(at::kByte);
}

#else

namespace {
[[noreturn]] void throwNoTorchFloat8(const char* function) {
  throw NotSupported(std::string(function) + ": this build's libtorch " + TORCH_VERSION +
                     " has no float8 dtypes (they need torch >= 2.1); keep FP8 values as uint8 codes, "
                     "or rebuild tessera against a newer libtorch");
}
}  // namespace

at::Tensor codesAsTorchFloat8(const at::Tensor&, Fp8Format) { throwNoTorchFloat8("codesAsTorchFloat8"); }
at::Tensor torchFloat8AsCodes(const at::Tensor&) { throwNoTorchFloat8("torchFloat8AsCodes"); }

#endif

}  // namespace tessera::numerics
