#include "comm/nccl/nccl_group.h"

#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm::detail {

void checkCuda(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw CommError(what + ": CUDA error " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

void checkNccl(ncclResult_t result, ncclComm_t comm, const std::string& what) {
  if (result == ncclSuccess) return;
  std::string message = what + ": NCCL error " + ncclGetErrorString(result);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') message += std::string(" (") + last + ")";
#endif
  message += "; rerun with NCCL_DEBUG=WARN for NCCL's own account";
  throw CommError(message);
}

CudaDeviceGuard::CudaDeviceGuard(int device) {
  checkCuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) checkCuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
}

CudaDeviceGuard::~CudaDeviceGuard() {
  int current = -1;
  if (previous_ >= 0 && cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

NcclGroup::NcclGroup(ncclComm_t comm, int device, std::string name, Timeout drainTimeout)
    : comm_(comm), device_(device), name_(std::move(name)), drainTimeout_(drainTimeout) {
  CudaDeviceGuard guard(device_);
  try {
    // A blocking stream (cudaStreamCreate, not cudaStreamNonBlocking) is
    // implicitly ordered with the legacy default stream, which libtorch uses
    // unless told otherwise: kernels that produced a tensor on the default
    // stream finish before our NCCL kernel reads it, and later default-stream
    // kernels (including ones reusing memory the caching allocator got back
    // from a freed tensor) wait for it. No event handshake per call is needed.
    checkCuda(cudaStreamCreate(&stream_), "creating the stream of NCCL group '" + name_ + "'");
    checkCuda(cudaMalloc(reinterpret_cast<void**>(&scratch_), sizeof(float)),
              "allocating the barrier word of NCCL group '" + name_ + "'");
    checkCuda(cudaMemsetAsync(scratch_, 0, sizeof(float), stream_), "clearing the barrier word");
  } catch (...) {
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    ncclCommDestroy(comm_);
    throw;
  }
}

NcclGroup::~NcclGroup() {
  // Errors are ignored: at process exit the CUDA runtime may already be gone.
  int previous = -1;
  const bool haveDevice = cudaGetDevice(&previous) == cudaSuccess;
  if (haveDevice && previous != device_) cudaSetDevice(device_);
  if (!aborted_) {
    // ncclCommDestroy waits for queued operations without a timeout; a peer
    // that died would hang it, so wait ourselves and abort if it comes to that.
    Deadline drained(drainTimeout_);
    cudaError_t status = cudaStreamQuery(stream_);
    while (status == cudaErrorNotReady && !drained.expired()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      status = cudaStreamQuery(stream_);
    }
    if (status == cudaSuccess) {
      ncclCommDestroy(comm_);
    } else {
      TESSERA_LOG(kWarn) << "NCCL group '" << name_ << "' still had operations in flight after "
                         << drainTimeout_.count() << " ms at destruction; aborting it";
      ncclCommAbort(comm_);
    }
  }
  cudaFree(scratch_);
  cudaStreamDestroy(stream_);
  if (haveDevice && previous != device_) cudaSetDevice(previous);
}

void NcclGroup::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return;
  aborted_ = true;
  brokenReason_ = reason;
  ncclCommAbort(comm_);
}

std::string NcclGroup::brokenReason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return brokenReason_;
}

void NcclGroup::enqueue(const std::function<void(ncclComm_t, cudaStream_t)>& fn) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) {
    throw CommError("NCCL group '" + name_ + "' is broken by an earlier failure and cannot be used: " +
                    brokenReason_);
  }
  fn(comm_, stream_);
}

std::string NcclGroup::asyncError() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return "";
  ncclResult_t result = ncclSuccess;
  const ncclResult_t status = ncclCommGetAsyncError(comm_, &result);
  if (status != ncclSuccess) return std::string("ncclCommGetAsyncError failed: ") + ncclGetErrorString(status);
  if (result == ncclSuccess || result == ncclInProgress) return "";
  return std::string("NCCL reported an asynchronous error: ") + ncclGetErrorString(result) +
         " (a peer died or the network failed)";
}

// ---- NcclWork ----------------------------------------------------------------

NcclWork::NcclWork(std::shared_ptr<NcclGroup> group, cudaEvent_t event, std::vector<at::Tensor> keepAlive,
                   NcclWorkContext context)
    : group_(std::move(group)),
      event_(event),
      keepAlive_(std::move(keepAlive)),
      context_(std::move(context)),
      deadline_(context_.timeout) {}

NcclWork::~NcclWork() {
  // Safe while the event is pending: CUDA releases it once it completes.
  cudaEventDestroy(event_);
}

bool NcclWork::pollLocked() {
  if (done_) return true;
  // An aborted group's kernels exit early and their events complete, so a
  // completed event says nothing once the group was aborted: check that first.
  const std::string broken = group_->brokenReason();
  if (!broken.empty()) {
    done_ = true;
    error_ = context_.description + " cannot complete: the group was aborted: " + broken;
    return true;
  }
  const cudaError_t status = cudaEventQuery(event_);
  if (status == cudaSuccess) {
    done_ = true;
    keepAlive_.clear();
    if (context_.onComplete) context_.onComplete(watch_.seconds());
    return true;
  }
  std::string failure;
  if (status != cudaErrorNotReady) {
    cudaGetLastError();
    failure = std::string("CUDA error ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
  } else {
    failure = group_->asyncError();
  }
  if (failure.empty()) return false;
  done_ = true;
  error_ = context_.description + " failed: " + failure;
  group_->abort(error_);
  TESSERA_LOG(kError) << error_;
  return true;
}

void NcclWork::failTimeoutLocked() {
  // Abort first: it stops this rank's kernels at once; then explain.
  const std::string base = context_.description + " timed out after " + std::to_string(context_.timeout.count()) +
                           " ms (the NCCL communicator was aborted)";
  group_->abort(base);
  std::string explanation;
  if (context_.collective && context_.store != nullptr) {
    explanation = diagnoseViaStore(*context_.store, context_.rank, context_.size, context_.info,
                                   diagnosisGrace(context_.timeout));
  } else {
    explanation = "the peer never posted the matching operation (NCCL matches sends and recvs per peer in issue "
                  "order; tags are ignored), or it is dead";
  }
  done_ = true;
  error_ = base + ": " + explanation;
  TESSERA_LOG(kError) << error_;
  throw TimeoutError(error_);
}

void NcclWork::wait(Timeout timeout) {
  std::lock_guard<std::mutex> lock(mutex_);
  const bool explicitTimeout = timeout.count() >= 0;
  // The operation's own deadline always bounds the wait.
  Deadline until(explicitTimeout ? std::min(timeout, deadline_.remaining()) : deadline_.remaining());
  Stopwatch waited;
  while (!pollLocked()) {
    if (until.expired()) {
      if (deadline_.expired()) failTimeoutLocked();
      throw TimeoutError(context_.description + " did not complete within the " + std::to_string(timeout.count()) +
                         " ms given to wait(); it is still in flight (wait again; its own timeout of " +
                         std::to_string(context_.timeout.count()) + " ms aborts it)");
    }
    // Spin for the first millisecond (small collectives finish in tens of
    // microseconds), then sleep so that a long wait does not burn a core.
    if (waited.millis() < 1.0) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  if (!error_.empty()) throw CommError(error_);
}

bool NcclWork::isCompleted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return pollLocked();
}

}  // namespace tessera::comm::detail
