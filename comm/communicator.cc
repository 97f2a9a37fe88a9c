#include "tessera/comm/communicator.h"

#include <mutex>
#include <sstream>

#include "comm/op_queue.h"
#include "comm/tensor_checks.h"
#include "tessera/core/error.h"

namespace tessera::comm {

const char* toString(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

ReduceOp parseReduceOp(const std::string& name) {
  if (name == "sum") return ReduceOp::kSum;
  if (name == "avg") return ReduceOp::kAvg;
  if (name == "max") return ReduceOp::kMax;
  if (name == "min") return ReduceOp::kMin;
  throw InvalidArgument("unknown reduce op '" + name + "': use sum, avg, max or min");
}

const char* toString(OpKind kind) {
  switch (kind) {
    case OpKind::kAllReduce: return "allreduce";
    case OpKind::kReduceScatter: return "reduce_scatter";
    case OpKind::kAllGather: return "allgather";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kAllToAll: return "alltoall";
    case OpKind::kSend: return "send";
    case OpKind::kRecv: return "recv";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kCount: break;
  }
  return "?";
}

uint64_t CommStats::totalBytesSent() const {
  uint64_t total = 0;
  for (const auto& op : perOp) total += op.bytesSent;
  return total;
}
uint64_t CommStats::totalBytesReceived() const {
  uint64_t total = 0;
  for (const auto& op : perOp) total += op.bytesReceived;
  return total;
}
double CommStats::totalSeconds() const {
  double total = 0;
  for (const auto& op : perOp) total += op.seconds;
  return total;
}

std::string CommStats::toJson() const {
  std::ostringstream out;
  out.precision(9);
  auto entry = [&out](const char* name, uint64_t calls, uint64_t sent, uint64_t received, double seconds) {
    out << "\"" << name << "\": {\"calls\": " << calls << ", \"bytes_sent\": " << sent
        << ", \"bytes_received\": " << received << ", \"seconds\": " << seconds << "}";
  };
  out << "{";
  uint64_t calls = 0;
  for (int k = 0; k < static_cast<int>(OpKind::kCount); ++k) {
    const OpStats& s = perOp[k];
    calls += s.calls;
    entry(toString(static_cast<OpKind>(k)), s.calls, s.bytesSent, s.bytesReceived, s.seconds);
    out << ", ";
  }
  entry("total", calls, totalBytesSent(), totalBytesReceived(), totalSeconds());
  out << "}";
  return out.str();
}

struct Communicator::StatsBox {
  std::mutex mutex;
  CommStats stats;
};

Communicator::Communicator(int rank, int size, std::string name)
    : rank_(rank), size_(size), name_(std::move(name)), stats_(std::make_shared<StatsBox>()) {
  TESSERA_CHECK_ARG(size >= 1, "group '" << name_ << "' has size " << size);
  TESSERA_CHECK_ARG(rank >= 0 && rank < size, "rank " << rank << " is outside group '" << name_ << "' of size "
                                                      << size);
}

void Communicator::setTimeout(Timeout timeout) {
  TESSERA_CHECK_ARG(timeout.count() > 0, "communicator timeout must be positive, got " << timeout.count() << " ms");
  timeout_ = timeout;
}

Timeout Communicator::effectiveTimeout(const CallOptions& options) const {
  return options.timeout.count() < 0 ? timeout_ : options.timeout;
}

void Communicator::recordOp(OpKind kind, uint64_t bytesSent, uint64_t bytesReceived, double seconds) {
  std::lock_guard<std::mutex> lock(stats_->mutex);
  OpStats& s = stats_->stats.perOp[static_cast<int>(kind)];
  s.calls += 1;
  s.bytesSent += bytesSent;
  s.bytesReceived += bytesReceived;
  s.seconds += seconds;
}

CommStats Communicator::stats() const {
  std::lock_guard<std::mutex> lock(stats_->mutex);
  return stats_->stats;
}

void Communicator::resetStats() {
  std::lock_guard<std::mutex> lock(stats_->mutex);
  stats_->stats = CommStats{};
}

void Communicator::allReduce(at::Tensor tensor, ReduceOp op, CallOptions options) {
  allReduceAsync(std::move(tensor), op, options)->wait();
}
void Communicator::reduceScatter(at::Tensor input, at::Tensor output, ReduceOp op, std::vector<int64_t> counts,
                                 CallOptions options) {
  reduceScatterAsync(std::move(input), std::move(output), op, std::move(counts), options)->wait();
}
void Communicator::allGather(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                             CallOptions options) {
  allGatherAsync(std::move(input), std::move(output), std::move(counts), options)->wait();
}
void Communicator::broadcast(at::Tensor tensor, int root, CallOptions options) {
  broadcastAsync(std::move(tensor), root, options)->wait();
}
void Communicator::allToAll(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                            std::vector<int64_t> recvCounts, CallOptions options) {
  allToAllAsync(std::move(input), std::move(output), std::move(sendCounts), std::move(recvCounts), options)
      ->wait();
}
void Communicator::barrier(CallOptions options) { barrierAsync(options)->wait(); }
void Communicator::send(at::Tensor tensor, int dst, int tag, CallOptions options) {
  sendAsync(std::move(tensor), dst, tag, options)->wait();
}
void Communicator::recv(at::Tensor tensor, int src, int tag, CallOptions options) {
  recvAsync(std::move(tensor), src, tag, options)->wait();
}

namespace {

// The group of one: collectives are identities or copies; p2p has no peer.
class SingleRankCommunicator final : public Communicator {
 public:
  explicit SingleRankCommunicator(std::string name) : Communicator(0, 1, std::move(name)) {}

  std::string backend() const override { return "single"; }

  WorkPtr allReduceAsync(at::Tensor tensor, ReduceOp, CallOptions) override {
    detail::checkTensor(tensor, "allReduce on '" + name() + "'", true);
    recordOp(OpKind::kAllReduce, 0, 0, 0);
    return detail::completedWork();
  }
  WorkPtr reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp, std::vector<int64_t> counts,
                             CallOptions) override {
    return copyOp(OpKind::kReduceScatter, "reduceScatter", input, output, counts);
  }
  WorkPtr allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts, CallOptions) override {
    return copyOp(OpKind::kAllGather, "allGather", input, output, counts);
  }
  WorkPtr broadcastAsync(at::Tensor tensor, int root, CallOptions) override {
    detail::checkTensor(tensor, "broadcast on '" + name() + "'", true);
    TESSERA_CHECK_ARG(root == 0, "broadcast root " << root << " is outside group '" << name() << "' of size 1");
    recordOp(OpKind::kBroadcast, 0, 0, 0);
    return detail::completedWork();
  }
  WorkPtr allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                        std::vector<int64_t> recvCounts, CallOptions) override {
    TESSERA_CHECK_ARG(sendCounts == recvCounts, "allToAll on a group of one needs sendCounts == recvCounts");
    return copyOp(OpKind::kAllToAll, "allToAll", input, output, sendCounts);
  }
  WorkPtr barrierAsync(CallOptions) override {
    recordOp(OpKind::kBarrier, 0, 0, 0);
    return detail::completedWork();
  }
  WorkPtr sendAsync(at::Tensor, int dst, int, CallOptions) override {
    throw InvalidArgument("send to rank " + std::to_string(dst) + " in group '" + name() +
                          "' of size 1: there is no peer");
  }
  WorkPtr recvAsync(at::Tensor, int src, int, CallOptions) override {
    throw InvalidArgument("recv from rank " + std::to_string(src) + " in group '" + name() +
                          "' of size 1: there is no peer");
  }
  CommPtr split(int color, int, const std::string& suffix) override {
    if (color < 0) return nullptr;
    return std::make_shared<SingleRankCommunicator>(name() + "/" + suffix);
  }

 private:
  WorkPtr copyOp(OpKind kind, const char* op, at::Tensor& input, at::Tensor& output,
                 const std::vector<int64_t>& counts) {
    const std::string what = std::string(op) + " on '" + name() + "'";
    detail::checkTensor(input, what + " input", true);
    detail::checkTensor(output, what + " output", true);
    detail::checkSameDtype(input, output, what);
    detail::resolveCounts(counts, output.numel(), 1, what);
    TESSERA_CHECK_ARG(input.numel() == output.numel(),
                      what << ": input has " << input.numel() << " elements, output " << output.numel());
    if (!input.is_same(output) && input.numel() > 0) {
      output.view(-1).copy_(input.view(-1));
    }
    recordOp(kind, 0, 0, 0);
    return detail::completedWork();
  }
};

}  // namespace

CommPtr makeSingleRankCommunicator(std::string name) {
  return std::make_shared<SingleRankCommunicator>(std::move(name));
}

}  // namespace tessera::comm
