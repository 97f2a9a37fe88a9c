#include "tessera/core/state.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {

std::string shapeText(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

TensorSlice TensorSlice::whole(const std::vector<int64_t>& shape) {
  return box(std::vector<int64_t>(shape.size(), 0), shape);
}

TensorSlice TensorSlice::box(std::vector<int64_t> offsets, std::vector<int64_t> sizes) {
  TESSERA_CHECK_ARG(offsets.size() == sizes.size(), "TensorSlice: " << offsets.size() << " offsets for "
                                                                     << sizes.size() << " sizes");
  TensorSlice s;
  s.offsets = std::move(offsets);
  s.sizes = std::move(sizes);
  s.numel = s.boxNumel();
  return s;
}

TensorSlice TensorSlice::flatRange(const std::vector<int64_t>& shape, int64_t offset, int64_t numel) {
  return whole(shape).narrowFlat(offset, numel);
}

TensorSlice TensorSlice::narrowFlat(int64_t offset, int64_t count) const {
  TESSERA_CHECK_ARG(offset >= 0 && count >= 0 && offset + count <= numel,
                    "TensorSlice " << text() << ": flat range " << offset << "+" << count << " exceeds its "
                                   << numel << " elements");
  TensorSlice s = *this;
  s.flatOffset = flatOffset + offset;
  s.numel = count;
  return s;
}

int64_t TensorSlice::boxNumel() const {
  int64_t n = 1;
  for (int64_t d : sizes) n *= d;
  return n;
}

bool TensorSlice::isWhole(const std::vector<int64_t>& shape) const {
  if (sizes != shape || !isWholeBox()) return false;
  for (int64_t o : offsets) {
    if (o != 0) return false;
  }
  return true;
}

void TensorSlice::check(const std::vector<int64_t>& shape, const std::string& what) const {
  TESSERA_CHECK_ARG(offsets.size() == shape.size() && sizes.size() == shape.size(),
                    what << ": slice " << text() << " has " << sizes.size() << " dimension(s), the tensor "
                         << shapeText(shape) << " has " << shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    // Written so that no sum can overflow (slices arrive from files and peers).
    TESSERA_CHECK_ARG(offsets[d] >= 0 && sizes[d] >= 0 && offsets[d] <= shape[d] && sizes[d] <= shape[d] - offsets[d],
                      what << ": slice " << text() << " exceeds the tensor " << shapeText(shape)
                           << " along dim " << d);
  }
  TESSERA_CHECK_ARG(flatOffset >= 0 && numel >= 0 && flatOffset <= boxNumel() && numel <= boxNumel() - flatOffset,
                    what << ": slice " << text() << ": flat range exceeds its box of " << boxNumel()
                         << " elements");
}

std::string TensorSlice::text() const {
  std::ostringstream out;
  out << "[";
  for (size_t d = 0; d < std::min(sizes.size(), offsets.size()); ++d) {  // a malformed slice prints too
    out << (d ? ", " : "") << offsets[d] << ":" << offsets[d] + sizes[d];
  }
  out << "]";
  if (!isWholeBox()) out << " flat " << flatOffset << "+" << numel;
  return out.str();
}

bool TensorSlice::boxIntersects(const TensorSlice& other) const {
  if (sizes.size() != other.sizes.size()) return false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (std::max(offsets[d], other.offsets[d]) >= std::min(offsets[d] + sizes[d], other.offsets[d] + other.sizes[d])) {
      return false;
    }
  }
  return true;
}

std::vector<int64_t> TensorSlice::localShape() const {
  if (isWholeBox()) return sizes;
  return {numel};
}

void forEachOverlap(const TensorSlice& a, const TensorSlice& b,
                    const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const size_t n = a.sizes.size();
  TESSERA_CHECK_ARG(b.sizes.size() == n, "forEachOverlap: slices " << a.text() << " and " << b.text()
                                                                   << " have different ranks");
  if (a.numel == 0 || b.numel == 0) return;
  // The boxes' intersection [lo, hi).
  std::vector<int64_t> lo(n), hi(n);
  for (size_t d = 0; d < n; ++d) {
    lo[d] = std::max(a.offsets[d], b.offsets[d]);
    hi[d] = std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
    if (lo[d] >= hi[d]) return;
  }
  // A run spans dims k..n-1: the trailing dims that both boxes (and so the
  // intersection) span fully are contiguous in both, so merge them.
  size_t k = n == 0 ? 0 : n - 1;
  while (k > 0 && hi[k] - lo[k] == a.sizes[k] && hi[k] - lo[k] == b.sizes[k]) --k;
  int64_t run = 1;
  for (size_t d = k; d < n; ++d) run *= hi[d] - lo[d];
  std::vector<int64_t> aStride(n, 1), bStride(n, 1);
  for (size_t d = n; d-- > 1;) {
    aStride[d - 1] = aStride[d] * a.sizes[d];
    bStride[d - 1] = bStride[d] * b.sizes[d];
  }
  std::vector<int64_t> at = lo;  // odometer over dims [0, k); dims >= k stay at lo
  while (true) {
    int64_t aPos = -a.flatOffset, bPos = -b.flatOffset;
    for (size_t d = 0; d < n; ++d) {
      aPos += (at[d] - a.offsets[d]) * aStride[d];
      bPos += (at[d] - b.offsets[d]) * bStride[d];
    }
    // Positions grow with every run: past either flat range, nothing more overlaps.
    if (aPos >= a.numel || bPos >= b.numel) return;
    const int64_t from = std::max<int64_t>({0, -aPos, -bPos});
    const int64_t to = std::min({run, a.numel - aPos, b.numel - bPos});
    if (to > from) fn(aPos + from, bPos + from, to - from);
    size_t d = k;
    while (d > 0) {
      --d;
      if (++at[d] < hi[d]) break;
      at[d] = lo[d];
      if (d == 0) return;
    }
    if (k == 0) return;
  }
}

int64_t overlapCount(const TensorSlice& a, const TensorSlice& b) {
  int64_t count = 0;
  forEachOverlap(a, b, [&](int64_t, int64_t, int64_t n) { count += n; });
  return count;
}

int64_t copyOverlap(const TensorSlice& src, const at::Tensor& srcValues, const TensorSlice& dst,
                    const at::Tensor& dstValues) {
  TESSERA_CHECK_ARG(srcValues.numel() == src.numel && dstValues.numel() == dst.numel &&
                        srcValues.is_contiguous() && dstValues.is_contiguous() &&
                        srcValues.scalar_type() == dstValues.scalar_type(),
                    "copyOverlap: values of " << srcValues.numel() << " " << srcValues.scalar_type() << " for slice "
                                              << src.text() << " into " << dstValues.numel() << " "
                                              << dstValues.scalar_type() << " for slice " << dst.text()
                                              << " (contiguous tensors of the slices' sizes and one dtype needed)");
  const size_t element = srcValues.element_size();
  const auto* from = static_cast<const uint8_t*>(srcValues.data_ptr());
  auto* to = static_cast<uint8_t*>(dstValues.data_ptr());
  int64_t copied = 0;
  forEachOverlap(src, dst, [&](int64_t s, int64_t d, int64_t count) {
    std::memcpy(to + d * element, from + s * element, static_cast<size_t>(count) * element);
    copied += count;
  });
  return copied;
}

Coverage coverageOf(const std::vector<int64_t>& shape, const std::vector<TensorSlice>& slices) {
  const TensorSlice all = TensorSlice::whole(shape);
  std::vector<std::pair<int64_t, int64_t>> runs;  // global [begin, end)
  for (const TensorSlice& s : slices) {
    forEachOverlap(all, s, [&](int64_t global, int64_t, int64_t count) { runs.emplace_back(global, global + count); });
  }
  std::sort(runs.begin(), runs.end());
  Coverage out;
  int64_t end = 0;  // [0, end) seen so far, with gaps counted below
  for (const auto& [begin, stop] : runs) {
    if (begin > end && out.firstMissing < 0) out.firstMissing = end;
    if (stop > end) {
      out.covered += stop - std::max(begin, end);
      end = stop;
    }
  }
  if (end < all.numel && out.firstMissing < 0) out.firstMissing = end;
  return out;
}

std::string positionText(const std::vector<int64_t>& shape, int64_t index) {
  std::vector<int64_t> at(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    at[d] = shape[d] > 0 ? index % shape[d] : 0;
    index = shape[d] > 0 ? index / shape[d] : 0;
  }
  return shapeText(at);
}

int64_t StateTensor::globalNumel() const {
  int64_t n = 1;
  for (int64_t d : globalShape) n *= d;
  return n;
}

void StateTensor::checkPieces(const std::string& name) const {
  for (const StatePiece& p : pieces) {
    p.slice.check(globalShape, "tensor '" + name + "'");
    TESSERA_CHECK_ARG(p.local.defined() && p.local.numel() == p.slice.numel,
                      "tensor '" << name << "': the piece for slice " << p.slice.text() << " holds "
                                 << (p.local.defined() ? p.local.numel() : 0) << " elements, the slice "
                                 << p.slice.numel);
  }
}

void StateDict::putReplicated(const std::string& name, const at::Tensor& value) {
  StateTensor t;
  t.globalShape = value.sizes().vec();
  t.pieces.push_back(StatePiece{value.contiguous(), TensorSlice::whole(t.globalShape)});
  t.replicated = true;
  tensors[name] = std::move(t);
}

void StateDict::putPiece(const std::string& name, const std::vector<int64_t>& globalShape, const TensorSlice& slice,
                         const at::Tensor& value) {
  slice.check(globalShape, "tensor '" + name + "'");
  TESSERA_CHECK_ARG(value.numel() == slice.numel, "tensor '" << name << "': " << value.numel()
                                                             << " values for slice " << slice.text() << " of "
                                                             << slice.numel << " elements");
  StateTensor& t = tensors[name];
  TESSERA_CHECK_ARG(t.pieces.empty() || t.globalShape == globalShape,
                    "tensor '" << name << "' was put with shape " << shapeText(t.globalShape) << ", now "
                               << shapeText(globalShape));
  t.globalShape = globalShape;
  t.replicated = false;
  t.pieces.push_back(StatePiece{value.contiguous().view(slice.localShape()), slice});
}

void StateDict::putMeta(const std::string& key, int64_t value) { meta[key] = std::to_string(value); }

void StateDict::putMeta(const std::string& key, double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  meta[key] = buffer;
}

void StateDict::putMeta(const std::string& key, std::string value) { meta[key] = std::move(value); }

const std::string& StateDict::metaString(const std::string& key) const {
  auto it = meta.find(key);
  TESSERA_CHECK_ARG(it != meta.end(), "training state: missing entry '" << key << "'");
  return it->second;
}

int64_t StateDict::metaInt(const std::string& key) const {
  const std::string& text = metaString(key);
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TESSERA_CHECK_ARG(end != text.c_str() && *end == '\0',
                    "training state: entry '" << key << "' is not an integer: '" << text << "'");
  return value;
}

double StateDict::metaDouble(const std::string& key) const {
  const std::string& text = metaString(key);
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  TESSERA_CHECK_ARG(end != text.c_str() && *end == '\0',
                    "training state: entry '" << key << "' is not a number: '" << text << "'");
  return value;
}

const at::Tensor& StateDict::whole(const std::string& name) const {
  auto it = tensors.find(name);
  TESSERA_CHECK_ARG(it != tensors.end(), "training state: missing tensor '" << name << "'");
  const StateTensor& t = it->second;
  TESSERA_CHECK_ARG(t.pieces.size() == 1 && t.pieces[0].slice.isWhole(t.globalShape),
                    "training state: tensor '" << name << "' is held in " << t.pieces.size()
                                               << " piece(s), not whole, on this rank");
  return t.pieces[0].local;
}

StateDict StateDict::clone() const {
  StateDict out;
  out.meta = meta;
  for (const auto& [name, t] : tensors) {
    StateTensor copy;
    copy.globalShape = t.globalShape;
    copy.replicated = t.replicated;
    for (const StatePiece& piece : t.pieces) {
      copy.pieces.push_back(StatePiece{piece.local.detach().to(at::kCPU).contiguous().clone(), piece.slice});
    }
    out.tensors.emplace(name, std::move(copy));
  }
  return out;
}

int64_t StateDict::localBytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors) {
    for (const StatePiece& piece : t.pieces) bytes += piece.local.numel() * static_cast<int64_t>(piece.local.element_size());
  }
  return bytes;
}

}  // namespace tessera
