// The live-recovery wire format (documented in
// include/tessera/checkpoint/live_recovery.h): the frames' encoders and
// decoders, the dtype codes and the checksums. Internal to checkpoint/: the
// StateSender, receiveState() and tests that forge streams use it.
//
// Decoders trust nothing: every count and length is checked against the
// frame's remaining bytes and the header's totals before a container grows,
// and anything that does not fit is a ProtocolError naming the peer and the
// field (the tensor, once its name is known). A decoded description is
// therefore safe to allocate from.
#pragma once

#include <c10/core/ScalarType.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/net.h"
#include "tessera/core/state.h"

struct XXH64_state_s;  // xxhash.h's streaming state, kept out of this header

namespace tessera::checkpoint::recovery_wire {

using comm::net::Bytes;

// 2: pieces are TensorSlices (box offsets and sizes, flat offset, numel).
// 1 (tessera before N-D slices): pieces were flat ranges (offset, numel).
constexpr uint32_t kVersion = 2;
// Piece bytes go out in sendAll calls of at most this size: large enough to
// amortize the system calls, small enough that the checksum of a chunk is
// computed while it is still in cache.
constexpr size_t kChunkBytes = size_t{4} << 20;
// Frame size limits, checked by recvFrame before allocating. The header holds
// the meta (config text, a few scalars); a description holds a name, a shape
// and the piece list (an FSDP shard has a handful of pieces per tensor).
constexpr size_t kMaxHeaderFrame = size_t{16} << 20;
constexpr size_t kMaxDescriptionFrame = size_t{1} << 20;
constexpr size_t kMaxTrailerFrame = 64;
constexpr uint32_t kMaxRank = 64;                 // dimensions of one tensor
constexpr uint32_t kMaxTensors = uint32_t{1} << 24;

struct Header {
  uint32_t tensorCount = 0;
  uint64_t payloadBytes = 0;  // sum of every piece's bytes
  std::map<std::string, std::string> meta;
};

struct TensorDescription {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  bool replicated = true;
  std::vector<int64_t> shape;
  std::vector<TensorSlice> pieces;  // each fits `shape`; pairwise disjoint

  // Bytes of every piece together (checked not to overflow when decoded).
  uint64_t payloadBytes() const;
};

// The one-byte dtype code on the wire. Throws InvalidArgument naming the
// dtype for one live recovery cannot send (complex, quantized, ...).
uint8_t dtypeCode(at::ScalarType dtype);
// Every dtype with a code, in code order (for tests).
std::vector<at::ScalarType> sendableDtypes();

// The sender's side: the header of a whole snapshot and the description of
// one of its tensors, checking that the snapshot can be sent as it is (CPU,
// contiguous pieces of a sendable dtype, slices inside the global shape,
// disjoint).
// Throw InvalidArgument naming the tensor.
Header headerOf(const StateDict& state);
TensorDescription describe(const std::string& name, const StateTensor& tensor);

Bytes encodeHeader(const Header& header);
Bytes encodeDescription(const TensorDescription& description);
Bytes encodeTrailer(uint64_t checksumOfChecksums);
// A piece checksum as it follows the piece's bytes (8 bytes, little-endian).
std::array<uint8_t, 8> encodeChecksum(uint64_t checksum);
uint64_t decodeChecksum(const std::array<uint8_t, 8>& bytes);

// The receiver's side. `peer` names the source in errors. decodeDescription
// also checks that the description's pieces fit in `payloadBytesLeft`, what
// the header announced minus what earlier tensors carried.
Header decodeHeader(const Bytes& frame, const std::string& peer);
TensorDescription decodeDescription(const Bytes& frame, const std::string& peer, uint64_t payloadBytesLeft);
uint64_t decodeTrailer(const Bytes& frame, const std::string& peer);

// XXH64 (seed 0) of a piece's bytes, computed as they stream by.
class PieceChecksum {
 public:
  PieceChecksum();
  ~PieceChecksum();
  PieceChecksum(const PieceChecksum&) = delete;
  PieceChecksum& operator=(const PieceChecksum&) = delete;

  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  XXH64_state_s* state_;
};

// XXH64 of a piece's bytes in one call.
uint64_t checksumOf(const void* data, size_t size);
// The trailer's checksum: XXH64 over every piece checksum (encodeChecksum
// bytes) in stream order.
uint64_t checksumOfChecksums(const std::vector<uint64_t>& pieceChecksums);

}  // namespace tessera::checkpoint::recovery_wire
