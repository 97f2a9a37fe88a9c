// Private: the NCCL backend. Every operation is enqueued on the group's
// stream from the calling thread (no queue thread: NCCL calls are already
// asynchronous) and returns an NcclWork that polls a CUDA event recorded
// after it. Equal-split collectives map to one NCCL collective; uneven ones
// to grouped broadcasts/reduces; allToAll and send/recv to ncclSend/ncclRecv.
// Written against the CUDA runtime API and nccl.h only, never c10/cuda or
// ATen/cuda, so it compiles against a CPU-only libtorch as well.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm/diagnosis.h"
#include "comm/nccl/nccl_group.h"
#include "tessera/comm/nccl.h"

namespace tessera::comm::detail {

class NcclCommunicator final : public Communicator, public std::enable_shared_from_this<NcclCommunicator> {
 public:
  // Collective over the group. Without `existing`, forms it through the store
  // (see makeNcclCommunicator); with it, adopts an NCCL communicator that
  // ncclCommSplit created (ownership passes to this object).
  NcclCommunicator(StorePtr rootStore, std::string prefix, int rank, int size, const NcclOptions& options,
                   int device, ncclComm_t existing = nullptr);

  std::string backend() const override { return "nccl"; }
  int device() const { return device_; }

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
  // Exchanges (color, key) through the store first (bounded by the timeout,
  // naming absent ranks), then ncclCommSplit (NCCL >= 2.18) or a fresh
  // ncclCommInitRank per color under a prefix unique to this split.
  CommPtr split(int color, int key, const std::string& suffix) override;

 private:
  // Enqueues the NCCL calls of one operation; `label` names it for errors.
  using Body = std::function<void(ncclComm_t comm, cudaStream_t stream, const std::string& label)>;
  // Enqueues body on the group's stream as `info`, records the completion
  // event and returns the Work. bytesSent/Received are recorded as stats when
  // the Work is first seen complete. Marks the group broken if body throws.
  WorkPtr launch(const OpInfo& info, const CallOptions& options, std::vector<at::Tensor> tensors,
                 uint64_t bytesSent, uint64_t bytesReceived, const Body& body);
  OpInfo nextCollective(OpKind kind, const at::Tensor* tensor, int64_t numel, int peer = -1);
  void checkCudaTensor(const at::Tensor& t, const std::string& what) const;
  void checkPeer(int peer, const char* what) const;
  ncclComm_t initThroughStore();
  // Publishes this rank's (color, key) for split number splitIndex and
  // returns every rank's, in rank order.
  std::vector<std::pair<int, int>> exchangeSplitKeys(int splitIndex, int color, int key);

  StorePtr rootStore_;
  std::string prefix_;   // this group's prefix in rootStore_ (children extend it)
  StorePtr store_;       // rootStore_ under prefix_
  NcclOptions options_;
  int device_;
  std::shared_ptr<NcclGroup> group_;
  std::mutex issueMutex_;       // collectives must reach NCCL in one order
  uint64_t collectiveSeq_ = 0;  // guarded by issueMutex_
  int splitSeq_ = 0;            // guarded by issueMutex_
  std::vector<uint64_t> sendSeq_;  // sends issued per peer (NCCL's matching order); guarded by issueMutex_
  std::vector<uint64_t> recvSeq_;  // recvs issued per peer; guarded by issueMutex_
};

}  // namespace tessera::comm::detail
