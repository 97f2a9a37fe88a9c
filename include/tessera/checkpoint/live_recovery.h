// Live recovery: one process's training state sent to a joining process over
// the network, instead of through a checkpoint on disk (REFERENCE §5).
//
// The source takes a snapshot at an outer-step boundary (a StateDict from
// collectTrainingState(), clone()d so it shares no memory with the training
// tensors) and hands it to a StateSender, which serves it to exactly one
// authenticated peer from a background thread: the source goes on training
// while the bytes flow (PRIME's final version blocked the source instead).
// The joiner calls receiveState(), which verifies every tensor's checksum on
// arrival and returns fresh tensors (never views of a receive buffer shared
// with anything else: PRIME's issue #245), ready for restoreTrainingState().
//
// Wire format, version 2 (comm/net.h frames after the join handshake;
// integers little-endian):
//   header frame:  "TSRS" u32 version(2) | u32 tensor count | u64 total payload bytes
//                  | u32 meta count | per meta: u32 len key, u32 len value
//   per tensor, one frame of description
//                  u32 len name | u8 dtype | u8 replicated | u32 rank | i64 shape[rank]
//                  | u32 piece count | per piece (a TensorSlice, core/state.h):
//                    i64 box offset[rank], i64 box size[rank], i64 flat offset, i64 numel
//   then per piece, the raw bytes streamed in chunks (no frame per piece),
//   followed by one 8-byte xxh64 of the piece's bytes.
//   trailer frame: "DONE" | u64 xxh64 over every piece checksum in order.
// Strings ("len key", "len name") are a u32 byte count, then the bytes.
// dtype codes: 1 float32, 2 float64, 3 bfloat16, 4 float16, 5 int32,
// 6 int64, 7 uint8, 8 int8, 9 int16, 10 bool (checkpoint/recovery_wire.h).
// xxh64 uses seed 0; a piece checksum goes out as 8 bytes little-endian.
// Every announced length is checked against the header's totals and the
// dtype's size before anything is allocated. Version 1 (releases before N-D
// slices) sent a piece as i64 offset, i64 numel (a flat range); a joiner
// refuses any version but its own with an error naming both and the fix
// (the same tessera release on every node).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "tessera/core/state.h"

namespace tessera::checkpoint {

// What one transfer moved.
struct RecoveryStats {
  uint64_t bytes = 0;       // payload bytes (tensor data) sent or received
  int tensors = 0;
  double seconds = 0;       // from the accepted connection to the trailer
  double bytesPerSecond() const { return seconds > 0 ? static_cast<double>(bytes) / seconds : 0.0; }
};

struct RecoveryOptions {
  std::string bindHost = "127.0.0.1";  // the sender listens here (the node's advertised address)
  std::string secret;                  // join secret (comm/net.h); "" on both sides: no secret
  // Sender: how long to wait for the joiner to connect and authenticate,
  // then (counted afresh) for the whole transfer. Receiver: the whole transfer.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
};

// Serves one snapshot to one peer. Not copyable.
class StateSender {
 public:
  // Takes the snapshot by value (the caller passes a clone()d StateDict:
  // the sender reads it from another thread while training continues).
  // Binds an ephemeral port on options.bindHost at once (throws CommError
  // when it cannot) and starts the background thread, which accepts
  // connections until one authenticates (a refused or garbage connection is
  // logged and dropped; it does not end the wait), sends, and ends.
  StateSender(StateDict snapshot, RecoveryOptions options);
  // Stops waiting (closing the listener) and joins the thread.
  ~StateSender();
  StateSender(const StateSender&) = delete;
  StateSender& operator=(const StateSender&) = delete;

  // "host:port" for the joiner (publish it through the store).
  std::string address() const;
  // True once the thread ended (sent, or failed).
  bool done() const;
  // Blocks until done; returns the stats or rethrows the thread's error
  // (TimeoutError when nobody authenticated in time, CommError when the peer
  // went away mid-transfer).
  RecoveryStats wait();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Connects to a StateSender at `address`, authenticates, receives and
// verifies. Returns fresh contiguous CPU tensors and the meta. Throws
// AuthError (wrong secret), TimeoutError/CommError (source unreachable or
// gone), ProtocolError naming the tensor when a checksum does not match or
// the stream is malformed.
StateDict receiveState(const std::string& address, const RecoveryOptions& options, RecoveryStats* stats = nullptr);

}  // namespace tessera::checkpoint
