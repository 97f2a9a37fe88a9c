// Private to comm/nccl: the CUDA/NCCL resources of one group and the Work
// handle of an operation on it.
//
// NcclGroup owns the ncclComm_t, the stream every operation runs on and a
// scratch word for barriers; NcclWork waits for an operation by polling a
// CUDA event, so that a wait has a deadline (cudaEventSynchronize has none).
// Both are shared: a Work keeps its group alive, so dropping the communicator
// while operations are in flight is safe. Nothing here knows about tensors'
// layout or the collectives' semantics (nccl_communicator.cc does).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/diagnosis.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"
#include "tessera/core/timer.h"

namespace tessera::comm::detail {

// Throws CommError "what: CUDA error <name>: <text>" unless status is cudaSuccess.
void checkCuda(cudaError_t status, const std::string& what);
// Throws CommError "what: NCCL error <text> (<NCCL's last error>)" unless
// result is ncclSuccess. comm may be null (before a communicator exists).
void checkNccl(ncclResult_t result, ncclComm_t comm, const std::string& what);

// Makes `device` current for the guard's lifetime and restores the previous
// one after, so callers' own CUDA state is left as it was.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

class NcclGroup {
 public:
  // Takes ownership of comm. Creates the stream and scratch word on device.
  // drainTimeout bounds how long the destructor waits for queued operations.
  NcclGroup(ncclComm_t comm, int device, std::string name, Timeout drainTimeout);
  // Waits (up to drainTimeout) for the stream to drain, then destroys the
  // communicator; if it does not drain, or the group was aborted, aborts it
  // instead so that process exit never hangs on a dead peer.
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  float* scratch() const { return scratch_; }
  const std::string& name() const { return name_; }

  // Aborts the NCCL communicator (once; later calls only keep the first
  // reason). Kernels of this group stop, so peers blocked in the same
  // operation fail too. Thread-safe.
  void abort(const std::string& reason);
  // Why the group was aborted; empty while it is healthy.
  std::string brokenReason() const;
  // Runs fn(comm(), stream()) unless the group was aborted (then throws
  // CommError naming the first failure). Holds the group's lock, so an abort
  // from another thread's wait() never frees the communicator mid-call.
  void enqueue(const std::function<void(ncclComm_t, cudaStream_t)>& fn);
  // Empty while NCCL reports no asynchronous error (ncclCommGetAsyncError),
  // else a description of it. Empty after an abort too (see brokenReason).
  std::string asyncError() const;

 private:
  ncclComm_t comm_;
  cudaStream_t stream_ = nullptr;
  float* scratch_ = nullptr;
  int device_;
  std::string name_;
  Timeout drainTimeout_;
  // Guards aborted_ and brokenReason_, and every use of comm_ that may race
  // with abort() (which frees it).
  mutable std::mutex mutex_;
  bool aborted_ = false;
  std::string brokenReason_;
};

// What an NcclWork needs to report a failure the way Gloo does.
struct NcclWorkContext {
  OpInfo info;
  bool collective = true;        // collectives run the store diagnosis on timeout
  std::string description;       // "allreduce #3 float32[1024] on group 'world/tp' (nccl, rank 1 of 2)"
  Timeout timeout{0};            // the operation's own timeout, from issue
  StorePtr store;                // the group's (prefixed) store, for the diagnosis
  int rank = 0;
  int size = 1;
  std::function<void(double seconds)> onComplete;  // records stats; called once
};

// An operation enqueued on group->stream(), finished when `event` (recorded
// right after it) completes.
class NcclWork final : public Work {
 public:
  // Takes ownership of event. keepAlive holds the operation's tensors until it
  // finished, so the caching allocator cannot hand their memory out early.
  NcclWork(std::shared_ptr<NcclGroup> group, cudaEvent_t event, std::vector<at::Tensor> keepAlive,
           NcclWorkContext context);
  ~NcclWork() override;

  // Polls the event until it completes. When the operation's own deadline
  // passes: aborts the group, diagnoses through the store, throws
  // TimeoutError. A shorter explicit timeout only throws TimeoutError (the
  // operation stays in flight; wait again). Throws CommError when NCCL or
  // CUDA reports an error or the group was aborted by another operation.
  void wait(Timeout timeout = kUseCommTimeout) override;
  bool isCompleted() override;

 private:
  // Returns true when done (successfully or with error_ set); never blocks.
  bool pollLocked();
  [[noreturn]] void failTimeoutLocked();

  std::mutex mutex_;
  std::shared_ptr<NcclGroup> group_;
  cudaEvent_t event_;
  std::vector<at::Tensor> keepAlive_;
  NcclWorkContext context_;
  Deadline deadline_;
  Stopwatch watch_;
  bool done_ = false;
  std::string error_;
};

}  // namespace tessera::comm::detail
