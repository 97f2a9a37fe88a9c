// Private: the MPI backend. Collectives run in issue order on the
// communicator's OpQueue thread as blocking MPI calls (MPI_Allreduce, ...);
// sends and receives are posted at once from the caller's thread with
// MPI_Isend/MPI_Irecv, so they never queue behind collectives (pipeline
// schedules post isend+irecv pairs and rely on that). Both are legal together
// because MPI runs with MPI_THREAD_MULTIPLE.
//
// MPI cannot time out or cancel a collective. Timeouts are therefore enforced
// by the waiter (mpi_work.h) and failures explained by a report exchange
// between ranks (mpi_group.h); a group that failed is abandoned with its
// worker thread possibly still blocked inside MPI, and the process skips
// MPI_Finalize at exit (mpi_runtime.h).
//
// Unless TESSERA_VERIFY_COLLECTIVES=0, each collective first allgathers every
// rank's description of it, as Gloo does, so that a mismatch is refused on
// every rank instead of failing on one (or silently, for equal-width dtypes).
//
// Traffic statistics follow the ring model (types.h): MPI's own algorithm is
// not observable; the verification's few bytes are not counted.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "comm/mpi/mpi_group.h"
#include "comm/op_queue.h"
#include "tessera/comm/mpi.h"

namespace tessera::comm::detail {

class MpiCommunicator final : public Communicator {
 public:
  // Wraps `group`, whose MPI communicator is ready. Collective only in that
  // the group's construction was. verifyCollectives: see
  // MpiGroup::verifyAcrossRanks (one small allgather per collective).
  MpiCommunicator(std::shared_ptr<MpiGroup> group, Timeout timeout, bool verifyCollectives);
  // Waits for queued operations (at most until they fail by their timeout).
  // If a broken group's worker is stuck in MPI, the thread and the queue are
  // leaked rather than joined: joining would never return.
  ~MpiCommunicator() override;

  std::string backend() const override { return "mpi"; }

  WorkPtr allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options) override;
  WorkPtr reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op, std::vector<int64_t> counts,
                             CallOptions options) override;
  WorkPtr allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                         CallOptions options) override;
  WorkPtr broadcastAsync(at::Tensor tensor, int root, CallOptions options) override;
  WorkPtr allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                        std::vector<int64_t> recvCounts, CallOptions options) override;
  WorkPtr barrierAsync(CallOptions options) override;
  WorkPtr sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options) override;
  WorkPtr recvAsync(at::Tensor tensor, int src, int tag, CallOptions options) override;
  // Collective: an allgather of (color, key) then MPI_Comm_split on the queue.
  CommPtr split(int color, int key, const std::string& suffix) override;

 private:
  // One blocking MPI call on the group's communicator; returns MPI's code.
  using MpiCall = std::function<int(MPI_Comm)>;
  // Bytes an operation counts in the statistics (ring model).
  struct Traffic {
    uint64_t sent = 0;
    uint64_t received = 0;
  };
  // Queues `call` as collective `info`: on an MPI error the group breaks and
  // the work fails; on success `after` runs (e.g. the division of kAvg) and
  // `traffic`, unless nullopt, is recorded under info.kind. Throws CommError
  // at once if the group is broken.
  WorkPtr enqueueCollective(const OpInfo& info, Timeout timeout, std::optional<Traffic> traffic, MpiCall call,
                            std::function<void()> after = nullptr);
  // Numbers the next collective and remembers it for failure reports. numel
  // and countsDigest must agree across ranks whenever the call is valid.
  OpInfo nextOp(OpKind kind, const at::Tensor* tensor, int64_t numel, Timeout timeout, int peer = -1,
                uint64_t countsDigest = 0);
  WorkPtr postPointToPoint(at::Tensor tensor, int peer, int tag, OpKind kind, const CallOptions& options);
  void checkPeer(int peer, const char* what) const;
  // Blocks until every operation queued so far ran (or the group broke).
  void drain();

  std::shared_ptr<MpiGroup> group_;
  bool verifyCollectives_;
  uint64_t collectiveSeq_ = 0;  // issuing thread only
  std::unique_ptr<OpQueue> queue_;
};

}  // namespace tessera::comm::detail
