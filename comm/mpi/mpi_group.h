// Private to comm/mpi: one MPI process group and its failure state, shared by
// an MpiCommunicator, the operations it queued and the Work handles it gave
// out. A stuck MPI call that returns after the communicator died touches only
// this object, which is why it is reference-counted and not the communicator.
//
// MPI has no timeouts, so the group detects failures itself:
// - A waiter (any thread in Work::wait) calls checkHealth() every
//   kHealthCheckInterval while its operation is pending. That notices a
//   collective running past its timeout, or a peer's failure report.
// - The worker thread calls failOp() when MPI returns an error.
// Either way the group breaks once: the detecting thread exchanges failure
// reports with the other ranks (below), builds one message naming the
// operation, the group and the ranks that did not arrive or disagree, and
// every later call fails at once with that message. THREAD_MULTIPLE makes the
// exchange legal while the worker thread is still blocked inside MPI.
//
// Failure reports travel on a private duplicate of the group's communicator
// (so they never match user traffic), tag kReportTag, as text:
//   "<OpInfo::encode()> <T|E>"   T: the sender timed out, E: it failed.
// A rank breaking because of a peer's report answers with what it did as that
// same collective (by sequence number) when it issued it, so the failing rank
// can name size or dtype mismatches. Each rank sends one report per group.
#pragma once

#include <ATen/core/Tensor.h>
#include <mpi.h>

#include <array>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "comm/diagnosis.h"
#include "tessera/core/timer.h"

namespace tessera::comm::detail {

// How often a waiter looks for overdue operations and peers' failure reports.
constexpr Timeout kHealthCheckInterval = std::chrono::milliseconds(100);

class MpiGroup {
 public:
  // Takes ownership of comm (a fresh duplicate or split result) and sets
  // MPI_ERRORS_RETURN on it. Collective over comm: duplicates it once more
  // for failure reports. Throws CommError when MPI fails.
  MpiGroup(MPI_Comm comm, std::string name);
  // Runs when no thread uses the group any more (each holds a reference).
  // Buffers MPI may still write or read (a pending send/recv, a report sent
  // to a dead peer) are leaked with their requests rather than freed under
  // MPI. The communicators are freed unless the group is broken: peers may
  // still be inside an operation on them.
  ~MpiGroup();
  MpiGroup(const MpiGroup&) = delete;
  MpiGroup& operator=(const MpiGroup&) = delete;

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  int maxTag() const { return maxTag_; }
  // "group 'world' (mpi, rank 1 of 3)", for messages.
  std::string where() const;

  // Statistics go to the owning communicator's recordOp through this; the
  // communicator detaches it (nullptr) when it dies. Thread-safe.
  using Recorder = std::function<void(OpKind, uint64_t bytesSent, uint64_t bytesReceived, double seconds)>;
  void setRecorder(Recorder recorder);
  void record(OpKind kind, uint64_t bytesSent, uint64_t bytesReceived, double seconds);

  // Issuing thread: remembers collective `info` so a peer's report about the
  // same sequence number can be answered with what this rank did.
  void remember(const OpInfo& info, Timeout timeout);
  // Worker thread: brackets the blocking MPI call of `info`.
  void beginOp(const OpInfo& info, Timeout timeout);
  void endOp();
  // Whether a blocking MPI call is running now.
  bool busy() const;

  bool broken() const;
  // Throws CommError carrying the first failure if the group is broken.
  void throwIfBroken() const;
  // The first failure's message; empty while the group is healthy.
  std::string failureMessage() const;
  // The error a waiter of collective `seq` throws once the group is broken:
  // the failure itself for the collective that failed, else a CommError
  // saying the operation was abandoned because of it.
  std::exception_ptr errorFor(uint64_t seq) const;
  // Worker thread: MPI returned `code` for `info`. Diagnoses, breaks the
  // group and throws the resulting CommError.
  [[noreturn]] void failOp(const OpInfo& info, Timeout timeout, int code);
  // Breaks the group with an error found outside any collective (a send or
  // recv that timed out), without the report exchange.
  void breakWith(std::exception_ptr error, const std::string& message);
  // Worker thread, between beginOp and endOp: one MPI_Allgather of every
  // rank's OpInfo::encode() (kVerifyBytes each). If the ranks disagree, breaks
  // the group and throws CommError naming each rank's operation, before any
  // data moved: MPI would otherwise fail on one rank only (MPI_ERR_TRUNCATE)
  // or, for a dtype mismatch of equal width, silently return garbage.
  void verifyAcrossRanks(const OpInfo& info, Timeout timeout);
  // Waiters: breaks the group if a collective is overdue or a peer reported a
  // failure. Never throws; may block up to the diagnosis grace period.
  void checkHealth();
  // Non-blocking: whether the group is broken or checkHealth() would break
  // it, so that polling Work::isCompleted() sees a stuck operation end.
  bool failing();

  // Takes over a send/recv whose Work was dropped before it completed: MPI
  // still owns the buffer, so the tensor stays referenced until MPI_Test says
  // it is done (checked whenever a new send/recv is posted).
  void adoptPending(MPI_Request request, at::Tensor tensor);
  void reapPending();

 private:
  struct Issued {
    OpInfo info;
    Timeout timeout{};
  };
  struct PeerReport {
    OpInfo info;
    bool timedOut = false;
  };

  // Breaks the group once: exchanges reports about `subject` (when known)
  // and records the error. Concurrent callers wait; later ones do nothing.
  void breakGroup(const std::optional<Issued>& subject, bool timedOut, const std::string& cause);
  std::string exchangeReports(const OpInfo& mine, bool timedOut, Timeout grace);
  // Drains arrived reports into peerReports_; caller holds reportsMutex_.
  void pollReportsLocked();
  void postReportReceive();
  std::optional<Issued> issued(uint64_t seq) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm reportComm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int maxTag_ = 32767;
  std::string name_;

  mutable std::mutex mutex_;  // guards everything up to breakMutex_
  std::exception_ptr error_;  // the first failure; set once
  std::string errorMessage_;
  std::optional<uint64_t> errorSeq_;
  std::optional<Issued> running_;
  SteadyClock::time_point runningSince_{};
  std::array<std::optional<Issued>, 64> history_;  // by seq % 64

  std::mutex breakMutex_;  // one report exchange at a time

  std::mutex reportsMutex_;  // guards the report traffic below
  MPI_Request reportRecv_ = MPI_REQUEST_NULL;
  std::array<char, 256> reportBuffer_{};
  std::vector<std::optional<PeerReport>> peerReports_;
  int firstReporter_ = -1;
  std::deque<std::string> outgoing_;  // buffers of our reports (a deque never moves them)
  std::vector<MPI_Request> outgoingRequests_;

  std::mutex pendingMutex_;
  std::vector<std::pair<MPI_Request, at::Tensor>> pending_;

  std::mutex recorderMutex_;
  Recorder recorder_;
};

}  // namespace tessera::comm::detail
