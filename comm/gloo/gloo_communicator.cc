#include "comm/gloo/gloo_communicator.h"

#include <ATen/ops/empty.h>
#include <gloo/allgather.h>
#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "comm/gloo/gloo_store_adapter.h"
#include "comm/reduce_kernels.h"
#include "comm/tensor_checks.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/core/timer.h"

namespace tessera::comm::detail {
namespace {

// Slot prefixes for unbound-buffer traffic. Gloo's own collectives use small
// prefixes (0x01..); user point-to-point and our ring stay out of their way.
constexpr uint8_t kUserP2PSlotPrefix = 0xf0;
constexpr uint8_t kRingSlotPrefix = 0xf1;

std::shared_ptr<gloo::transport::Device> createDevice(const GlooOptions& options) {
  gloo::transport::tcp::attr attr;
  std::string iface = options.interface;
  if (iface.empty() && std::getenv("TESSERA_GLOO_IFNAME") != nullptr) iface = std::getenv("TESSERA_GLOO_IFNAME");
  std::string host = options.hostname;
  if (host.empty() && std::getenv("TESSERA_GLOO_HOSTNAME") != nullptr) host = std::getenv("TESSERA_GLOO_HOSTNAME");
  if (host.empty()) host = "127.0.0.1";
  if (!iface.empty()) {
    attr.iface = iface;
  } else {
    attr.hostname = host;
  }
  try {
    return gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    throw CommError("cannot create a Gloo TCP device on " + (iface.empty() ? "host " + host : "interface " + iface) +
                    ": " + e.what() + " (set TESSERA_GLOO_HOSTNAME or TESSERA_GLOO_IFNAME to a local address)");
  }
}

// Number of ranks a binomial-tree broadcast forwards to from `rank`.
int binomialChildren(int rank, int root, int size) {
  const int v = (rank - root + size) % size;
  int children = 0;
  for (int mask = 1; mask < size; mask <<= 1) {
    if (v < mask && v + mask < size) ++children;
  }
  return children;
}

at::ScalarType dtypeCodeOf(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kInt, at::kLong, at::kByte,
                           at::kChar}) {
    if (dtypeName(t) == name) return t;
  }
  return at::ScalarType::Undefined;
}

uint32_t tagOf(uint64_t seq) { return static_cast<uint32_t>(seq & 0xffffffffu); }

}  // namespace

GlooCommunicator::GlooCommunicator(StorePtr store, std::string prefix, int rank, int size,
                                   const GlooOptions& options, std::shared_ptr<gloo::transport::Device> device)
    : Communicator(rank, size, options.name),
      store_(makePrefixStore(prefix, store)),
      prefix_(prefix),
      rootStore_(std::move(store)),
      device_(device ? std::move(device) : createDevice(options)),
      options_(options) {
  setTimeout(options.timeout);
  if (const char* env = std::getenv("TESSERA_VERIFY_COLLECTIVES")) options_.verifyCollectives = std::string(env) != "0";
  auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
  context->setTimeout(options.timeout);
  GlooStoreAdapter adapter(store_, options.timeout);
  try {
    context->connectFullMesh(adapter, device_);
  } catch (const std::exception& e) {
    std::vector<std::string> keys;
    for (int r = 0; r < size; ++r) keys.push_back(std::to_string(r));
    throw TimeoutError("forming Gloo group '" + name() + "' (rank " + std::to_string(rank) + " of " +
                       std::to_string(size) + ") through " + store_->describe() + " failed within " +
                       std::to_string(options.timeout.count()) + " ms: " + e.what() +
                       "; ranks that never registered: " + describeMissingKeys(*store_, keys));
  }
  context_ = std::move(context);
  queue_ = std::make_unique<OpQueue>("gloo group '" + name() + "'");
}

GlooCommunicator::~GlooCommunicator() {
  queue_.reset();  // drain before the context goes
}

std::shared_ptr<gloo::Context> GlooCommunicator::context() {
  std::lock_guard<std::mutex> lock(mutex_);
  TESSERA_CHECK_T(CommError, context_ != nullptr, "group '" << name() << "' is broken: " << brokenReason_);
  return context_;
}

void GlooCommunicator::throwIfBroken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (context_ == nullptr) {
    throw CommError("group '" + name() + "' (gloo) is broken by an earlier failure and cannot be used: " +
                    brokenReason_);
  }
}

OpInfo GlooCommunicator::nextOp(OpKind kind, const at::Tensor* tensor, int64_t numel, int peer) {
  return makeOpInfo(kind, collectiveSeq_++, tensor, numel, peer);
}

void GlooCommunicator::markBroken(const std::string& reason) {
  // Closing the context's sockets makes peers blocked in the same operation
  // fail now rather than at their timeout.
  std::shared_ptr<gloo::Context> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dropped = std::move(context_);
    context_.reset();
    if (brokenReason_.empty()) brokenReason_ = reason;
  }
  dropped.reset();
}

void GlooCommunicator::verifyAcrossRanks(const ContextPtr& context, const OpInfo& info, Timeout timeout,
                                         uint32_t tag) {
  constexpr int kFields = 6;
  const int64_t dtypeCode = info.dtype.empty() ? -1 : static_cast<int64_t>(dtypeCodeOf(info.dtype));
  std::vector<int64_t> mine = {static_cast<int64_t>(info.kind), static_cast<int64_t>(info.seq), dtypeCode,
                               info.numel, info.peer, static_cast<int64_t>(info.countsDigest)};
  std::vector<int64_t> all(static_cast<size_t>(kFields) * size());
  gloo::AllgatherOptions opts(context);
  opts.setInput(mine.data(), kFields);
  opts.setOutput(all.data(), all.size());
  opts.setTag(tag);
  opts.setTimeout(timeout);
  gloo::allgather(opts);
  std::vector<std::optional<OpInfo>> reports(size());
  bool agree = true;
  for (int r = 0; r < size(); ++r) {
    const int64_t* f = all.data() + r * kFields;
    OpInfo other;
    other.kind = static_cast<OpKind>(f[0]);
    other.seq = static_cast<uint64_t>(f[1]);
    other.dtype = f[2] < 0 ? "" : dtypeName(static_cast<at::ScalarType>(f[2]));
    other.numel = f[3];
    other.peer = static_cast<int>(f[4]);
    other.countsDigest = static_cast<uint64_t>(f[5]);
    agree = agree && other.matches(info);
    reports[r] = other;
  }
  if (agree) return;
  const std::string message = info.describe() + " on group '" + name() + "' (gloo, rank " + std::to_string(rank()) +
                              " of " + std::to_string(size()) + ") was not started: " +
                              summarizeReports(rank(), info, reports, Timeout(0));
  // The ranks disagree about the sequence of collectives, so nothing after this can match either.
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (brokenReason_.empty()) brokenReason_ = message;
    context_.reset();
  }
  throw CommError(message);
}

void GlooCommunicator::failOp(const OpInfo& info, Timeout timeout, const std::string& cause) {
  markBroken(info.describe() + " failed: " + cause);
  const bool timedOut = cause.find("Timed out") != std::string::npos || cause.find("timed out") != std::string::npos;
  const std::string diagnosis = diagnoseViaStore(*store_, rank(), size(), info, diagnosisGrace(timeout));
  const std::string message = info.describe() + " on group '" + name() + "' (gloo, rank " + std::to_string(rank()) +
                              " of " + std::to_string(size()) + ") " +
                              (timedOut ? "timed out after " + std::to_string(timeout.count()) + " ms" : "failed") +
                              ": " + cause + ". " + diagnosis;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    brokenReason_ = message;
  }
  TESSERA_LOG(kError) << message;
  if (timedOut) throw TimeoutError(message);
  throw CommError(message);
}

WorkPtr GlooCommunicator::enqueueCollective(OpInfo info, Timeout timeout,
                                            Body body) {
  throwIfBroken();
  const std::string description = info.describe() + " on group '" + name() + "' (gloo)";
  auto run = [this, info, timeout, body = std::move(body)] {
    std::shared_ptr<gloo::Context> context;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (context_ == nullptr) throw CommError("group '" + name() + "' is broken: " + brokenReason_);
      context = context_;
    }
    try {
      if (options_.verifyCollectives && size() > 1) verifyAcrossRanks(context, info, timeout, tagOf(info.seq));
      body(context, timeout, tagOf(info.seq));
    } catch (const tessera::Error&) {
      throw;
    } catch (const std::exception& e) {
      context.reset();
      failOp(info, timeout, e.what());
    }
  };
  // Diagnosis may take up to its grace period after Gloo's own timeout.
  const Timeout backstop = timeout + diagnosisGrace(timeout) + Timeout(5000);
  return queue_->enqueue(std::move(run), description, backstop);
}

WorkPtr GlooCommunicator::allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options) {
  checkTensor(tensor, "allReduce on group '" + name() + "'");
  OpInfo info = nextOp(OpKind::kAllReduce, &tensor, tensor.numel());
  return enqueueCollective(info, effectiveTimeout(options), [this, tensor, op](const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    const size_t n = static_cast<size_t>(tensor.numel());
    if (n > 0 && size() > 1) {
      gloo::AllreduceOptions opts(context);
      const size_t elementSize = tensor.element_size();
      void* data = tensor.data_ptr();
      switch (elementSize) {
        case 1: opts.setOutput(static_cast<uint8_t*>(data), n); break;
        case 2: opts.setOutput(static_cast<uint16_t*>(data), n); break;
        case 4: opts.setOutput(static_cast<uint32_t*>(data), n); break;
        default: opts.setOutput(static_cast<uint64_t*>(data), n); break;
      }
      opts.setReduceFunction(reduceFunction(tensor.scalar_type(), op));
      opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
      opts.setTag(tag);
      opts.setTimeout(timeout);
      gloo::allreduce(opts);
    }
    if (op == ReduceOp::kAvg && n > 0) divideInPlace(tensor.data_ptr(), n, tensor.scalar_type(), size());
    const uint64_t bytes = static_cast<uint64_t>(byteSize(tensor)) * 2 * (size() - 1) / size();
    recordOp(OpKind::kAllReduce, bytes, bytes, watch.seconds());
  });
}

void GlooCommunicator::ringReduceScatter(const ContextPtr& context, uint8_t* scratch,
                                         const std::vector<int64_t>& counts, size_t elementSize,
                                         at::ScalarType dtype, ReduceOp op, uint32_t tag, Timeout timeout,
                                         uint64_t* bytesSent, uint64_t* bytesReceived) {
  // Ring reduce-scatter: at step s, rank r sends its partial sum of chunk
  // (r-s-1) to r+1 and adds the chunk (r-s-2) received from r-1 into its own
  // copy. After n-1 steps, chunk r on rank r holds the sum over every rank.
  const int n = size();
  const int r = rank();
  const std::vector<int64_t> offsets = exclusiveOffsets(counts);
  const int64_t maxCount = *std::max_element(counts.begin(), counts.end());
  std::vector<uint8_t> incoming(static_cast<size_t>(maxCount) * elementSize + 1);
  const ReduceFn reduce = reduceFunction(dtype, op);
  const int next = (r + 1) % n;
  const int prev = (r - 1 + n) % n;
  for (int s = 0; s < n - 1; ++s) {
    const int sendChunk = ((r - s - 1) % n + n) % n;
    const int recvChunk = ((r - s - 2) % n + n) % n;
    const size_t sendBytes = counts[sendChunk] * elementSize;
    const size_t recvBytes = counts[recvChunk] * elementSize;
    // One slot per (operation, step): prefix | 32-bit tag | 24-bit step.
    const uint64_t slot = (uint64_t{kRingSlotPrefix} << 56) | (uint64_t{tag} << 24) | static_cast<uint64_t>(s);
    auto recvBuf = context->createUnboundBuffer(incoming.data(), recvBytes);
    auto sendBuf = context->createUnboundBuffer(scratch + offsets[sendChunk] * elementSize, sendBytes);
    // Post the receive before the send so that neither side waits on the other.
    recvBuf->recv(prev, slot);
    sendBuf->send(next, slot);
    recvBuf->waitRecv(timeout);
    sendBuf->waitSend(timeout);
    uint8_t* target = scratch + offsets[recvChunk] * elementSize;
    reduce(target, target, incoming.data(), static_cast<size_t>(counts[recvChunk]));
    *bytesSent += sendBytes;
    *bytesReceived += recvBytes;
  }
}

WorkPtr GlooCommunicator::reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op,
                                             std::vector<int64_t> counts, CallOptions options) {
  const std::string what = "reduceScatter on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  counts = reduceScatterCounts(input, output, std::move(counts), rank(), size(), what);
  OpInfo info = nextOp(OpKind::kReduceScatter, &input, input.numel());
  info.countsDigest = digestCounts(counts);
  return enqueueCollective(info, effectiveTimeout(options),
                           [this, input, output, op, counts](const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    const size_t elementSize = input.element_size();
    uint64_t sent = 0;
    uint64_t received = 0;
    const int64_t mine = counts[rank()];
    if (input.numel() > 0) {
      // The ring reduces in place, so it works on a copy and leaves input untouched.
      std::vector<uint8_t> scratch(static_cast<size_t>(input.numel()) * elementSize);
      std::memcpy(scratch.data(), input.data_ptr(), scratch.size());
      if (size() > 1) {
        ringReduceScatter(context, scratch.data(), counts, elementSize, input.scalar_type(), op, tag, timeout,
                          &sent, &received);
      }
      const int64_t offset = exclusiveOffsets(counts)[rank()];
      std::memcpy(output.data_ptr(), scratch.data() + offset * elementSize, mine * elementSize);
    }
    if (op == ReduceOp::kAvg && mine > 0) divideInPlace(output.data_ptr(), mine, output.scalar_type(), size());
    recordOp(OpKind::kReduceScatter, sent, received, watch.seconds());
  });
}

WorkPtr GlooCommunicator::allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                                         CallOptions options) {
  const std::string what = "allGather on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  counts = allGatherCounts(input, output, std::move(counts), rank(), size(), what);
  OpInfo info = nextOp(OpKind::kAllGather, &input, output.numel());
  info.countsDigest = digestCounts(counts);
  return enqueueCollective(info, effectiveTimeout(options),
                           [this, input, output, counts](const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    const size_t elementSize = input.element_size();
    const int64_t total = output.numel();
    if (total > 0) {
      if (size() == 1) {
        std::memcpy(output.data_ptr(), input.data_ptr(), total * elementSize);
      } else {
        gloo::AllgathervOptions opts(context);
        std::vector<size_t> elements(counts.begin(), counts.end());
        // Gloo wants a non-null pointer even for an empty contribution.
        uint8_t dummy = 0;
        uint8_t* in = input.numel() > 0 ? static_cast<uint8_t*>(input.data_ptr()) : &dummy;
        std::vector<size_t> byteCounts(elements.size());
        for (size_t r = 0; r < elements.size(); ++r) byteCounts[r] = elements[r] * elementSize;
        opts.setInput(in, byteCounts[rank()]);
        opts.setOutput(static_cast<uint8_t*>(output.data_ptr()), byteCounts);
        opts.setTag(tag);
        opts.setTimeout(timeout);
        gloo::allgatherv(opts);
      }
    }
    const uint64_t bytes = static_cast<uint64_t>(total) * elementSize;
    const uint64_t sent = size() > 1 ? bytes - counts[(rank() + 1) % size()] * elementSize : 0;
    const uint64_t received = size() > 1 ? bytes - counts[rank()] * elementSize : 0;
    recordOp(OpKind::kAllGather, sent, received, watch.seconds());
  });
}

WorkPtr GlooCommunicator::broadcastAsync(at::Tensor tensor, int root, CallOptions options) {
  checkTensor(tensor, "broadcast on group '" + name() + "'");
  checkPeer(root, "broadcast root");
  OpInfo info = nextOp(OpKind::kBroadcast, &tensor, tensor.numel(), root);
  return enqueueCollective(info, effectiveTimeout(options),
                           [this, tensor, root](const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    const size_t bytes = byteSize(tensor);
    if (bytes > 0 && size() > 1) {
      gloo::BroadcastOptions opts(context);
      opts.setOutput(static_cast<uint8_t*>(tensor.data_ptr()), bytes);
      opts.setRoot(root);
      opts.setTag(tag);
      opts.setTimeout(timeout);
      gloo::broadcast(opts);
    }
    const uint64_t sent = bytes * binomialChildren(rank(), root, size());
    const uint64_t received = rank() == root ? 0 : bytes;
    recordOp(OpKind::kBroadcast, sent, received, watch.seconds());
  });
}

WorkPtr GlooCommunicator::allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                                        std::vector<int64_t> recvCounts, CallOptions options) {
  const std::string what = "allToAll on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  allToAllCounts(input, output, &sendCounts, &recvCounts, size(), what);
  // Send counts legitimately differ per rank, so only the op and dtype are verified.
  OpInfo info = nextOp(OpKind::kAllToAll, &input, 0);
  return enqueueCollective(info, effectiveTimeout(options), [this, input, output, sendCounts, recvCounts](
                                                                const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    const int64_t elementSize = input.element_size();
    if (size() == 1) {
      if (input.numel() > 0) std::memcpy(output.data_ptr(), input.data_ptr(), input.numel() * elementSize);
    } else {
      gloo::AlltoallvOptions opts(context);
      std::vector<int64_t> sendBytes(sendCounts), recvBytes(recvCounts);
      for (auto& c : sendBytes) c *= elementSize;
      for (auto& c : recvBytes) c *= elementSize;
      uint8_t dummyIn = 0, dummyOut = 0;
      opts.setInput(input.numel() > 0 ? static_cast<uint8_t*>(input.data_ptr()) : &dummyIn, sendBytes);
      opts.setOutput(output.numel() > 0 ? static_cast<uint8_t*>(output.data_ptr()) : &dummyOut, recvBytes);
      opts.setTag(tag);
      opts.setTimeout(timeout);
      gloo::alltoallv(opts);
    }
    const uint64_t sent = (input.numel() - sendCounts[rank()]) * elementSize;
    const uint64_t received = (output.numel() - recvCounts[rank()]) * elementSize;
    recordOp(OpKind::kAllToAll, sent, received, watch.seconds());
  });
}

WorkPtr GlooCommunicator::barrierAsync(CallOptions options) {
  OpInfo info = nextOp(OpKind::kBarrier, nullptr, 0);
  return enqueueCollective(info, effectiveTimeout(options),
                           [this](const ContextPtr& context, Timeout timeout, uint32_t tag) {
    Stopwatch watch;
    if (size() > 1) {
      gloo::BarrierOptions opts(context);
      opts.setTag(tag);
      opts.setTimeout(timeout);
      gloo::barrier(opts);
    }
    recordOp(OpKind::kBarrier, 0, 0, watch.seconds());
  });
}

void GlooCommunicator::checkPeer(int peer, const char* what) const {
  TESSERA_CHECK_ARG(peer >= 0 && peer < size(),
                    what << " " << peer << " is outside group '" << name() << "' of size " << size());
}

namespace {

// A posted send or recv on a Gloo unbound buffer. wait() blocks on Gloo's
// completion with the remaining time; the tensor stays referenced until then.
class GlooP2PWork final : public Work {
 public:
  GlooP2PWork(std::unique_ptr<gloo::transport::UnboundBuffer> buffer, at::Tensor tensor, bool isSend,
              std::string description, Timeout timeout, std::function<void(double)> onComplete,
              std::function<void(const std::string&)> onFailure)
      : buffer_(std::move(buffer)),
        tensor_(std::move(tensor)),
        isSend_(isSend),
        description_(std::move(description)),
        timeout_(timeout),
        deadline_(timeout),
        onComplete_(std::move(onComplete)),
        onFailure_(std::move(onFailure)) {}

  void wait(Timeout timeout) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_) {
      if (!error_.empty()) throw CommError(error_);
      return;
    }
    const Timeout limit = timeout.count() < 0 ? std::max(deadline_.remaining(), Timeout(1)) : timeout;
    try {
      if (isSend_) {
        buffer_->waitSend(limit);
      } else {
        buffer_->waitRecv(limit);
      }
    } catch (const std::exception& e) {
      const std::string what = e.what();
      done_ = true;
      if (what.find("Timed out") != std::string::npos) {
        error_ = description_ + " timed out after " + std::to_string(limit.count()) +
                 " ms: the peer never posted the matching " + (isSend_ ? "recv" : "send") +
                 " with this tag (or it is dead)";
        // Gloo closes the pair on a timeout, so the group cannot continue.
        onFailure_(error_);
        throw TimeoutError(error_);
      }
      error_ = description_ + " failed: " + what;
      onFailure_(error_);
      throw CommError(error_);
    }
    finish();
  }

  bool isCompleted() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_) return true;
    try {
      if (isSend_) {
        buffer_->waitSend(Timeout(0));
      } else {
        buffer_->waitRecv(Timeout(0));
      }
    } catch (const std::exception& e) {
      if (std::string(e.what()).find("Timed out") != std::string::npos) return false;
      done_ = true;
      error_ = description_ + " failed: " + e.what();
      onFailure_(error_);
      return true;
    }
    finish();
    return true;
  }

 private:
  void finish() {
    done_ = true;
    onComplete_(watch_.seconds());
  }

  std::mutex mutex_;
  std::unique_ptr<gloo::transport::UnboundBuffer> buffer_;
  at::Tensor tensor_;
  bool isSend_;
  std::string description_;
  Timeout timeout_;
  Deadline deadline_;
  Stopwatch watch_;
  std::function<void(double)> onComplete_;
  std::function<void(const std::string&)> onFailure_;
  bool done_ = false;
  std::string error_;
};

}  // namespace

WorkPtr GlooCommunicator::sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options) {
  checkTensor(tensor, "send on group '" + name() + "'");
  checkPeer(dst, "send destination");
  TESSERA_CHECK_ARG(dst != rank(), "send to self (rank " << dst << ") in group '" << name() << "'");
  TESSERA_CHECK_ARG(tag >= 0, "send tag must be >= 0, got " << tag);
  const uint64_t bytes = byteSize(tensor);
  auto buffer = context()->createUnboundBuffer(tensor.data_ptr(), bytes);
  buffer->send(dst, gloo::Slot::build(kUserP2PSlotPrefix, static_cast<uint32_t>(tag)));
  const std::string description = "send of " + dtypeName(tensor.scalar_type()) + "[" +
                                  std::to_string(tensor.numel()) + "] to rank " + std::to_string(dst) + " tag " +
                                  std::to_string(tag) + " on group '" + name() + "' (gloo)";
  return std::make_shared<GlooP2PWork>(std::move(buffer), tensor, true, description, effectiveTimeout(options),
                                       [this, bytes](double s) { recordOp(OpKind::kSend, bytes, 0, s); },
                                       [this](const std::string& reason) { markBroken(reason); });
}

WorkPtr GlooCommunicator::recvAsync(at::Tensor tensor, int src, int tag, CallOptions options) {
  checkTensor(tensor, "recv on group '" + name() + "'");
  checkPeer(src, "recv source");
  TESSERA_CHECK_ARG(src != rank(), "recv from self (rank " << src << ") in group '" << name() << "'");
  TESSERA_CHECK_ARG(tag >= 0, "recv tag must be >= 0, got " << tag);
  const uint64_t bytes = byteSize(tensor);
  auto buffer = context()->createUnboundBuffer(tensor.data_ptr(), bytes);
  buffer->recv(src, gloo::Slot::build(kUserP2PSlotPrefix, static_cast<uint32_t>(tag)));
  const std::string description = "recv of " + dtypeName(tensor.scalar_type()) + "[" +
                                  std::to_string(tensor.numel()) + "] from rank " + std::to_string(src) + " tag " +
                                  std::to_string(tag) + " on group '" + name() + "' (gloo)";
  return std::make_shared<GlooP2PWork>(std::move(buffer), tensor, false, description, effectiveTimeout(options),
                                       [this, bytes](double s) { recordOp(OpKind::kRecv, 0, bytes, s); },
                                       [this](const std::string& reason) { markBroken(reason); });
}

CommPtr GlooCommunicator::split(int color, int key, const std::string& suffix) {
  // Everyone learns everyone's (color, key); each group then rendezvous under
  // a prefix unique to this split and color.
  const std::vector<int> members = splitMembers(gatherColorKeys(*this, color, key), color);
  const int splitIndex = splitSeq_++;
  if (members.empty()) return nullptr;
  const int newRank = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
  GlooOptions childOptions = options_;
  childOptions.name = name() + "/" + suffix;
  childOptions.timeout = timeout();
  const std::string childPrefix = prefix_ + "/split" + std::to_string(splitIndex) + "/" + std::to_string(color);
  return std::make_shared<GlooCommunicator>(rootStore_, childPrefix, newRank, static_cast<int>(members.size()),
                                            childOptions, device_);
}

}  // namespace tessera::comm::detail

namespace tessera::comm {

bool glooBackendBuilt() { return true; }

CommPtr makeGlooCommunicator(StorePtr store, const std::string& prefix, int rank, int size, GlooOptions options) {
  TESSERA_CHECK_ARG(store != nullptr, "makeGlooCommunicator needs a store");
  TESSERA_CHECK_ARG(size >= 1, "group size must be >= 1, got " << size);
  TESSERA_CHECK_ARG(rank >= 0 && rank < size, "rank " << rank << " is outside a group of size " << size);
  return std::make_shared<detail::GlooCommunicator>(std::move(store), prefix, rank, size, options, nullptr);
}

}  // namespace tessera::comm
