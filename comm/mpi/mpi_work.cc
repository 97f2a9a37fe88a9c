// Private to comm/mpi: waiting on MPI collectives and sends/recvs without
// ever blocking past a timeout (see mpi_work.h).
#include "comm/mpi/mpi_work.h"

#include <algorithm>
#include <optional>
#include <thread>

#include "comm/mpi/mpi_runtime.h"
#include "comm/tensor_checks.h"
#include "tessera/core/error.h"

namespace tessera::comm::detail {
namespace {

// Waits up to `slice` for `work`. True once it completed (its error, if any,
// is rethrown); false if the slice ended first.
bool waitSlice(CompletionWork& work, Timeout slice) {
  try {
    work.wait(slice);
  } catch (const TimeoutError&) {
    // CompletionWork signals the end of the slice with a TimeoutError; if the
    // operation completed meanwhile, its own result is what counts.
    if (!work.isCompleted()) return false;
    work.wait();
  }
  return true;
}

// Between MPI_Test calls: yield at first (latency), then sleep (two cores
// shared by several ranks must not be burnt by polling).
void pause(int polls) {
  if (polls < 64) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(polls < 2000 ? 50 : 500));
  }
}

}  // namespace

MpiCollectiveWork::MpiCollectiveWork(std::shared_ptr<CompletionWork> inner, std::shared_ptr<MpiGroup> group,
                                     uint64_t seq, std::string description)
    : inner_(std::move(inner)), group_(std::move(group)), seq_(seq), description_(std::move(description)) {}

void MpiCollectiveWork::wait(Timeout timeout) {
  std::optional<Deadline> limit;
  if (timeout.count() >= 0) limit.emplace(timeout);
  for (;;) {
    const Timeout slice = limit ? std::min(kHealthCheckInterval, limit->remaining()) : kHealthCheckInterval;
    if (waitSlice(*inner_, slice)) return;
    group_->checkHealth();
    if (group_->broken() && !inner_->isCompleted()) std::rethrow_exception(group_->errorFor(seq_));
    if (limit && limit->expired() && !inner_->isCompleted()) {
      throw TimeoutError(description_ + " did not complete within " + std::to_string(timeout.count()) +
                         " ms; it is still pending (wait again; without a timeout, wait() applies the operation's "
                         "own timeout)");
    }
  }
}

MpiP2PWork::MpiP2PWork(std::shared_ptr<MpiGroup> group, MPI_Request request, at::Tensor tensor, OpKind kind,
                       std::string description, Timeout timeout)
    : group_(std::move(group)),
      request_(request),
      tensor_(std::move(tensor)),
      kind_(kind),
      description_(std::move(description)),
      timeout_(timeout),
      deadline_(timeout) {}

MpiP2PWork::~MpiP2PWork() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_ || mpiFinalized()) return;
  if (!testLocked()) group_->adoptPending(request_, tensor_);
}

bool MpiP2PWork::testLocked() {
  if (finished_) return true;
  int done = 0;
  MPI_Status status;
  const int code = MPI_Test(&request_, &done, &status);
  if (code != MPI_SUCCESS) {
    int errorClass = 0;
    MPI_Error_class(code, &errorClass);
    const std::string hint =
        errorClass == MPI_ERR_TRUNCATE ? " (the matching send has more elements than this recv; sizes must match)"
                                       : "";
    finished_ = true;
    error_ = std::make_exception_ptr(CommError(description_ + " failed: " + mpiErrorString(code) + hint));
    return true;
  }
  if (!done) return false;
  finished_ = true;
  const uint64_t bytes = static_cast<uint64_t>(byteSize(tensor_));
  if (kind_ == OpKind::kRecv) {
    int received = 0;
    MPI_Get_count(&status, mpiDatatype(tensor_.scalar_type()), &received);
    if (received != tensor_.numel()) {
      error_ = std::make_exception_ptr(CommError(
          description_ + " received " + std::to_string(received) + " elements but expects " +
          std::to_string(tensor_.numel()) + ": the matching send has a different size (sizes must match)"));
      return true;
    }
  }
  group_->record(kind_, kind_ == OpKind::kSend ? bytes : 0, kind_ == OpKind::kRecv ? bytes : 0, watch_.seconds());
  return true;
}

void MpiP2PWork::wait(Timeout timeout) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::optional<Deadline> limit;
  if (timeout.count() >= 0) limit.emplace(timeout);
  Stopwatch sinceHealthCheck;
  for (int polls = 0; !testLocked(); ++polls) {
    if (deadline_.expired()) throwTimeoutLocked(true, timeout_);
    if (limit && limit->expired()) throwTimeoutLocked(false, timeout);
    if (sinceHealthCheck.millis() >= kHealthCheckInterval.count()) {
      // A peer whose collective failed will never serve this send/recv.
      group_->checkHealth();
      if (group_->broken()) {
        throw CommError(description_ + " was abandoned because the group broke: " + group_->failureMessage());
      }
      sinceHealthCheck.restart();
    }
    pause(polls);
  }
  if (error_) std::rethrow_exception(error_);
}

bool MpiP2PWork::isCompleted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return testLocked() || deadline_.expired();
}

void MpiP2PWork::throwTimeoutLocked(bool opDeadline, Timeout waited) {
  if (!opDeadline) {
    throw TimeoutError(description_ + " did not complete within " + std::to_string(waited.count()) +
                       " ms; it is still pending (wait again; without a timeout, wait() applies the operation's "
                       "own timeout)");
  }
  const bool isSend = kind_ == OpKind::kSend;
  const std::string message = description_ + " timed out after " + std::to_string(waited.count()) +
                              " ms: the peer never posted the matching " + (isSend ? "recv" : "send") +
                              " with this tag (or it is dead or stuck)";
  // The request stays posted; a later message with this tag would match it.
  group_->breakWith(std::make_exception_ptr(TimeoutError(message)), message);
  throw TimeoutError(message);
}

}  // namespace tessera::comm::detail
