#include "comm/tensor_checks.h"

#include <algorithm>
#include <numeric>

#include <ATen/ops/empty.h>

#include "tessera/core/error.h"

namespace tessera::comm::detail {

std::string dtypeName(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    default: return std::string("unsupported(") + c10::toString(type) + ")";
  }
}

void checkTensor(const at::Tensor& t, const std::string& what, bool allowCuda) {
  TESSERA_CHECK_ARG(t.defined(), what << ": tensor is undefined");
  TESSERA_CHECK_ARG(t.is_contiguous(), what << ": tensor must be contiguous (call .contiguous() first)");
  const bool deviceOk = t.device().is_cpu() || (allowCuda && t.device().is_cuda());
  TESSERA_CHECK_ARG(deviceOk, what << ": tensor is on " << t.device().str() << " but this backend needs "
                                   << (allowCuda ? "CPU or CUDA" : "CPU") << " tensors");
  TESSERA_CHECK_ARG(dtypeName(t.scalar_type()).rfind("unsupported", 0) != 0,
                    what << ": dtype " << c10::toString(t.scalar_type())
                         << " is not supported; use float32, float64, bfloat16, float16, int32, "
                            "int64, uint8 or int8");
}

void checkSameDtype(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  TESSERA_CHECK_ARG(a.scalar_type() == b.scalar_type(),
                    what << ": input is " << dtypeName(a.scalar_type()) << " but output is "
                         << dtypeName(b.scalar_type()) << "; they must match");
}

std::vector<int64_t> resolveCounts(std::vector<int64_t> counts, int64_t total, int size,
                                   const std::string& what) {
  if (counts.empty()) {
    TESSERA_CHECK_ARG(total % size == 0, what << ": " << total << " elements do not split evenly over "
                                              << size << " ranks; pass explicit counts");
    return std::vector<int64_t>(size, total / size);
  }
  TESSERA_CHECK_ARG(static_cast<int>(counts.size()) == size,
                    what << ": got " << counts.size() << " counts for a group of " << size << " ranks");
  for (size_t r = 0; r < counts.size(); ++r) {
    TESSERA_CHECK_ARG(counts[r] >= 0, what << ": counts[" << r << "] = " << counts[r] << " is negative");
  }
  const int64_t sum = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  TESSERA_CHECK_ARG(sum == total, what << ": counts sum to " << sum << " but the tensor has " << total
                                       << " elements");
  return counts;
}

std::vector<int64_t> exclusiveOffsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size(), 0);
  for (size_t r = 1; r < counts.size(); ++r) offsets[r] = offsets[r - 1] + counts[r - 1];
  return offsets;
}

std::vector<int64_t> reduceScatterCounts(const at::Tensor& input, const at::Tensor& output,
                                         std::vector<int64_t> counts, int rank, int size, const std::string& what) {
  checkSameDtype(input, output, what);
  counts = resolveCounts(std::move(counts), input.numel(), size, what);
  TESSERA_CHECK_ARG(output.numel() == counts[rank], what << ": output has " << output.numel()
                                                         << " elements but this rank's count is " << counts[rank]);
  return counts;
}

std::vector<int64_t> allGatherCounts(const at::Tensor& input, const at::Tensor& output,
                                     std::vector<int64_t> counts, int rank, int size, const std::string& what) {
  checkSameDtype(input, output, what);
  counts = resolveCounts(std::move(counts), output.numel(), size, what);
  TESSERA_CHECK_ARG(input.numel() == counts[rank], what << ": input has " << input.numel()
                                                        << " elements but this rank's count is " << counts[rank]);
  return counts;
}

void allToAllCounts(const at::Tensor& input, const at::Tensor& output, std::vector<int64_t>* sendCounts,
                    std::vector<int64_t>* recvCounts, int size, const std::string& what) {
  checkSameDtype(input, output, what);
  *sendCounts = resolveCounts(std::move(*sendCounts), input.numel(), size, what + " sendCounts");
  *recvCounts = resolveCounts(std::move(*recvCounts), output.numel(), size, what + " recvCounts");
}

OpInfo makeOpInfo(OpKind kind, uint64_t seq, const at::Tensor* tensor, int64_t numel, int peer,
                  uint64_t countsDigest) {
  OpInfo info;
  info.kind = kind;
  info.seq = seq;
  if (tensor != nullptr) info.dtype = dtypeName(tensor->scalar_type());
  info.numel = numel;
  info.peer = peer;
  info.countsDigest = countsDigest;
  return info;
}

std::vector<std::pair<int64_t, int64_t>> gatherColorKeys(Communicator& parent, int color, int key) {
  auto mine = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  mine.data_ptr<int64_t>()[0] = color;
  mine.data_ptr<int64_t>()[1] = key;
  auto all = at::empty({2 * parent.size()}, at::TensorOptions().dtype(at::kLong));
  parent.allGather(mine, all);
  std::vector<std::pair<int64_t, int64_t>> colorKey(parent.size());
  const int64_t* v = all.data_ptr<int64_t>();
  for (int r = 0; r < parent.size(); ++r) colorKey[r] = {v[2 * r], v[2 * r + 1]};
  return colorKey;
}

std::vector<int> splitMembers(const std::vector<std::pair<int64_t, int64_t>>& colorKey, int64_t color) {
  if (color < 0) return {};
  std::vector<std::pair<int64_t, int>> members;  // (key, parent rank)
  for (int r = 0; r < static_cast<int>(colorKey.size()); ++r) {
    if (colorKey[r].first == color) members.emplace_back(colorKey[r].second, r);
  }
  std::sort(members.begin(), members.end());
  std::vector<int> ranks;
  for (const auto& m : members) ranks.push_back(m.second);
  return ranks;
}

int64_t byteSize(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace tessera::comm::detail
