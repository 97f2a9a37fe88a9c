// Private to comm/mpi: the Work handles of the MPI backend.
//
// MpiCollectiveWork wraps the OpQueue's CompletionWork. Blocking MPI calls
// cannot be interrupted, so its wait() never relies on the operation giving
// up: it waits in slices of kHealthCheckInterval and, between slices, lets
// the group look for an overdue collective or a peer's failure report (see
// mpi_group.h). The first waiter to notice runs the diagnosis; every waiter
// then throws the group's error.
//
// MpiP2PWork owns an MPI_Isend/MPI_Irecv request posted by the caller's
// thread; wait() polls MPI_Test until it completes or its deadline passes.
#pragma once

#include <mpi.h>

#include <memory>
#include <mutex>
#include <string>

#include "comm/mpi/mpi_group.h"
#include "comm/op_queue.h"

namespace tessera::comm::detail {

class MpiCollectiveWork final : public Work {
 public:
  // seq: the collective's sequence number in the group (for errorFor).
  MpiCollectiveWork(std::shared_ptr<CompletionWork> inner, std::shared_ptr<MpiGroup> group, uint64_t seq,
                    std::string description);

  // kUseCommTimeout: until the operation completes or the group breaks (at
  // the latest its timeout plus the diagnosis grace after it started).
  // An explicit timeout only bounds this wait: TimeoutError, group intact.
  void wait(Timeout timeout = kUseCommTimeout) override;
  // Also true once the group is failing (the operation will never succeed);
  // wait() then throws the diagnosed error.
  bool isCompleted() override { return inner_->isCompleted() || group_->failing(); }

 private:
  std::shared_ptr<CompletionWork> inner_;
  std::shared_ptr<MpiGroup> group_;
  uint64_t seq_;
  std::string description_;
};

class MpiP2PWork final : public Work {
 public:
  // request: posted on group->comm() for `tensor` (kept alive until done).
  // count: elements expected (recv: a different incoming size is an error).
  // timeout: the operation's; counted from now.
  MpiP2PWork(std::shared_ptr<MpiGroup> group, MPI_Request request, at::Tensor tensor, OpKind kind,
             std::string description, Timeout timeout);
  // A request still pending is handed to the group (MpiGroup::adoptPending).
  ~MpiP2PWork() override;

  // kUseCommTimeout: until done or the operation's deadline, which throws
  // TimeoutError and breaks the group (an unmatched request would match a
  // later message with the same tag and scramble the stream).
  void wait(Timeout timeout = kUseCommTimeout) override;
  // One MPI_Test. Also true once the deadline passed (wait() then throws).
  bool isCompleted() override;

 private:
  // Tests the request once; true when finished (error_ set on failure).
  bool testLocked();
  [[noreturn]] void throwTimeoutLocked(bool opDeadline, Timeout waited);

  std::mutex mutex_;  // MPI forbids testing one request from two threads at once
  std::shared_ptr<MpiGroup> group_;
  MPI_Request request_;
  at::Tensor tensor_;
  OpKind kind_;
  std::string description_;
  Timeout timeout_;
  Deadline deadline_;
  Stopwatch watch_;
  bool finished_ = false;
  std::exception_ptr error_;
};

}  // namespace tessera::comm::detail
