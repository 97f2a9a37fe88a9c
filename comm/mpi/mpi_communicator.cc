// The MPI backend: each Communicator operation as one MPI call (see
// mpi_communicator.h), and the public factory of tessera/comm/mpi.h.
#include "comm/mpi/mpi_communicator.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "comm/mpi/mpi_runtime.h"
#include "comm/mpi/mpi_work.h"
#include "comm/reduce_kernels.h"
#include "comm/tensor_checks.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm::detail {
namespace {

bool allEqual(const std::vector<int64_t>& counts) {
  return std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) == counts.end();
}

std::vector<int> mpiDisplacements(const std::vector<int64_t>& counts, const std::string& what) {
  return mpiCounts(exclusiveOffsets(counts), what);
}

// kAvg: MPI sums, then every rank divides its own result.
std::function<void()> averageAfterSum(ReduceOp op, const at::Tensor& result, int groupSize) {
  if (op != ReduceOp::kAvg) return nullptr;
  return [result, groupSize] {
    if (result.numel() > 0) divideInPlace(result.data_ptr(), result.numel(), result.scalar_type(), groupSize);
  };
}

}  // namespace

MpiCommunicator::MpiCommunicator(std::shared_ptr<MpiGroup> group, Timeout timeout, bool verifyCollectives)
    : Communicator(group->rank(), group->size(), group->name()),
      group_(std::move(group)),
      verifyCollectives_(verifyCollectives && group_->size() > 1) {
  setTimeout(timeout);
  group_->setRecorder([this](OpKind kind, uint64_t sent, uint64_t received, double seconds) {
    recordOp(kind, sent, received, seconds);
  });
  queue_ = std::make_unique<OpQueue>("mpi group '" + name() + "'");
}

MpiCommunicator::~MpiCommunicator() {
  if (!group_->broken()) {
    try {
      drain();
    } catch (const std::exception& e) {
      TESSERA_LOG(kWarn) << "destroying " << group_->where() << " with a failed operation: " << e.what();
    }
  }
  group_->setRecorder(nullptr);
  if (group_->busy()) {
    // See the header: the worker is blocked in MPI for good; OpQueue would
    // detach it and free what it still uses once (if ever) MPI returns.
    (void)queue_.release();
  } else {
    queue_.reset();
  }
}

void MpiCommunicator::drain() {
  auto marker = queue_->enqueue([] {}, "draining " + group_->where(), timeout());
  // Not a collective: the sequence number only names it if the group breaks.
  MpiCollectiveWork(std::move(marker), group_, UINT64_MAX, "draining " + group_->where()).wait();
}

OpInfo MpiCommunicator::nextOp(OpKind kind, const at::Tensor* tensor, int64_t numel, Timeout timeout, int peer,
                               uint64_t countsDigest) {
  const OpInfo info = makeOpInfo(kind, collectiveSeq_++, tensor, numel, peer, countsDigest);
  group_->remember(info, timeout);
  return info;
}

WorkPtr MpiCommunicator::enqueueCollective(const OpInfo& info, Timeout timeout, std::optional<Traffic> traffic,
                                           MpiCall call, std::function<void()> after) {
  group_->throwIfBroken();
  const std::string description = info.describe() + " on " + group_->where();
  // The lambda holds the group, not `this`: if the group breaks, the call may
  // return long after the communicator is gone.
  auto run = [group = group_, verify = verifyCollectives_, info, timeout, traffic, issued = Stopwatch(),
              call = std::move(call), after = std::move(after)] {
    group->throwIfBroken();  // queued behind a failure: fail without touching MPI
    group->beginOp(info, timeout);
    int code = MPI_SUCCESS;
    try {
      if (verify) group->verifyAcrossRanks(info, timeout);
      code = call(group->comm());
    } catch (...) {
      group->endOp();
      throw;
    }
    group->endOp();
    if (code != MPI_SUCCESS) group->failOp(info, timeout, code);
    if (after) after();
    if (traffic) group->record(info.kind, traffic->sent, traffic->received, issued.seconds());
  };
  // The backstop is unused: MpiCollectiveWork::wait enforces the timeout.
  auto inner = queue_->enqueue(std::move(run), description, timeout);
  return std::make_shared<MpiCollectiveWork>(std::move(inner), group_, info.seq, description);
}

WorkPtr MpiCommunicator::allReduceAsync(at::Tensor tensor, ReduceOp op, CallOptions options) {
  const std::string what = "allReduce on group '" + name() + "'";
  checkTensor(tensor, what);
  const int count = mpiCount(tensor.numel(), what);
  const MPI_Datatype type = mpiDatatype(tensor.scalar_type());
  const MPI_Op mpiOp = mpiReduceOp(tensor.scalar_type(), op);
  const Timeout timeout = effectiveTimeout(options);
  const OpInfo info = nextOp(OpKind::kAllReduce, &tensor, tensor.numel(), timeout);
  const uint64_t bytes = static_cast<uint64_t>(byteSize(tensor)) * 2 * (size() - 1) / size();
  return enqueueCollective(
      info, timeout, Traffic{bytes, bytes},
      [tensor, count, type, mpiOp](MPI_Comm comm) {
        return MPI_Allreduce(MPI_IN_PLACE, mpiBuffer(tensor), count, type, mpiOp, comm);
      },
      averageAfterSum(op, tensor, size()));
}

WorkPtr MpiCommunicator::reduceScatterAsync(at::Tensor input, at::Tensor output, ReduceOp op,
                                            std::vector<int64_t> counts, CallOptions options) {
  const std::string what = "reduceScatter on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  counts = reduceScatterCounts(input, output, std::move(counts), rank(), size(), what);
  mpiCount(input.numel(), what);
  const std::vector<int> recvCounts = mpiCounts(counts, what);
  const MPI_Datatype type = mpiDatatype(input.scalar_type());
  const MPI_Op mpiOp = mpiReduceOp(input.scalar_type(), op);
  const Timeout timeout = effectiveTimeout(options);
  const OpInfo info = nextOp(OpKind::kReduceScatter, &input, input.numel(), timeout, -1, digestCounts(counts));
  const uint64_t bytes = static_cast<uint64_t>(input.numel() - counts[rank()]) * input.element_size();
  return enqueueCollective(
      info, timeout, Traffic{bytes, bytes},
      [input, output, recvCounts, type, mpiOp](MPI_Comm comm) {
        return MPI_Reduce_scatter(mpiBuffer(input), mpiBuffer(output), recvCounts.data(), type, mpiOp, comm);
      },
      averageAfterSum(op, output, size()));
}

WorkPtr MpiCommunicator::allGatherAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> counts,
                                        CallOptions options) {
  const std::string what = "allGather on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  counts = allGatherCounts(input, output, std::move(counts), rank(), size(), what);
  mpiCount(output.numel(), what);
  const std::vector<int> recvCounts = mpiCounts(counts, what);
  const std::vector<int> displacements = mpiDisplacements(counts, what);
  const bool equal = allEqual(counts);
  const MPI_Datatype type = mpiDatatype(input.scalar_type());
  const Timeout timeout = effectiveTimeout(options);
  // The output size, not the input's: uneven inputs legitimately differ.
  const OpInfo info = nextOp(OpKind::kAllGather, &input, output.numel(), timeout, -1, digestCounts(counts));
  const uint64_t bytes = static_cast<uint64_t>(output.numel() - counts[rank()]) * input.element_size();
  const int mine = recvCounts[rank()];
  return enqueueCollective(info, timeout, Traffic{bytes, bytes},
                           [input, output, recvCounts, displacements, equal, mine, type](MPI_Comm comm) {
    if (equal) return MPI_Allgather(mpiBuffer(input), mine, type, mpiBuffer(output), mine, type, comm);
    return MPI_Allgatherv(mpiBuffer(input), mine, type, mpiBuffer(output), recvCounts.data(),
                          displacements.data(), type, comm);
  });
}

WorkPtr MpiCommunicator::broadcastAsync(at::Tensor tensor, int root, CallOptions options) {
  const std::string what = "broadcast on group '" + name() + "'";
  checkTensor(tensor, what);
  checkPeer(root, "broadcast root");
  const int count = mpiCount(tensor.numel(), what);
  const MPI_Datatype type = mpiDatatype(tensor.scalar_type());
  const Timeout timeout = effectiveTimeout(options);
  const OpInfo info = nextOp(OpKind::kBroadcast, &tensor, tensor.numel(), timeout, root);
  const uint64_t bytes = static_cast<uint64_t>(byteSize(tensor));
  const Traffic traffic{rank() == root && size() > 1 ? bytes : 0, rank() == root ? 0 : bytes};
  return enqueueCollective(info, timeout, traffic, [tensor, count, type, root](MPI_Comm comm) {
    return MPI_Bcast(mpiBuffer(tensor), count, type, root, comm);
  });
}

WorkPtr MpiCommunicator::allToAllAsync(at::Tensor input, at::Tensor output, std::vector<int64_t> sendCounts,
                                       std::vector<int64_t> recvCounts, CallOptions options) {
  const std::string what = "allToAll on group '" + name() + "'";
  checkTensor(input, what + " input");
  checkTensor(output, what + " output");
  allToAllCounts(input, output, &sendCounts, &recvCounts, size(), what);
  mpiCount(input.numel(), what + " input");
  mpiCount(output.numel(), what + " output");
  const std::vector<int> sendInts = mpiCounts(sendCounts, what);
  const std::vector<int> sendDispl = mpiDisplacements(sendCounts, what);
  const std::vector<int> recvInts = mpiCounts(recvCounts, what);
  const std::vector<int> recvDispl = mpiDisplacements(recvCounts, what);
  const MPI_Datatype type = mpiDatatype(input.scalar_type());
  const Timeout timeout = effectiveTimeout(options);
  // Send counts legitimately differ per rank: only the op and dtype must agree.
  const OpInfo info = nextOp(OpKind::kAllToAll, &input, 0, timeout);
  const int64_t elementSize = input.element_size();
  const Traffic traffic{static_cast<uint64_t>((input.numel() - sendCounts[rank()]) * elementSize),
                        static_cast<uint64_t>((output.numel() - recvCounts[rank()]) * elementSize)};
  return enqueueCollective(info, timeout, traffic,
                           [input, output, sendInts, sendDispl, recvInts, recvDispl, type](MPI_Comm comm) {
    return MPI_Alltoallv(mpiBuffer(input), sendInts.data(), sendDispl.data(), type, mpiBuffer(output),
                         recvInts.data(), recvDispl.data(), type, comm);
  });
}

WorkPtr MpiCommunicator::barrierAsync(CallOptions options) {
  const Timeout timeout = effectiveTimeout(options);
  const OpInfo info = nextOp(OpKind::kBarrier, nullptr, 0, timeout);
  return enqueueCollective(info, timeout, Traffic{}, [](MPI_Comm comm) { return MPI_Barrier(comm); });
}

void MpiCommunicator::checkPeer(int peer, const char* what) const {
  TESSERA_CHECK_ARG(peer >= 0 && peer < size(),
                    what << " " << peer << " is outside group '" << name() << "' of size " << size());
}

WorkPtr MpiCommunicator::postPointToPoint(at::Tensor tensor, int peer, int tag, OpKind kind,
                                          const CallOptions& options) {
  const bool isSend = kind == OpKind::kSend;
  const std::string verb = isSend ? "send" : "recv";
  const std::string what = verb + " on group '" + name() + "'";
  checkTensor(tensor, what);
  checkPeer(peer, isSend ? "send destination" : "recv source");
  TESSERA_CHECK_ARG(peer != rank(), what << ": rank " << peer << " is this rank; there is no " << verb
                                         << " to or from self");
  TESSERA_CHECK_ARG(tag >= 0 && tag <= group_->maxTag(),
                    what << ": tag " << tag << " is outside [0, " << group_->maxTag()
                         << "], the range this MPI library allows (MPI_TAG_UB)");
  const int count = mpiCount(tensor.numel(), what);
  const MPI_Datatype type = mpiDatatype(tensor.scalar_type());
  group_->throwIfBroken();
  group_->reapPending();
  const std::string description = verb + " of " + dtypeName(tensor.scalar_type()) + "[" +
                                  std::to_string(tensor.numel()) + "] " + (isSend ? "to" : "from") + " rank " +
                                  std::to_string(peer) + " tag " + std::to_string(tag) + " on " + group_->where();
  MPI_Request request = MPI_REQUEST_NULL;
  const int code = isSend ? MPI_Isend(mpiBuffer(tensor), count, type, peer, tag, group_->comm(), &request)
                          : MPI_Irecv(mpiBuffer(tensor), count, type, peer, tag, group_->comm(), &request);
  checkMpi(code, "posting the " + description);
  return std::make_shared<MpiP2PWork>(group_, request, std::move(tensor), kind, description,
                                      effectiveTimeout(options));
}

WorkPtr MpiCommunicator::sendAsync(at::Tensor tensor, int dst, int tag, CallOptions options) {
  return postPointToPoint(std::move(tensor), dst, tag, OpKind::kSend, options);
}

WorkPtr MpiCommunicator::recvAsync(at::Tensor tensor, int src, int tag, CallOptions options) {
  return postPointToPoint(std::move(tensor), src, tag, OpKind::kRecv, options);
}

CommPtr MpiCommunicator::split(int color, int key, const std::string& suffix) {
  // The allgather of (color, key) is what other backends do too (same stats);
  // here it makes a missing rank fail with the usual diagnosis before
  // MPI_Comm_split, which cannot time out either, starts.
  gatherColorKeys(*this, color, key);
  // OpKind has no split; to the other ranks' diagnosis it is a barrier.
  const OpInfo info = nextOp(OpKind::kBarrier, nullptr, 0, timeout());
  // Shared, not on this stack: a timed-out split may still write it later.
  auto child = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
  enqueueCollective(info, timeout(), std::nullopt, [child, color, key](MPI_Comm comm) {
    return MPI_Comm_split(comm, color < 0 ? MPI_UNDEFINED : color, key, child.get());
  })->wait();
  if (*child == MPI_COMM_NULL) return nullptr;
  auto group = std::make_shared<MpiGroup>(*child, name() + "/" + suffix);
  return std::make_shared<MpiCommunicator>(std::move(group), timeout(), verifyCollectives_);
}

}  // namespace tessera::comm::detail

namespace tessera::comm {

bool mpiBackendBuilt() { return true; }

CommPtr makeMpiWorldCommunicator(MpiOptions options) {
  TESSERA_CHECK_ARG(options.timeout.count() > 0,
                    "MpiOptions::timeout must be positive, got " << options.timeout.count() << " ms");
  detail::ensureMpiInitialized();
  MPI_Comm world = MPI_COMM_NULL;
  detail::checkMpi(MPI_Comm_dup(MPI_COMM_WORLD, &world), "duplicating MPI_COMM_WORLD for group '" + options.name + "'");
  auto group = std::make_shared<detail::MpiGroup>(world, options.name);
  // The env var overrides the option, as for GlooOptions::verifyCollectives.
  const char* verify = std::getenv("TESSERA_VERIFY_COLLECTIVES");
  const bool verifyCollectives = verify == nullptr ? options.verifyCollectives : std::string(verify) != "0";
  return std::make_shared<detail::MpiCommunicator>(std::move(group), options.timeout, verifyCollectives);
}

}  // namespace tessera::comm
