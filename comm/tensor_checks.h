// Private to comm/: argument checks shared by every backend, so each backend
// rejects bad tensors and counts with the same message.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/diagnosis.h"
#include "tessera/comm/communicator.h"

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

// The argument rules of the split collectives, shared by every backend (the
// tensors themselves are checked by the caller, which knows its device).
// Each checks that input and output dtypes match, resolves counts (see
// resolveCounts) and checks this rank's side against them; throws InvalidArgument.
//   reduceScatter: input has sum(counts) elements, output counts[rank].
std::vector<int64_t> reduceScatterCounts(const at::Tensor& input, const at::Tensor& output,
                                         std::vector<int64_t> counts, int rank, int size, const std::string& what);
//   allGather: output has sum(counts) elements, input counts[rank].
std::vector<int64_t> allGatherCounts(const at::Tensor& input, const at::Tensor& output,
                                     std::vector<int64_t> counts, int rank, int size, const std::string& what);
//   allToAll: input has sum(sendCounts) elements, output sum(recvCounts).
void allToAllCounts(const at::Tensor& input, const at::Tensor& output, std::vector<int64_t>* sendCounts,
                    std::vector<int64_t>* recvCounts, int size, const std::string& what);

// The OpInfo of a backend's collective number `seq` (tensor may be null).
OpInfo makeOpInfo(OpKind kind, uint64_t seq, const at::Tensor* tensor, int64_t numel, int peer = -1,
                  uint64_t countsDigest = 0);

// Collective over `parent` (CPU backends): every rank's (color, key) for split().
std::vector<std::pair<int64_t, int64_t>> gatherColorKeys(Communicator& parent, int color, int key);

// split(color, key): colorKey[r] is parent rank r's (color, key). Returns the
// parent ranks that chose `color`, ordered by (key, parent rank) -- the
// child's rank order, the same on every backend. Empty for color < 0.
std::vector<int> splitMembers(const std::vector<std::pair<int64_t, int64_t>>& colorKey, int64_t color);

// "float32", "bfloat16", ...
std::string dtypeName(at::ScalarType type);
int64_t byteSize(const at::Tensor& t);

}  // namespace tessera::comm::detail
