#include "checkpoint/recovery_wire.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/numerics/torch_float8.h"

namespace tessera::checkpoint::recovery_wire {
namespace {

constexpr char kHeaderMagic[4] = {'T', 'S', 'R', 'S'};
constexpr char kTrailerMagic[4] = {'D', 'O', 'N', 'E'};

// Code order is the wire's: never reorder, only append.
constexpr at::ScalarType kDtypeByCode[] = {
    at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kInt, at::kLong, at::kByte, at::kChar, at::kShort, at::kBool,
#if TESSERA_HAS_TORCH_FLOAT8
    // Codes 11 and 12; a libtorch without them answers "unknown dtype code".
    at::kFloat8_e4m3fn, at::kFloat8_e5m2,
#endif
};
constexpr size_t kDtypeCount = sizeof(kDtypeByCode) / sizeof(kDtypeByCode[0]);

void appendLittleEndian(Bytes& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}
void appendU32(Bytes& out, uint32_t value) { appendLittleEndian(out, value, 4); }
void appendU64(Bytes& out, uint64_t value) { appendLittleEndian(out, value, 8); }
void appendI64(Bytes& out, int64_t value) { appendLittleEndian(out, static_cast<uint64_t>(value), 8); }
void appendString(Bytes& out, const std::string& text) {
  appendU32(out, static_cast<uint32_t>(text.size()));
  out.insert(out.end(), text.begin(), text.end());
}

// Reads one received frame field by field; every failure is a ProtocolError
// that names the peer, the part of the stream and the field.
class FrameReader {
 public:
  FrameReader(const Bytes& frame, const std::string& peer, std::string part)
      : frame_(frame), peer_(peer), part_(std::move(part)) {}

  void setPart(std::string part) { part_ = std::move(part); }
  size_t left() const { return frame_.size() - position_; }

  uint64_t littleEndian(int bytes, const char* field) {
    need(static_cast<size_t>(bytes), field);
    uint64_t value = 0;
    for (int i = 0; i < bytes; ++i) value |= static_cast<uint64_t>(frame_[position_ + i]) << (8 * i);
    position_ += static_cast<size_t>(bytes);
    return value;
  }
  uint8_t u8(const char* field) { return static_cast<uint8_t>(littleEndian(1, field)); }
  uint32_t u32(const char* field) { return static_cast<uint32_t>(littleEndian(4, field)); }
  uint64_t u64(const char* field) { return littleEndian(8, field); }
  int64_t i64(const char* field) { return static_cast<int64_t>(littleEndian(8, field)); }

  // A u32 length, then that many bytes.
  std::string string(const char* field) {
    const uint32_t size = u32(field);
    need(size, field);
    std::string text(reinterpret_cast<const char*>(frame_.data() + position_), size);
    position_ += size;
    return text;
  }

  void magic(const char (&expected)[4], const char* field) {
    need(4, field);
    if (std::memcmp(frame_.data() + position_, expected, 4) != 0) {
      fail(std::string("bad ") + field + ": not a tessera live-recovery stream");
    }
    position_ += 4;
  }

  // `count` items of at least `minBytes` each must still fit in the frame:
  // checked before anything is sized by the count.
  void needItems(uint64_t count, size_t minBytes, const char* field) {
    if (count > left() / minBytes) {
      std::ostringstream out;
      out << field << " " << count << " cannot fit in the " << left() << " bytes left of the frame";
      fail(out.str());
    }
  }

  void expectEnd() {
    if (left() != 0) fail(std::to_string(left()) + " unexpected bytes at the end of the frame");
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw ProtocolError("live recovery from " + peer_ + ": " + part_ + ": " + problem +
                        " (a peer that is not a tessera live-recovery source of this version, or a corrupted stream)");
  }

 private:
  void need(size_t bytes, const char* field) {
    if (bytes > left()) {
      std::ostringstream out;
      out << "truncated " << field << ": needs " << bytes << " bytes, " << left() << " left in the frame";
      fail(out.str());
    }
  }

  const Bytes& frame_;
  const std::string& peer_;
  std::string part_;
  size_t position_ = 0;
};

// Product of the dims, or the first problem ("" when fine) in `problem`.
int64_t checkedNumel(const std::vector<int64_t>& shape, std::string& problem) {
  int64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      problem = "negative dimension in shape " + shapeText(shape);
      return 0;
    }
    if (__builtin_mul_overflow(numel, dim, &numel)) {
      problem = "shape " + shapeText(shape) + " overflows 64-bit element counts";
      return 0;
    }
  }
  return numel;
}

// The pieces fit `shape` and do not overlap; returns the first problem or "".
// Pairwise: a tensor has a handful of pieces (the description frame's size
// bounds them), and only pairs whose boxes meet are compared element-wise.
std::string checkSlices(const std::vector<TensorSlice>& pieces, const std::vector<int64_t>& shape) {
  for (const TensorSlice& piece : pieces) {
    try {
      piece.check(shape, "piece");
    } catch (const InvalidArgument& e) {
      return e.what();
    }
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    for (size_t j = i + 1; j < pieces.size(); ++j) {
      if (pieces[i].boxIntersects(pieces[j]) && overlapCount(pieces[i], pieces[j]) > 0) {
        return "pieces " + pieces[i].text() + " and " + pieces[j].text() + " overlap";
      }
    }
  }
  return "";
}

// Bytes of one piece on the wire: offsets and sizes per dim, flat offset, numel.
size_t pieceBytes(size_t rank) { return 16 * rank + 16; }

size_t descriptionFrameBytes(const TensorDescription& d) {
  return 4 + d.name.size() + 1 + 1 + 4 + 8 * d.shape.size() + 4 + pieceBytes(d.shape.size()) * d.pieces.size();
}

}  // namespace

uint64_t TensorDescription::payloadBytes() const {
  uint64_t numel = 0;
  for (const TensorSlice& piece : pieces) numel += static_cast<uint64_t>(piece.numel);
  return numel * c10::elementSize(dtype);
}

uint8_t dtypeCode(at::ScalarType dtype) {
  for (size_t code = 0; code < kDtypeCount; ++code) {
    if (kDtypeByCode[code] == dtype) return static_cast<uint8_t>(code + 1);
  }
  throw InvalidArgument(std::string("live recovery cannot send dtype ") + c10::toString(dtype) +
                        "; convert the tensor to a real or integer dtype first");
}

std::vector<at::ScalarType> sendableDtypes() { return {std::begin(kDtypeByCode), std::end(kDtypeByCode)}; }

TensorDescription describe(const std::string& name, const StateTensor& tensor) {
  TensorDescription d;
  d.name = name;
  d.replicated = tensor.replicated;
  d.shape = tensor.globalShape;
  std::string problem;
  TESSERA_CHECK_ARG(d.shape.size() <= kMaxRank, "live recovery: tensor '" << name << "' has " << d.shape.size()
                                                                          << " dimensions, more than " << kMaxRank);
  checkedNumel(d.shape, problem);
  TESSERA_CHECK_ARG(problem.empty(), "live recovery: tensor '" << name << "': " << problem);
  for (size_t i = 0; i < tensor.pieces.size(); ++i) {
    const at::Tensor& local = tensor.pieces[i].local;
    TESSERA_CHECK_ARG(local.defined() && local.device().is_cpu() && local.is_contiguous(),
                      "live recovery: tensor '" << name << "' piece " << i
                                                << " is not a defined, contiguous CPU tensor; send a clone() of the "
                                                   "state (StateDict::clone)");
    if (i == 0) d.dtype = local.scalar_type();
    TESSERA_CHECK_ARG(local.scalar_type() == d.dtype, "live recovery: tensor '" << name << "' has pieces of dtypes "
                                                                                << d.dtype << " and "
                                                                                << local.scalar_type());
    TESSERA_CHECK_ARG(local.numel() == tensor.pieces[i].slice.numel,
                      "live recovery: tensor '" << name << "' piece " << i << " holds " << local.numel()
                                                << " elements, its slice " << tensor.pieces[i].slice.text() << " "
                                                << tensor.pieces[i].slice.numel);
    d.pieces.push_back(tensor.pieces[i].slice);
  }
  dtypeCode(d.dtype);
  problem = checkSlices(d.pieces, d.shape);
  TESSERA_CHECK_ARG(problem.empty(), "live recovery: tensor '" << name << "': " << problem);
  TESSERA_CHECK_ARG(descriptionFrameBytes(d) <= kMaxDescriptionFrame,
                    "live recovery: tensor '" << name << "' has too many pieces (" << d.pieces.size()
                                              << ") or too long a name to describe in one frame");
  return d;
}

Header headerOf(const StateDict& state) {
  Header header;
  TESSERA_CHECK_ARG(state.tensors.size() <= kMaxTensors,
                    "live recovery: " << state.tensors.size() << " tensors, more than " << kMaxTensors);
  header.tensorCount = static_cast<uint32_t>(state.tensors.size());
  for (const auto& [name, tensor] : state.tensors) header.payloadBytes += describe(name, tensor).payloadBytes();
  header.meta = state.meta;
  TESSERA_CHECK_ARG(encodeHeader(header).size() <= kMaxHeaderFrame,
                    "live recovery: the state's meta exceeds " << (kMaxHeaderFrame >> 20)
                                                               << " MiB; put large values in tensors");
  return header;
}

Bytes encodeHeader(const Header& header) {
  Bytes out(std::begin(kHeaderMagic), std::end(kHeaderMagic));
  appendU32(out, kVersion);
  appendU32(out, header.tensorCount);
  appendU64(out, header.payloadBytes);
  appendU32(out, static_cast<uint32_t>(header.meta.size()));
  for (const auto& [key, value] : header.meta) {
    appendString(out, key);
    appendString(out, value);
  }
  return out;
}

Bytes encodeDescription(const TensorDescription& d) {
  Bytes out;
  out.reserve(descriptionFrameBytes(d));
  appendString(out, d.name);
  out.push_back(dtypeCode(d.dtype));
  out.push_back(d.replicated ? 1 : 0);
  appendU32(out, static_cast<uint32_t>(d.shape.size()));
  for (int64_t dim : d.shape) appendI64(out, dim);
  appendU32(out, static_cast<uint32_t>(d.pieces.size()));
  for (const TensorSlice& piece : d.pieces) {
    for (int64_t offset : piece.offsets) appendI64(out, offset);
    for (int64_t size : piece.sizes) appendI64(out, size);
    appendI64(out, piece.flatOffset);
    appendI64(out, piece.numel);
  }
  return out;
}

Bytes encodeTrailer(uint64_t checksumOfChecksums) {
  Bytes out(std::begin(kTrailerMagic), std::end(kTrailerMagic));
  appendU64(out, checksumOfChecksums);
  return out;
}

std::array<uint8_t, 8> encodeChecksum(uint64_t checksum) {
  std::array<uint8_t, 8> out;
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(checksum >> (8 * i));
  return out;
}

uint64_t decodeChecksum(const std::array<uint8_t, 8>& bytes) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  return value;
}

Header decodeHeader(const Bytes& frame, const std::string& peer) {
  FrameReader in(frame, peer, "header");
  in.magic(kHeaderMagic, "magic");
  const uint32_t version = in.u32("version");
  if (version != kVersion) {
    // Not a malformed stream: another release. Said plainly, without the
    // "corrupted stream" suffix of in.fail().
    throw ProtocolError("live recovery from " + peer + ": the source speaks live-recovery wire version " +
                        std::to_string(version) + ", this node speaks version " + std::to_string(kVersion) +
                        (version < kVersion ? " (version 1 sent flat ranges, version 2 sends N-D slices)" : "") +
                        ": both nodes must run the same tessera release; upgrade the older one and rejoin");
  }
  Header header;
  header.tensorCount = in.u32("tensor count");
  if (header.tensorCount > kMaxTensors) in.fail("tensor count " + std::to_string(header.tensorCount) + " over the limit");
  header.payloadBytes = in.u64("payload bytes");
  const uint32_t metaCount = in.u32("meta count");
  in.needItems(metaCount, 8, "meta count");  // two u32 lengths per entry at least
  for (uint32_t i = 0; i < metaCount; ++i) {
    std::string key = in.string("meta key");
    std::string value = in.string("meta value");
    if (!header.meta.emplace(std::move(key), std::move(value)).second) in.fail("duplicate meta key");
  }
  in.expectEnd();
  return header;
}

TensorDescription decodeDescription(const Bytes& frame, const std::string& peer, uint64_t payloadBytesLeft) {
  FrameReader in(frame, peer, "tensor description");
  TensorDescription d;
  d.name = in.string("tensor name");
  in.setPart("tensor '" + d.name + "'");
  const uint8_t code = in.u8("dtype");
  if (code == 0 || code > kDtypeCount) in.fail("unknown dtype code " + std::to_string(code));
  d.dtype = kDtypeByCode[code - 1];
  const uint8_t replicated = in.u8("replicated flag");
  if (replicated > 1) in.fail("replicated flag " + std::to_string(replicated) + " is not 0 or 1");
  d.replicated = replicated == 1;
  const uint32_t rank = in.u32("rank");
  if (rank > kMaxRank) in.fail("rank " + std::to_string(rank) + " over the limit of " + std::to_string(kMaxRank));
  in.needItems(rank, 8, "rank");
  for (uint32_t i = 0; i < rank; ++i) d.shape.push_back(in.i64("dimension"));
  std::string problem;
  checkedNumel(d.shape, problem);
  if (!problem.empty()) in.fail(problem);
  const uint32_t pieceCount = in.u32("piece count");
  in.needItems(pieceCount, pieceBytes(rank), "piece count");
  for (uint32_t i = 0; i < pieceCount; ++i) {
    TensorSlice piece;
    for (uint32_t k = 0; k < rank; ++k) piece.offsets.push_back(in.i64("piece box offset"));
    for (uint32_t k = 0; k < rank; ++k) piece.sizes.push_back(in.i64("piece box size"));
    piece.flatOffset = in.i64("piece flat offset");
    piece.numel = in.i64("piece numel");
    d.pieces.push_back(std::move(piece));
  }
  in.expectEnd();
  problem = checkSlices(d.pieces, d.shape);
  if (!problem.empty()) in.fail(problem);
  // Disjoint slices inside the tensor: their element count fits in int64;
  // their bytes may still overflow.
  uint64_t numel = 0;
  for (const TensorSlice& piece : d.pieces) numel += static_cast<uint64_t>(piece.numel);
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(c10::elementSize(d.dtype)), &bytes) ||
      bytes > payloadBytesLeft) {
    in.fail(std::to_string(numel) + " elements of " + c10::toString(d.dtype) + " announced, more than the " +
            std::to_string(payloadBytesLeft) + " payload bytes the header has left");
  }
  return d;
}

uint64_t decodeTrailer(const Bytes& frame, const std::string& peer) {
  FrameReader in(frame, peer, "trailer");
  in.magic(kTrailerMagic, "trailer magic");
  const uint64_t checksum = in.u64("checksum");
  in.expectEnd();
  return checksum;
}

PieceChecksum::PieceChecksum() : state_(XXH64_createState()) {
  if (state_ == nullptr) throw std::bad_alloc();
  XXH64_reset(state_, 0);
}

PieceChecksum::~PieceChecksum() { XXH64_freeState(state_); }

void PieceChecksum::update(const void* data, size_t size) {
  if (size > 0) XXH64_update(state_, data, size);
}

uint64_t PieceChecksum::digest() const { return XXH64_digest(state_); }

uint64_t checksumOf(const void* data, size_t size) { return XXH64(data, size, 0); }

uint64_t checksumOfChecksums(const std::vector<uint64_t>& pieceChecksums) {
  Bytes bytes;
  bytes.reserve(8 * pieceChecksums.size());
  for (uint64_t checksum : pieceChecksums) appendU64(bytes, checksum);
  return XXH64(bytes.data(), bytes.size(), 0);
}

}  // namespace tessera::checkpoint::recovery_wire
