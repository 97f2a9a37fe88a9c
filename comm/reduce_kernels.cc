#include "comm/reduce_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "tessera/core/error.h"

namespace tessera::comm::detail {
namespace {

struct Sum {
  template <typename T>
  static T apply(T a, T b) { return a + b; }
};
struct Max {
  template <typename T>
  static T apply(T a, T b) { return std::max(a, b); }
};
struct Min {
  template <typename T>
  static T apply(T a, T b) { return std::min(a, b); }
};

// Plain loops over restrict-free pointers: GCC vectorizes these at -O2/-O3
// (it versions the loop for aliasing), which keeps reductions at memory speed.
template <typename T, typename Op>
void reduceNative(void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(Op::apply(x[i], y[i]));
}

// 16-bit floats: widen to float, reduce, round once.
template <typename T, typename Op>
void reduceWidened(void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) {
    out[i] = T(Op::apply(static_cast<float>(x[i]), static_cast<float>(y[i])));
  }
}

template <typename Op>
ReduceFn forOp(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return &reduceNative<float, Op>;
    case at::kDouble: return &reduceNative<double, Op>;
    case at::kInt: return &reduceNative<int32_t, Op>;
    case at::kLong: return &reduceNative<int64_t, Op>;
    case at::kByte: return &reduceNative<uint8_t, Op>;
    case at::kChar: return &reduceNative<int8_t, Op>;
    case at::kBFloat16: return &reduceWidened<c10::BFloat16, Op>;
    case at::kHalf: return &reduceWidened<c10::Half, Op>;
    default:
      throw InvalidArgument(std::string("no reduction for dtype ") + c10::toString(type));
  }
}

template <typename T>
void divideTyped(void* data, size_t n, int divisor) {
  T* p = static_cast<T*>(data);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<T>(p[i] / static_cast<T>(divisor));
}

template <typename T>
void divideWidened(void* data, size_t n, int divisor) {
  T* p = static_cast<T*>(data);
  const float inv = static_cast<float>(divisor);
  for (size_t i = 0; i < n; ++i) p[i] = T(static_cast<float>(p[i]) / inv);
}

}  // namespace

ReduceFn reduceFunction(at::ScalarType type, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return forOp<Sum>(type);
    case ReduceOp::kMax: return forOp<Max>(type);
    case ReduceOp::kMin: return forOp<Min>(type);
  }
  throw InvalidArgument("unknown reduce op");
}

void divideInPlace(void* data, size_t n, at::ScalarType type, int divisor) {
  switch (type) {
    case at::kFloat: return divideTyped<float>(data, n, divisor);
    case at::kDouble: return divideTyped<double>(data, n, divisor);
    case at::kInt: return divideTyped<int32_t>(data, n, divisor);
    case at::kLong: return divideTyped<int64_t>(data, n, divisor);
    case at::kByte: return divideTyped<uint8_t>(data, n, divisor);
    case at::kChar: return divideTyped<int8_t>(data, n, divisor);
    case at::kBFloat16: return divideWidened<c10::BFloat16>(data, n, divisor);
    case at::kHalf: return divideWidened<c10::Half>(data, n, divisor);
    default:
      throw InvalidArgument(std::string("no division for dtype ") + c10::toString(type));
  }
}

}  // namespace tessera::comm::detail
