// Vocabulary shared by every communicator: reduction ops, operation kinds,
// timeouts and the per-communicator traffic statistics.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>

namespace tessera::comm {

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* toString(ReduceOp op);
// Parses "sum", "avg", "max", "min"; throws InvalidArgument otherwise.
ReduceOp parseReduceOp(const std::string& name);

// What a communicator spends its time and bytes on; indexes CommStats.
enum class OpKind : int {
  kAllReduce = 0,
  kReduceScatter,
  kAllGather,
  kBroadcast,
  kAllToAll,
  kSend,
  kRecv,
  kBarrier,
  kCount
};
const char* toString(OpKind kind);

using Timeout = std::chrono::milliseconds;
// The default for every blocking communicator call.
constexpr Timeout kDefaultCommTimeout = std::chrono::minutes(5);
// Passed as a per-call timeout: use the communicator's own timeout.
constexpr Timeout kUseCommTimeout = Timeout(-1);

struct OpStats {
  uint64_t calls = 0;
  uint64_t bytesSent = 0;      // payload bytes this rank put on the wire
  uint64_t bytesReceived = 0;  // payload bytes this rank took off the wire
  double seconds = 0;          // from issue to completion, summed over calls
};

// A snapshot of one communicator's traffic since construction (or reset).
// Bytes are those of the algorithm the backend runs: exact for Gloo and the
// hand-written algorithms; for MPI and NCCL, whose internal algorithm is not
// observable, the ring model (2(n-1)/n of the buffer for an all-reduce).
struct CommStats {
  std::array<OpStats, static_cast<int>(OpKind::kCount)> perOp{};

  // By value, so that stats().of(kind) never refers into a dead snapshot.
  OpStats of(OpKind kind) const { return perOp[static_cast<int>(kind)]; }
  uint64_t totalBytesSent() const;
  uint64_t totalBytesReceived() const;
  double totalSeconds() const;
  // {"allreduce": {"calls": .., "bytes_sent": .., ...}, ..., "total": {...}}
  std::string toJson() const;
};

}  // namespace tessera::comm
