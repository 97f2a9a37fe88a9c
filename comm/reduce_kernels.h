// Private to comm/: element-wise reductions for every supported dtype, in the
// signature Gloo's AllreduceOptions::setReduceFunction expects, so Gloo, the
// ring algorithms and the MPI user ops all reduce with the same code.
// bfloat16/float16 are reduced in float32 and rounded to nearest-even once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

#include "tessera/comm/types.h"

namespace tessera::comm::detail {

// c[i] = op(a[i], b[i]) for i < n; c may alias a or b.
using ReduceFn = void (*)(void* c, const void* a, const void* b, size_t n);

// The function for (dtype, op). kAvg reduces as kSum (divide afterwards with
// divideInPlace). Throws InvalidArgument for unsupported dtypes.
ReduceFn reduceFunction(at::ScalarType type, ReduceOp op);

// data[i] /= divisor (integers: truncating division).
void divideInPlace(void* data, size_t n, at::ScalarType type, int divisor);

}  // namespace tessera::comm::detail
