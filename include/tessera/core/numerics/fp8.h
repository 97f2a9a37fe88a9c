// The two 8-bit floating-point formats of the OCP 8-bit Floating Point
// Specification (2023), REFERENCE.md §10, and their conversions from and to
// fp32 and bf16. FP8 values are stored as uint8 codes (libtorch 1.13 has no
// float8 dtype); a build against a libtorch with at::kFloat8_e4m3fn /
// at::kFloat8_e5m2 also converts codes to and from those dtypes
// (TESSERA_HAS_TORCH_FLOAT8), bit for bit.
//
//   E4M3 ("FN"): bias 7, 3 mantissa bits; largest finite +-448 (S.1111.110);
//                NaN only at S.1111.111 (0x7F, 0xFF); no infinities;
//                smallest normal 2^-6, smallest subnormal 2^-9.
//   E5M2:        bias 15, 2 mantissa bits; largest finite +-57344; +-inf at
//                S.11111.00, NaN at S.11111.{01,10,11}; smallest normal 2^-14,
//                smallest subnormal 2^-16.
//
// Encoding rounds to nearest, ties to even, keeps subnormals and the sign of
// zero, and keeps NaN a NaN (0x7F with the sign in both formats: the code
// torch writes, so the non-saturating mode is bit-identical to torch's
// conversion). Finite values beyond the largest finite one (E4M3: above 464,
// the midpoint of 448 and 480, which rounds to 448; E5M2: from 61440, the
// midpoint of 57344 and 65536, which rounds to even, i.e. up):
//   Overflow::kSaturate      -> +-max (what Transformer Engine's and torchao's
//                               scaled casts do: they clamp before casting);
//                               +-inf also saturates in E4M3 and stays inf in E5M2.
//   Overflow::kNonSaturating -> E4M3: NaN; E5M2: +-inf (torch's plain
//                               .to(float8_*) behaviour).
// Each caller says which it uses: tessera's scaled casts (recipes, FP8
// communication) saturate.
//
// bf16 input is widened exactly to fp32 first, so bf16 -> fp8 equals
// fp32 -> fp8 of the same value (a single rounding).
//
// Nothing here allocates except the tensor functions; the raw-buffer loops are
// written so GCC vectorizes them at -O3 (no intrinsics, no -march flags).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace tessera::numerics {

enum class Fp8Format { kE4M3, kE5M2 };
enum class Overflow { kSaturate, kNonSaturating };

const char* toString(Fp8Format format);  // "e4m3", "e5m2"
// Throws ConfigError naming `field` and the valid values.
Fp8Format parseFp8Format(const std::string& value, const std::string& field);

// Largest finite value: 448 (E4M3), 57344 (E5M2).
float fp8Max(Fp8Format format);

// One value. decode is exact (every code is an fp32 value).
uint8_t encodeFp8(float value, Fp8Format format, Overflow overflow);
float decodeFp8(uint8_t code, Fp8Format format);

// Buffers: codes[i] = encode(x[i] * scale); out[i] = decode(codes[i]) * inverseScale.
// The product x[i] * scale is rounded to fp32 first (one fp32 multiply, then
// one RNE to fp8), which is what the tensor emulation below and the reference
// in tests compute. scale = 1 encodes x itself.
void encodeFp8(const float* x, int64_t n, float scale, uint8_t* codes, Fp8Format format, Overflow overflow);
void encodeFp8Bf16(const uint16_t* x, int64_t n, float scale, uint8_t* codes, Fp8Format format, Overflow overflow);
void decodeFp8(const uint8_t* codes, int64_t n, float inverseScale, float* out, Fp8Format format);
// acc[i] += decode(codes[i]) * inverseScale (fp32 accumulation; the FP8 ring's hop).
void decodeFp8Accumulate(const uint8_t* codes, int64_t n, float inverseScale, float* acc, Fp8Format format);

// Tensors (CPU). x: float32 or bfloat16, any shape; `scale` a float32 tensor
// broadcastable to x (a scalar, a per-row column, a per-block grid expanded
// by the caller). Returns uint8 codes of x's shape: encode(x * scale).
// Throws InvalidArgument naming the dtype or device it does not take.
at::Tensor encodeFp8(const at::Tensor& x, const at::Tensor& scale, Fp8Format format, Overflow overflow);
// float32 of codes' shape: decode(codes) / scale (scale broadcastable, as above;
// undefined scale: 1).
at::Tensor decodeFp8(const at::Tensor& codes, const at::Tensor& scale, Fp8Format format);

// True when this build's libtorch has float8 dtypes (torch >= 2.1).
bool torchHasFloat8();
// Reinterprets uint8 codes as torch's float8 dtype of `format` and back
// (the bytes are the same; no conversion). Throws NotSupported naming the
// torch version where torchHasFloat8() is false.
at::Tensor codesAsTorchFloat8(const at::Tensor& codes, Fp8Format format);
at::Tensor torchFloat8AsCodes(const at::Tensor& values);

}  // namespace tessera::numerics
