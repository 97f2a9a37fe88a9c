// Communicator: one object per process group (the world, a mesh axis, an
// elastic group). Every backend (comm/gloo, comm/mpi, comm/nccl) implements it;
// parallel/ and optim/ see only this interface.
//
// Contracts that hold for every method below:
// - Collective: every rank of the group must call it, in the same order, with
//   matching dtypes and sizes. A mismatch is reported as a CommError naming each
//   rank's operation, dtype and element count: backends exchange a small
//   description of each collective before running it (on by default; see
//   verifyCollectives in the backend options).
// - Tensors are contiguous, on the backend's device (CPU for Gloo/MPI, CUDA for
//   NCCL), of float32, float64, bfloat16, float16, int32, int64, uint8 or int8.
//   Anything else is an InvalidArgument that says how to fix it.
// - Sizes are in elements of the flattened tensor; "counts" describe how a
//   flat buffer is split across ranks (rank r owns counts[r] elements).
// - Async variants return a Work handle; the caller keeps the tensors alive
//   and untouched until wait() returns. Operations of one communicator run in
//   issue order.
// - Nothing blocks forever: each operation has a timeout (the communicator's,
//   kDefaultCommTimeout unless set, or the per-call one). On timeout or a dead
//   peer, wait() throws TimeoutError/CommError naming the operation, the group
//   and the ranks that did not arrive; the communicator is broken afterwards
//   and every later call throws at once.
// - Thread-safety: calls may come from any thread, but collectives must be
//   issued in the same order on every rank, which in practice means one thread
//   issues them.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/types.h"

namespace tessera::comm {

// Handle of an operation in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation finished; rethrows its error. A timeout of
  // kUseCommTimeout waits as long as the operation's own timeout allows.
  virtual void wait(Timeout timeout = kUseCommTimeout) = 0;
  // Non-blocking. True once finished (successfully or not).
  virtual bool isCompleted() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// Per-call options.
struct CallOptions {
  Timeout timeout = kUseCommTimeout;  // kUseCommTimeout: the communicator's timeout
};

class Communicator;
using CommPtr = std::shared_ptr<Communicator>;

class Communicator {
 public:
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // The group's name, e.g. "world", "world/tp", "elastic/epoch3"; used in errors.
  const std::string& name() const { return name_; }
  // "gloo", "mpi", "nccl", "single".
  virtual std::string backend() const = 0;

  Timeout timeout() const { return timeout_; }
  void setTimeout(Timeout timeout);

  // --- Collectives (async). See the contracts above. ---

  // In place: tensor becomes op(tensor of every rank). kAvg divides the sum by
  // size() (integer dtypes: truncating division).
  virtual WorkPtr allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options = {}) = 0;
  // output (counts[rank] elements) = op over ranks of this rank's slice of input
  // (sum(counts) elements). Empty counts: equal split, input = size() * output.
  virtual WorkPtr reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op,
                                     std::vector<int64_t> counts = {}, CallOptions options = {}) = 0;
  // output = concatenation of every rank's input, in rank order. Empty counts:
  // every input has output.numel() / size() elements; otherwise rank r sends counts[r].
  virtual WorkPtr allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts = {},
                                 CallOptions options = {}) = 0;
  // tensor on every rank becomes root's tensor.
  virtual WorkPtr broadcastAsync(at::Tensor tensor, int root, CallOptions options = {}) = 0;
  // Rank r sends input slice j (sendCounts[j] elements) to rank j and receives
  // into output slice j (recvCounts[j] elements) from rank j. Empty counts:
  // equal slices of numel / size().
  virtual WorkPtr allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts = {},
                                std::vector<int64_t> recvCounts = {}, CallOptions options = {}) = 0;
  virtual WorkPtr barrierAsync(CallOptions options = {}) = 0;

  // --- Point to point (async; not collective) ---
  // A send matches the recv on the peer with the same tag (0 <= tag < 2^31);
  // sizes must match. Messages with the same (peer, tag) arrive in order.
  virtual WorkPtr sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options = {}) = 0;
  virtual WorkPtr recvAsync(at::Tensor tensor, int src, int tag, CallOptions options = {}) = 0;

  // --- Blocking conveniences: the async call, then wait(). ---
  void allReduce(at::Tensor tensor, ReduceOp op = ReduceOp::kSum, CallOptions options = {});
  void reduceScatter(at::Tensor input, at::Tensor output, ReduceOp op = ReduceOp::kSum,
                     std::vector<int64_t> counts = {}, CallOptions options = {});
  void allGather(at::Tensor input, at::Tensor output, std::vector<int64_t> counts = {},
                 CallOptions options = {});
  void broadcast(at::Tensor tensor, int root, CallOptions options = {});
  void allToAll(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts = {},
                std::vector<int64_t> recvCounts = {}, CallOptions options = {});
  void barrier(CallOptions options = {});
  void send(at::Tensor tensor, int dst, int tag, CallOptions options = {});
  void recv(at::Tensor tensor, int src, int tag, CallOptions options = {});

  // Collective over this group: ranks passing the same color form a new group,
  // ordered by (key, rank). color < 0 (kNoColor) joins no group and returns
  // nullptr. The child's name is name() + "/" + suffix.
  static constexpr int kNoColor = -1;
  virtual CommPtr split(int color, int key, const std::string& suffix) = 0;

  // Traffic since construction. Readable from any thread at any time.
  CommStats stats() const;
  void resetStats();

 protected:
  Communicator(int rank, int size, std::string name);

  // Backends call this when an operation completes.
  void recordOp(OpKind kind, uint64_t bytesSent, uint64_t bytesReceived, double seconds);
  // The timeout a call should use: the per-call one if set, else the communicator's.
  Timeout effectiveTimeout(const CallOptions& options) const;

 private:
  int rank_;
  int size_;
  std::string name_;
  Timeout timeout_ = kDefaultCommTimeout;
  struct StatsBox;
  std::shared_ptr<StatsBox> stats_;
};

// A group of one process: every collective is a local copy (or nothing), so
// code written for N ranks runs unchanged on one, and still counts its calls.
CommPtr makeSingleRankCommunicator(std::string name = "single");

}  // namespace tessera::comm
