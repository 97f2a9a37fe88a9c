#include "comm/nccl/nccl_communicator.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "comm/tensor_checks.h"
#include "tessera/core/error.h"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
#error "tessera's NCCL backend needs NCCL >= 2.10 (ncclAvg, ncclBfloat16); configure with -DTESSERA_WITH_NCCL=OFF"
#endif
// ncclCommSplit appeared in 2.18. TESSERA_NCCL_SPLIT_VIA_STORE forces the
// store path on newer NCCL too (to compile-test it).
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0) && !defined(TESSERA_NCCL_SPLIT_VIA_STORE)
#define TESSERA_NCCL_HAS_SPLIT 1
#else
#define TESSERA_NCCL_HAS_SPLIT 0
#endif

namespace tessera::comm::detail {
namespace {

ncclDataType_t ncclTypeOf(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    default: break;
  }
  throw InvalidArgument("dtype " + dtypeName(type) + " has no NCCL equivalent");
}

// ncclAvg divides the sum by the group size; for integer dtypes NCCL divides
// the integer sum, i.e. truncates, as communicator.h promises.
ncclRedOp_t ncclOpOf(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  throw InvalidArgument("unknown ReduceOp");
}

uint8_t* bytesOf(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

bool allEqual(const std::vector<int64_t>& counts) {
  return std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) == counts.end();
}

// ncclGroupStart/End as a scope: NCCL's group depth is per thread, so a
// group left open by an exception would swallow every later NCCL call.
class NcclGroupScope {
 public:
  NcclGroupScope(ncclComm_t comm, std::string what) : comm_(comm), what_(std::move(what)) {
    checkNccl(ncclGroupStart(), comm_, what_ + ": ncclGroupStart");
  }
  ~NcclGroupScope() {
    if (open_) ncclGroupEnd();
  }
  void end() {
    open_ = false;
    checkNccl(ncclGroupEnd(), comm_, what_ + ": ncclGroupEnd");
  }

 private:
  ncclComm_t comm_;
  std::string what_;
  bool open_ = true;
};

int resolveDevice(int requested) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw NotSupported(std::string("the NCCL backend needs a CUDA device but none is visible (cudaGetDeviceCount: ") +
                       (status == cudaSuccess ? "0 devices" : cudaGetErrorString(status)) +
                       "); check the driver and CUDA_VISIBLE_DEVICES, or use --backend gloo");
  }
  int device = requested;
  if (device < 0) checkCuda(cudaGetDevice(&device), "cudaGetDevice");
  TESSERA_CHECK_ARG(device < count, "CUDA device " << device << " does not exist: this process sees " << count
                                                   << " (check CUDA_VISIBLE_DEVICES and NcclOptions::device)");
  return device;
}

constexpr const char* kUniqueIdKey = "nccl/unique_id";

}  // namespace

NcclCommunicator::NcclCommunicator(StorePtr rootStore, std::string prefix, int rank, int size,
                                   const NcclOptions& options, int device, ncclComm_t existing)
    : Communicator(rank, size, options.name),
      rootStore_(std::move(rootStore)),
      prefix_(std::move(prefix)),
      store_(makePrefixStore(prefix_, rootStore_)),
      options_(options),
      device_(device),
      sendSeq_(size, 0),
      recvSeq_(size, 0) {
  setTimeout(options.timeout);
  CudaDeviceGuard guard(device_);
  ncclComm_t comm = existing != nullptr ? existing : initThroughStore();
  group_ = std::make_shared<NcclGroup>(comm, device_, name(), timeout());
}

ncclComm_t NcclCommunicator::initThroughStore() {
  const std::string where = "forming NCCL group '" + name() + "' (rank " + std::to_string(rank()) + " of " +
                            std::to_string(size()) + ", cuda:" + std::to_string(device_) + ") through " +
                            store_->describe();
  ncclUniqueId id;
  if (rank() == 0) {
    checkNccl(ncclGetUniqueId(&id), nullptr, where + ": ncclGetUniqueId");
    store_->set(kUniqueIdKey, Bytes(id.internal, id.internal + sizeof(id.internal)));
  }
  // ncclCommInitRank waits for every rank without a timeout, so everyone first
  // checks in through the store: a rank that never comes fails here, by name.
  auto joined = makePrefixStore("nccl/joined", store_);
  joined->setString(std::to_string(rank()), "1");
  std::vector<std::string> ranks;
  for (int r = 0; r < size(); ++r) ranks.push_back(std::to_string(r));
  try {
    joined->wait(ranks, timeout());
  } catch (const TimeoutError&) {
    throw TimeoutError(where + " failed: not every rank joined within " + std::to_string(timeout().count()) +
                       " ms; ranks that never registered: " + describeMissingKeys(*joined, ranks));
  }
  if (rank() != 0) {
    const Bytes bytes = store_->get(kUniqueIdKey, timeout());
    TESSERA_CHECK_T(CommError, bytes.size() == sizeof(id.internal),
                    where << ": the NCCL unique id in the store has " << bytes.size() << " bytes, expected "
                          << sizeof(id.internal) << " (ranks built against different NCCL versions?)");
    std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  }
  ncclComm_t comm = nullptr;
  checkNccl(ncclCommInitRank(&comm, size(), id, rank()), nullptr, where + ": ncclCommInitRank");
  return comm;
}

void NcclCommunicator::checkCudaTensor(const at::Tensor& t, const std::string& what) const {
  checkTensor(t, what, /*allowCuda=*/true);
  TESSERA_CHECK_ARG(t.is_cuda() && t.device().index() == device_,
                    what << ": tensor is on " << t.device().str() << " but this NCCL group works on cuda:"
                         << device_ << "; move it with .to(at::Device(at::kCUDA, " << device_
                         << ")) or use a Gloo group for CPU tensors");
}

void NcclCommunicator::checkPeer(int peer, const char* what) const {
  TESSERA_CHECK_ARG(peer >= 0 && peer < size(),
                    what << " " << peer << " is outside group '" << name() << "' of size " << size());
}

OpInfo NcclCommunicator::nextCollective(OpKind kind, const at::Tensor* tensor, int64_t numel, int peer) {
  return makeOpInfo(kind, collectiveSeq_++, tensor, numel, peer);
}

WorkPtr NcclCommunicator::launch(const OpInfo& info, const CallOptions& options, std::vector<at::Tensor> tensors,
                                 uint64_t bytesSent, uint64_t bytesReceived, const Body& body) {
  NcclWorkContext context;
  context.info = info;
  context.collective = info.kind != OpKind::kSend && info.kind != OpKind::kRecv;
  context.description = info.describe() + " on group '" + name() + "' (nccl, rank " + std::to_string(rank()) +
                        " of " + std::to_string(size()) + ")";
  context.timeout = effectiveTimeout(options);
  context.store = store_;
  context.rank = rank();
  context.size = size();
  std::weak_ptr<NcclCommunicator> self = weak_from_this();
  const OpKind kind = info.kind;
  context.onComplete = [self, kind, bytesSent, bytesReceived](double seconds) {
    if (auto alive = self.lock()) alive->recordOp(kind, bytesSent, bytesReceived, seconds);
  };

  CudaDeviceGuard guard(device_);
  cudaEvent_t event = nullptr;
  checkCuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), context.description + ": cudaEventCreate");
  try {
    group_->enqueue([&](ncclComm_t comm, cudaStream_t stream) {
      body(comm, stream, context.description);
      checkCuda(cudaEventRecord(event, stream), context.description + ": cudaEventRecord");
    });
  } catch (const Error& e) {
    cudaEventDestroy(event);
    // A failed enqueue leaves NCCL's state unknown: no later call may use it.
    group_->abort(e.what());
    throw;
  }
  return std::make_shared<NcclWork>(group_, event, std::move(tensors), std::move(context));
}

WorkPtr NcclCommunicator::allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options) {
  checkCudaTensor(tensor, "allReduce on group '" + name() + "'");
  std::lock_guard<std::mutex> lock(issueMutex_);
  const OpInfo info = nextCollective(OpKind::kAllReduce, &tensor, tensor.numel());
  // Ring model: each rank sends and receives 2(n-1)/n of the buffer.
  const uint64_t bytes = static_cast<uint64_t>(byteSize(tensor)) * 2 * (size() - 1) / size();
  return launch(info, options, {tensor}, bytes, bytes,
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    if (tensor.numel() == 0) return;
    checkNccl(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), ncclTypeOf(tensor.scalar_type()),
                            ncclOpOf(op), comm, stream),
              comm, label + ": ncclAllReduce");
  });
}

WorkPtr NcclCommunicator::reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op,
                                             std::vector<int64_t> counts, CallOptions options) {
  const std::string what = "reduceScatter on group '" + name() + "'";
  checkCudaTensor(input, what + " input");
  checkCudaTensor(output, what + " output");
  counts = reduceScatterCounts(input, output, std::move(counts), rank(), size(), what);
  std::lock_guard<std::mutex> lock(issueMutex_);
  OpInfo info = nextCollective(OpKind::kReduceScatter, &input, input.numel());
  info.countsDigest = digestCounts(counts);
  // Ring model: a rank sends every chunk but its own, receives every chunk but its predecessor's.
  const uint64_t elementSize = input.element_size();
  const uint64_t sent = (input.numel() - counts[rank()]) * elementSize;
  const uint64_t received = (input.numel() - counts[(rank() + size() - 1) % size()]) * elementSize;
  return launch(info, options, {input, output}, sent, received,
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    const ncclDataType_t type = ncclTypeOf(input.scalar_type());
    if (allEqual(counts)) {
      if (counts[0] == 0) return;
      checkNccl(ncclReduceScatter(input.data_ptr(), output.data_ptr(), counts[0], type, ncclOpOf(op), comm, stream),
                comm, label + ": ncclReduceScatter");
      return;
    }
    // Uneven: one reduce per chunk, rooted at its owner, fused into one launch.
    // recvbuff is ignored on non-roots; they pass their send chunk.
    const std::vector<int64_t> offsets = exclusiveOffsets(counts);
    NcclGroupScope group(comm, label);
    for (int r = 0; r < size(); ++r) {
      if (counts[r] == 0) continue;
      uint8_t* chunk = bytesOf(input) + offsets[r] * elementSize;
      void* target = r == rank() ? output.data_ptr() : chunk;
      checkNccl(ncclReduce(chunk, target, counts[r], type, ncclOpOf(op), r, comm, stream), comm,
                label + ": ncclReduce");
    }
    group.end();
  });
}

WorkPtr NcclCommunicator::allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                                         CallOptions options) {
  const std::string what = "allGather on group '" + name() + "'";
  checkCudaTensor(input, what + " input");
  checkCudaTensor(output, what + " output");
  counts = allGatherCounts(input, output, std::move(counts), rank(), size(), what);
  std::lock_guard<std::mutex> lock(issueMutex_);
  // Inputs differ in size when counts are uneven; the output and the counts agree everywhere.
  OpInfo info = nextCollective(OpKind::kAllGather, &input, output.numel());
  info.countsDigest = digestCounts(counts);
  const uint64_t elementSize = input.element_size();
  const uint64_t total = output.numel() * elementSize;
  const uint64_t sent = size() > 1 ? total - counts[(rank() + 1) % size()] * elementSize : 0;
  const uint64_t received = size() > 1 ? total - counts[rank()] * elementSize : 0;
  return launch(info, options, {input, output}, sent, received,
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    const ncclDataType_t type = ncclTypeOf(input.scalar_type());
    if (allEqual(counts)) {
      if (counts[0] == 0) return;
      checkNccl(ncclAllGather(input.data_ptr(), output.data_ptr(), counts[0], type, comm, stream), comm,
                label + ": ncclAllGather");
      return;
    }
    // Uneven: every rank broadcasts its piece into its slot of output.
    // sendbuff is read on the root only; the others pass their slot.
    const std::vector<int64_t> offsets = exclusiveOffsets(counts);
    NcclGroupScope group(comm, label);
    for (int r = 0; r < size(); ++r) {
      if (counts[r] == 0) continue;
      uint8_t* slot = bytesOf(output) + offsets[r] * elementSize;
      const void* source = r == rank() ? input.data_ptr() : slot;
      checkNccl(ncclBroadcast(source, slot, counts[r], type, r, comm, stream), comm, label + ": ncclBroadcast");
    }
    group.end();
  });
}

WorkPtr NcclCommunicator::broadcastAsync(at::Tensor tensor, int root, CallOptions options) {
  checkCudaTensor(tensor, "broadcast on group '" + name() + "'");
  checkPeer(root, "broadcast root");
  std::lock_guard<std::mutex> lock(issueMutex_);
  const OpInfo info = nextCollective(OpKind::kBroadcast, &tensor, tensor.numel(), root);
  // Ring (pipeline) model: every rank but the root receives the buffer;
  // every rank but the root's predecessor, the ring's end, forwards it.
  const uint64_t bytes = byteSize(tensor);
  const bool ringEnd = rank() == (root + size() - 1) % size();
  const uint64_t sent = size() > 1 && !ringEnd ? bytes : 0;
  const uint64_t received = rank() == root ? 0 : bytes;
  return launch(info, options, {tensor}, sent, received,
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    if (tensor.numel() == 0) return;
    checkNccl(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), ncclTypeOf(tensor.scalar_type()),
                            root, comm, stream),
              comm, label + ": ncclBroadcast");
  });
}

WorkPtr NcclCommunicator::allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                                        std::vector<int64_t> recvCounts, CallOptions options) {
  const std::string what = "allToAll on group '" + name() + "'";
  checkCudaTensor(input, what + " input");
  checkCudaTensor(output, what + " output");
  allToAllCounts(input, output, &sendCounts, &recvCounts, size(), what);
  TESSERA_CHECK_ARG(sendCounts[rank()] == recvCounts[rank()],
                    what << ": this rank sends itself " << sendCounts[rank()] << " elements but expects to receive "
                         << recvCounts[rank()]);
  std::lock_guard<std::mutex> lock(issueMutex_);
  // Send counts legitimately differ per rank, so only the op and dtype are compared.
  const OpInfo info = nextCollective(OpKind::kAllToAll, &input, 0);
  const uint64_t elementSize = input.element_size();
  const uint64_t sent = (input.numel() - sendCounts[rank()]) * elementSize;
  const uint64_t received = (output.numel() - recvCounts[rank()]) * elementSize;
  return launch(info, options, {input, output}, sent, received,
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    const ncclDataType_t type = ncclTypeOf(input.scalar_type());
    const std::vector<int64_t> sendOffsets = exclusiveOffsets(sendCounts);
    const std::vector<int64_t> recvOffsets = exclusiveOffsets(recvCounts);
    const int me = rank();
    if (sendCounts[me] > 0) {
      checkCuda(cudaMemcpyAsync(bytesOf(output) + recvOffsets[me] * elementSize,
                                bytesOf(input) + sendOffsets[me] * elementSize, sendCounts[me] * elementSize,
                                cudaMemcpyDeviceToDevice, stream),
                label + ": copying this rank's own slice");
    }
    // All sends and recvs in one group: NCCL posts them together, so no
    // ordering between peers can deadlock.
    NcclGroupScope group(comm, label);
    for (int peer = 0; peer < size(); ++peer) {
      if (peer == me) continue;
      if (sendCounts[peer] > 0) {
        checkNccl(ncclSend(bytesOf(input) + sendOffsets[peer] * elementSize, sendCounts[peer], type, peer, comm,
                           stream),
                  comm, label + ": ncclSend");
      }
      if (recvCounts[peer] > 0) {
        checkNccl(ncclRecv(bytesOf(output) + recvOffsets[peer] * elementSize, recvCounts[peer], type, peer, comm,
                           stream),
                  comm, label + ": ncclRecv");
      }
    }
    group.end();
  });
}

WorkPtr NcclCommunicator::barrierAsync(CallOptions options) {
  std::lock_guard<std::mutex> lock(issueMutex_);
  const OpInfo info = nextCollective(OpKind::kBarrier, nullptr, 0);
  // An all-reduce of one word: it cannot finish before every rank issued it.
  float* word = group_->scratch();
  return launch(info, options, {}, 0, 0, [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    checkNccl(ncclAllReduce(word, word, 1, ncclFloat32, ncclSum, comm, stream), comm, label + ": ncclAllReduce");
  });
}

WorkPtr NcclCommunicator::sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options) {
  checkCudaTensor(tensor, "send on group '" + name() + "'");
  checkPeer(dst, "send destination");
  TESSERA_CHECK_ARG(dst != rank(), "send to self (rank " << dst << ") in group '" << name() << "'");
  TESSERA_CHECK_ARG(tag >= 0, "send tag must be >= 0, got " << tag);
  std::lock_guard<std::mutex> lock(issueMutex_);
  // NCCL has no tags: the k-th send to a peer matches its k-th recv from us;
  // seq counts exactly that, so errors name the pair that did not match.
  OpInfo info;
  info.kind = OpKind::kSend;
  info.seq = sendSeq_[dst]++;
  info.dtype = dtypeName(tensor.scalar_type());
  info.numel = tensor.numel();
  info.peer = dst;
  const uint64_t bytes = byteSize(tensor);
  return launch(info, options, {tensor}, bytes, 0, [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    if (tensor.numel() == 0) return;
    checkNccl(ncclSend(tensor.data_ptr(), tensor.numel(), ncclTypeOf(tensor.scalar_type()), dst, comm, stream), comm,
              label + ": ncclSend");
  });
}

WorkPtr NcclCommunicator::recvAsync(at::Tensor tensor, int src, int tag, CallOptions options) {
  checkCudaTensor(tensor, "recv on group '" + name() + "'");
  checkPeer(src, "recv source");
  TESSERA_CHECK_ARG(src != rank(), "recv from self (rank " << src << ") in group '" << name() << "'");
  TESSERA_CHECK_ARG(tag >= 0, "recv tag must be >= 0, got " << tag);
  std::lock_guard<std::mutex> lock(issueMutex_);
  OpInfo info;
  info.kind = OpKind::kRecv;
  info.seq = recvSeq_[src]++;
  info.dtype = dtypeName(tensor.scalar_type());
  info.numel = tensor.numel();
  info.peer = src;
  const uint64_t bytes = byteSize(tensor);
  return launch(info, options, {tensor}, 0, bytes, [&](ncclComm_t comm, cudaStream_t stream, const std::string& label) {
    if (tensor.numel() == 0) return;
    checkNccl(ncclRecv(tensor.data_ptr(), tensor.numel(), ncclTypeOf(tensor.scalar_type()), src, comm, stream), comm,
              label + ": ncclRecv");
  });
}

std::vector<std::pair<int, int>> NcclCommunicator::exchangeSplitKeys(int splitIndex, int color, int key) {
  auto keys = makePrefixStore("nccl/split" + std::to_string(splitIndex), store_);
  keys->setString(std::to_string(rank()), std::to_string(color) + " " + std::to_string(key));
  std::vector<std::string> ranks;
  for (int r = 0; r < size(); ++r) ranks.push_back(std::to_string(r));
  try {
    keys->wait(ranks, timeout());
  } catch (const TimeoutError&) {
    throw TimeoutError("split #" + std::to_string(splitIndex) + " of NCCL group '" + name() +
                       "': not every rank called split() within " + std::to_string(timeout().count()) +
                       " ms; ranks that never arrived: " + describeMissingKeys(*keys, ranks));
  }
  std::vector<std::pair<int, int>> all;
  for (int r = 0; r < size(); ++r) {
    std::istringstream in(keys->getString(ranks[r], timeout()));
    std::pair<int, int> entry;
    TESSERA_CHECK_T(CommError, static_cast<bool>(in >> entry.first >> entry.second),
                    "split of NCCL group '" << name() << "': rank " << r << " published an unreadable color/key");
    all.push_back(entry);
  }
  return all;
}

CommPtr NcclCommunicator::split(int color, int key, const std::string& suffix) {
  std::lock_guard<std::mutex> lock(issueMutex_);
  const int splitIndex = splitSeq_++;
  const std::vector<std::pair<int, int>> all = exchangeSplitKeys(splitIndex, color, key);
  const std::vector<int> members =
      splitMembers(std::vector<std::pair<int64_t, int64_t>>(all.begin(), all.end()), color);
  NcclOptions childOptions = options_;
  childOptions.name = name() + "/" + suffix;
  childOptions.timeout = timeout();
  childOptions.device = device_;
  const std::string childPrefix = prefix_ + "/split" + std::to_string(splitIndex) + "/" + std::to_string(color);
  const int childSize = static_cast<int>(members.size());
  int childRank = 0;
  while (childRank < childSize && members[childRank] != rank()) ++childRank;
#if TESSERA_NCCL_HAS_SPLIT
  // Every rank is known to be here (the exchange above), so ncclCommSplit,
  // which has no timeout, will not wait for an absent one.
  CudaDeviceGuard guard(device_);
  ncclComm_t child = nullptr;
  group_->enqueue([&](ncclComm_t comm, cudaStream_t) {
    checkNccl(ncclCommSplit(comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr), comm,
              "ncclCommSplit of group '" + name() + "' into '" + childOptions.name + "'");
  });
  if (color < 0) return nullptr;
  int ncclRank = -1;
  int ncclSize = -1;
  ncclCommUserRank(child, &ncclRank);
  ncclCommCount(child, &ncclSize);
  if (ncclRank != childRank || ncclSize != childSize) {
    ncclCommAbort(child);
    throw CommError("ncclCommSplit placed this rank at " + std::to_string(ncclRank) + " of " +
                    std::to_string(ncclSize) + " in '" + childOptions.name + "' but the (color, key) exchange says " +
                    std::to_string(childRank) + " of " + std::to_string(childSize));
  }
  return std::make_shared<NcclCommunicator>(rootStore_, childPrefix, childRank, childSize, childOptions, device_,
                                            child);
#else
  if (color < 0) return nullptr;
  return std::make_shared<NcclCommunicator>(rootStore_, childPrefix, childRank, childSize, childOptions, device_);
#endif
}

}  // namespace tessera::comm::detail

namespace tessera::comm {

bool ncclBackendBuilt() { return true; }

int ncclDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

CommPtr makeNcclCommunicator(StorePtr store, const std::string& prefix, int rank, int size, NcclOptions options) {
  TESSERA_CHECK_ARG(store != nullptr, "makeNcclCommunicator needs a store");
  TESSERA_CHECK_ARG(size >= 1, "group size must be >= 1, got " << size);
  TESSERA_CHECK_ARG(rank >= 0 && rank < size, "rank " << rank << " is outside a group of size " << size);
  const int device = detail::resolveDevice(options.device);
  return std::make_shared<detail::NcclCommunicator>(std::move(store), prefix, rank, size, options, device);
}

}  // namespace tessera::comm
