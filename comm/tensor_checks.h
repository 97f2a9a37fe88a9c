// Private to comm/: argument checks shared by every backend, so each backend
// rejects bad tensors and counts with the same message.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tessera::comm::detail {

// Throws InvalidArgument unless t is contiguous, of a supported dtype, and on
// a CPU (or, with allowCuda, CUDA) device. `what` names the operation/argument.
void checkTensor(const at::Tensor& t, const std::string& what, bool allowCuda = false);
// Throws InvalidArgument unless a and b have the same dtype.
void checkSameDtype(const at::Tensor& a, const at::Tensor& b, const std::string& what);

// Expands empty counts to an equal split of total over size ranks (total must
// divide), or checks that explicit counts have size entries, are >= 0 and sum
// to total. `what` names the operation and argument in the error.
std::vector<int64_t> resolveCounts(std::vector<int64_t> counts, int64_t total, int size,
                                   const std::string& what);
// offsets[r] = counts[0] + ... + counts[r-1].
std::vector<int64_t> exclusiveOffsets(const std::vector<int64_t>& counts);

// "float32", "bfloat16", ...
std::string dtypeName(at::ScalarType type);
int64_t byteSize(const at::Tensor& t);

}  // namespace tessera::comm::detail
