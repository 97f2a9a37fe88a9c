// Private: the Gloo backend. Collectives run on the communicator's OpQueue
// thread with Gloo's own per-operation timeout; point-to-point operations are
// posted at once on Gloo unbound buffers and waited for in Work::wait(), so a
// send and a recv never queue behind each other (pipeline schedules rely on
// that). reduceScatter is a ring over unbound buffers (Gloo has no generic
// one). After the first failure the Gloo context is dropped, which closes its
// sockets so that peers blocked in the same operation fail fast too.
#pragma once

#include <gloo/context.h>
#include <gloo/transport/device.h>

#include <atomic>
#include <mutex>

#include "comm/diagnosis.h"
#include "comm/op_queue.h"
#include "tessera/comm/gloo.h"

namespace tessera::comm::detail {

class GlooCommunicator final : public Communicator {
 public:
  // Collective over the group; see makeGlooCommunicator.
  GlooCommunicator(StorePtr store, std::string prefix, int rank, int size, const GlooOptions& options,
                   std::shared_ptr<gloo::transport::Device> device);
  ~GlooCommunicator() override;

  std::string backend() const override { return "gloo"; }

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
  CommPtr split(int color, int key, const std::string& suffix) override;

  // The live Gloo context, for benchmarks that compare against raw Gloo on
  // the same connections. Throws if the communicator is broken.
  std::shared_ptr<gloo::Context> context();

 private:
  // Runs body on the queue as collective `info`; on failure runs the
  // diagnosis and marks the communicator broken.
  using ContextPtr = std::shared_ptr<gloo::Context>;
  using Body = std::function<void(const std::shared_ptr<gloo::Context>&, Timeout, uint32_t tag)>;
  WorkPtr enqueueCollective(OpInfo info, Timeout timeout, Body body);
  OpInfo nextOp(OpKind kind, const at::Tensor* tensor, int64_t numel, int peer = -1);
  [[noreturn]] void failOp(const OpInfo& info, Timeout timeout, const std::string& cause);
  void throwIfBroken() const;
  void ringReduceScatter(const std::shared_ptr<gloo::Context>& context, uint8_t* scratch, const std::vector<int64_t>& counts,
                         size_t elementSize, at::ScalarType dtype, ReduceOp op, uint32_t tag, Timeout timeout,
                         uint64_t* bytesSent, uint64_t* bytesReceived);
  void checkPeer(int peer, const char* what) const;
  // Collective: every rank shares what it is about to run; throws CommError on
  // every rank if they disagree.
  void verifyAcrossRanks(const ContextPtr& context, const OpInfo& info, Timeout timeout, uint32_t tag);
  // Drops the Gloo context after a failure (see the file comment).
  void markBroken(const std::string& reason);

  StorePtr store_;          // already prefixed with this group's prefix
  std::string prefix_;      // full prefix in the root store (for children)
  StorePtr rootStore_;
  std::shared_ptr<gloo::transport::Device> device_;
  GlooOptions options_;

  mutable std::mutex mutex_;                 // guards context_ and brokenReason_
  std::shared_ptr<gloo::Context> context_;
  std::string brokenReason_;

  uint64_t collectiveSeq_ = 0;  // issue thread only
  int splitSeq_ = 0;
  std::unique_ptr<OpQueue> queue_;
};

}  // namespace tessera::comm::detail
