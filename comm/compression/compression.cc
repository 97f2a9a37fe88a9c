// allReduceCompressed / reduceScatterCompressed: argument checks and dispatch
// to the algorithm of each Compression (int8: int8_allreduce.cc, fp8:
// fp8_allreduce.cc), plus the background-thread async form.
#include "tessera/comm/compression.h"

#include <ATen/ops/empty.h>

#include <functional>
#include <thread>

#include "comm/compression/fp8_allreduce.h"
#include "comm/compression/int8_allreduce.h"
#include "comm/op_queue.h"
#include "comm/tensor_checks.h"
#include "tessera/comm/fp8_allreduce.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace detail {

void checkCompressedArguments(const Communicator& comm, const at::Tensor& tensor, ReduceOp op,
                              Compression compression) {
  const std::string what = std::string(toString(compression)) + " all-reduce on group '" + comm.name() + "'";
  TESSERA_CHECK_ARG(tensor.defined(), what << ": the tensor is undefined");
  detail::checkTensor(tensor, what);
  TESSERA_CHECK_ARG(tensor.scalar_type() == at::kFloat,
                    what << ": needs a float32 tensor, got " << detail::dtypeName(tensor.scalar_type())
                         << "; convert it (tensor.to(at::kFloat)) or use compression 'none'");
  TESSERA_CHECK_ARG(op == ReduceOp::kSum || op == ReduceOp::kAvg,
                    what << ": supports sum and avg, got " << toString(op) << "; use compression 'none' for "
                         << toString(op));
}

namespace {

// Runs one compressed collective on its own thread; the destructor joins it
// (the operation ends by itself: every transfer carries a timeout).
class BackgroundAllReduceWork final : public Work {
 public:
  BackgroundAllReduceWork(CommPtr comm, const std::string& what, std::function<void(Communicator&)> body,
                          CallOptions options) {
    const Timeout perTransfer = options.timeout.count() < 0 ? comm->timeout() : options.timeout;
    // 2(n-1) hops per lane run one after another, each with its own timeout
    // (+ 2 for the small all-reduces before and after).
    const Timeout backstop = perTransfer * (2 * comm->size() + 3);
    done_ = std::make_shared<detail::CompletionWork>(what, backstop);
    thread_ = std::thread([done = done_, comm = std::move(comm), body = std::move(body)] {
      try {
        body(*comm);
        done->complete(nullptr);
      } catch (...) {
        done->complete(std::current_exception());
      }
    });
  }
  ~BackgroundAllReduceWork() override { thread_.join(); }

  void wait(Timeout timeout) override { done_->wait(timeout); }
  bool isCompleted() override { return done_->isCompleted(); }

 private:
  std::shared_ptr<detail::CompletionWork> done_;
  std::thread thread_;
};

}  // namespace

WorkPtr runCompressedInBackground(CommPtr comm, const std::string& what, std::function<void(Communicator&)> body,
                                  CallOptions options) {
  return std::make_shared<BackgroundAllReduceWork>(std::move(comm), what, std::move(body), options);
}

}  // namespace detail

const char* toString(Compression compression) {
  switch (compression) {
    case Compression::kInt8:
      return "int8";
    case Compression::kFp8:
      return "fp8";
    case Compression::kNone:
      break;
  }
  return "none";
}

Compression parseCompression(const std::string& value, const std::string& field) {
  if (value == "none") return Compression::kNone;
  if (value == "int8") return Compression::kInt8;
  if (value == "fp8") return Compression::kFp8;
  TESSERA_CHECK_CONFIG(false, field, "got '" << value << "' (valid: none, int8, fp8)");
  return Compression::kNone;
}

namespace {

// Collective: every rank must pass as many elements, because the ring's
// send/recv carry no collective description of their own. One tiny
// all-reduce (max of n and of -n) makes a mismatch a clear error on every rank.
void checkSameNumel(Communicator& comm, const at::Tensor& tensor, CallOptions options) {
  at::Tensor extent = at::empty({2}, at::kLong);
  extent.data_ptr<int64_t>()[0] = tensor.numel();
  extent.data_ptr<int64_t>()[1] = -tensor.numel();
  comm.allReduce(extent, ReduceOp::kMax, options);
  const int64_t most = extent.data_ptr<int64_t>()[0], least = -extent.data_ptr<int64_t>()[1];
  TESSERA_CHECK_ARG(most == least, "int8 all-reduce on group '" << comm.name() << "': ranks passed tensors of "
                                                                << least << " to " << most << " elements (this rank "
                                                                << tensor.numel() << "); every rank must pass the same size");
}

}  // namespace

void allReduceCompressed(Communicator& comm, at::Tensor tensor, ReduceOp op, Compression compression,
                         CallOptions options) {
  if (compression == Compression::kNone) return comm.allReduce(tensor, op, options);
  if (compression == Compression::kFp8) {
    fp8AllReduce(comm, tensor, op, nullptr, options);
    return;
  }
  detail::checkCompressedArguments(comm, tensor, op, compression);
  // One rank: the sum and the average are the tensor itself. Nothing to send.
  if (comm.size() == 1) return;
  checkSameNumel(comm, tensor, options);
  if (tensor.numel() == 0) return;
  detail::int8RingAllReduce(comm, tensor, op == ReduceOp::kAvg, options);
}

WorkPtr allReduceCompressedAsync(CommPtr comm, at::Tensor tensor, ReduceOp op, Compression compression,
                                 CallOptions options) {
  TESSERA_CHECK_ARG(comm != nullptr, "allReduceCompressedAsync needs a communicator, got null");
  if (compression == Compression::kNone) return comm->allReduceAsync(tensor, op, options);
  if (compression == Compression::kFp8) return fp8AllReduceAsync(std::move(comm), std::move(tensor), op, nullptr, options);
  detail::checkCompressedArguments(*comm, tensor, op, compression);  // bad arguments throw here, at the call
  const std::string what = std::string(toString(compression)) + " all-reduce on group '" + comm->name() + "'";
  return detail::runCompressedInBackground(
      std::move(comm), what,
      [tensor = std::move(tensor), op, compression, options](Communicator& c) {
        allReduceCompressed(c, tensor, op, compression, options);
      },
      options);
}

void reduceScatterCompressed(Communicator& comm, at::Tensor input, at::Tensor output, ReduceOp op,
                             Compression compression, CallOptions options) {
  switch (compression) {
    case Compression::kNone:
      return comm.reduceScatter(input, output, op, {}, options);
    case Compression::kFp8:
      fp8ReduceScatter(comm, input, output, op, nullptr, options);
      return;
    case Compression::kInt8:
      break;
  }
  throw InvalidArgument("reduceScatterCompressed on group '" + comm.name() +
                        "': int8 is not offered for reduce-scatter (its per-chunk tables do not fit a sharded "
                        "output); use compression 'fp8' or 'none'");
}

}  // namespace tessera::comm
