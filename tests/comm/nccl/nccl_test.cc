// NCCL backend tests. They need a CUDA device and a CUDA build of libtorch
// (to create CUDA tensors); elsewhere every GPU test skips, saying why, and
// only the no-device error path is checked. With one GPU: every operation on
// a group of one. With two or more: a 2-process group, one GPU per rank (NCCL
// refuses two ranks of one group on the same device).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "tessera/comm/nccl.h"
#include "tessera/core/error.h"
#include "tests/harness/multiprocess.h"

namespace tessera::comm {
namespace {

using testing::expectTensorsEqual;

// Empty when GPU tests can run here, else why not.
std::string gpuSkipReason() {
  if (ncclDeviceCount() == 0) return "no CUDA device: NCCL backend compiled but not run";
  if (!at::hasCUDA()) return "libtorch was built without CUDA: NCCL backend compiled but CUDA tensors cannot be made";
  return "";
}

#define TESSERA_SKIP_WITHOUT_GPU()                          \
  do {                                                      \
    const std::string reason_ = gpuSkipReason();            \
    if (!reason_.empty()) GTEST_SKIP() << reason_;          \
  } while (0)

at::TensorOptions onGpu(at::ScalarType type, int device = 0) {
  return at::TensorOptions().dtype(type).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

TEST(NcclBackend, IsBuiltIntoThisLibrary) { EXPECT_TRUE(ncclBackendBuilt()); }

TEST(NcclBackend, WithoutADeviceCreationThrowsNotSupported) {
  if (ncclDeviceCount() > 0) GTEST_SKIP() << "a CUDA device is visible; this checks the no-device error";
  try {
    makeNcclCommunicator(makeHashStore(), "nodevice", 0, 1);
    FAIL() << "makeNcclCommunicator succeeded without a CUDA device";
  } catch (const NotSupported& e) {
    EXPECT_NE(std::string(e.what()).find("--backend gloo"), std::string::npos) << e.what();
  }
}

CommPtr soloGroup() {
  NcclOptions options;
  options.name = "solo";
  options.device = 0;
  options.timeout = std::chrono::seconds(60);
  return makeNcclCommunicator(makeHashStore(), "solo", 0, 1, options);
}

TEST(NcclSingleRank, AllReduceEveryDtype) {
  TESSERA_SKIP_WITHOUT_GPU();
  auto comm = soloGroup();
  EXPECT_EQ(comm->backend(), "nccl");
  for (at::ScalarType type : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kInt, at::kLong, at::kByte,
                              at::kChar}) {
    auto expected = at::arange(10, at::kFloat).to(type);  // CPU arange lacks some 16-bit dtypes
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
      auto t = expected.to(onGpu(type));
      comm->allReduce(t, op);
      expectTensorsEqual(t.cpu(), expected, std::string("allReduce ") + toString(op) + " " + c10::toString(type));
    }
  }
  EXPECT_EQ(comm->stats().of(OpKind::kAllReduce).calls, 32u);
}

TEST(NcclSingleRank, GatherScatterBroadcastAllToAllBarrier) {
  TESSERA_SKIP_WITHOUT_GPU();
  auto comm = soloGroup();
  auto input = at::arange(6, onGpu(at::kFloat));
  auto output = at::zeros({6}, onGpu(at::kFloat));
  comm->allGather(input, output);
  expectTensorsEqual(output.cpu(), input.cpu(), "allGather");
  output.zero_();
  comm->reduceScatter(input, output, ReduceOp::kSum, {6});
  expectTensorsEqual(output.cpu(), input.cpu(), "reduceScatter");
  output.zero_();
  comm->allToAll(input, output);
  expectTensorsEqual(output.cpu(), input.cpu(), "allToAll");
  auto b = input.clone();
  comm->broadcast(b, 0);
  expectTensorsEqual(b.cpu(), input.cpu(), "broadcast");
  comm->barrier();
  EXPECT_THROW(comm->allReduce(at::ones({2})), InvalidArgument);  // a CPU tensor
  EXPECT_THROW(comm->broadcast(b, 1), InvalidArgument);
}

TEST(NcclSingleRank, SplitMakesAWorkingChild) {
  TESSERA_SKIP_WITHOUT_GPU();
  auto comm = soloGroup();
  EXPECT_EQ(comm->split(Communicator::kNoColor, 0, "none"), nullptr);
  auto child = comm->split(0, 0, "child");
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->name(), "solo/child");
  EXPECT_EQ(child->size(), 1);
  auto t = at::full({4}, 3.0, onGpu(at::kFloat));
  child->allReduce(t);
  expectTensorsEqual(t.cpu(), at::full({4}, 3.0), "child allReduce");
}

// ---- Two processes, one GPU each --------------------------------------------

TESSERA_WORKER(nccl_two_ranks) {
  const int r = ctx.rank;
  NcclOptions options;
  options.device = r;
  options.timeout = std::chrono::seconds(60);
  auto comm = makeNcclCommunicator(ctx.store, "nccl2", r, ctx.size, options);
  // Produced on libtorch's default stream right before the call: the group's
  // stream must see it (they are ordered through the legacy default stream).
  auto t = at::full({1000}, static_cast<float>(r + 1), onGpu(at::kFloat, r));
  comm->allReduce(t);
  expectTensorsEqual(t.cpu(), at::full({1000}, 3.0f), "allReduce sum");

  auto mine = at::full({r + 1}, static_cast<int64_t>(r), onGpu(at::kLong, r));  // rank 0: 1 element, rank 1: 2
  auto gathered = at::empty({3}, onGpu(at::kLong, r));
  comm->allGather(mine, gathered, {1, 2});
  expectTensorsEqual(gathered.cpu(), at::tensor({0, 1, 1}, at::kLong), "uneven allGather");

  auto input = at::arange(3, onGpu(at::kFloat, r)) * (r + 1);  // [0 1 2] and [0 2 4]
  auto piece = at::empty({r == 0 ? 1 : 2}, onGpu(at::kFloat, r));
  comm->reduceScatter(input, piece, ReduceOp::kSum, {1, 2});
  expectTensorsEqual(piece.cpu(), r == 0 ? at::tensor({0.0f}) : at::tensor({3.0f, 6.0f}), "uneven reduceScatter");

  auto b = at::full({8}, static_cast<float>(r == 1 ? 7 : 0), onGpu(at::kFloat, r));
  comm->broadcast(b, 1);
  expectTensorsEqual(b.cpu(), at::full({8}, 7.0f), "broadcast from rank 1");

  auto sendBuf = at::full({4}, static_cast<float>(r), onGpu(at::kFloat, r));
  auto recvBuf = at::empty({4}, onGpu(at::kFloat, r));
  comm->allToAll(sendBuf, recvBuf);
  expectTensorsEqual(recvBuf.cpu(), at::tensor({0.0f, 0.0f, 1.0f, 1.0f}), "allToAll");

  // Point to point on one stream: rank 0 sends first, rank 1 receives first.
  auto message = at::full({5}, 42, onGpu(at::kInt, r));
  auto inbox = at::zeros({5}, onGpu(at::kInt, r));
  if (r == 0) {
    comm->send(message, 1, 0);
    comm->recv(inbox, 1, 0);
  } else {
    comm->recv(inbox, 0, 0);
    comm->send(message, 0, 0);
  }
  expectTensorsEqual(inbox.cpu(), at::full({5}, 42, at::kInt), "send/recv");

  auto child = comm->split(0, -r, "reversed");
  TESSERA_CHECK(child != nullptr && child->rank() == 1 - r, "split by key -rank did not reverse the ranks");
  auto c = at::full({2}, static_cast<float>(r), onGpu(at::kFloat, r));
  child->allReduce(c, ReduceOp::kMax);
  expectTensorsEqual(c.cpu(), at::full({2}, 1.0f), "child allReduce max");
  comm->barrier();
}

TEST(NcclTwoRanks, CollectivesPointToPointAndSplit) {
  TESSERA_SKIP_WITHOUT_GPU();
  if (ncclDeviceCount() < 2) {
    GTEST_SKIP() << "needs 2 CUDA devices: NCCL refuses two ranks of one group on the same device";
  }
  testing::RunOptions options;
  options.ranks = 2;
  options.backend = "gloo";  // provides the TCP store the ranks rendezvous through
  options.deadline = std::chrono::seconds(120);
  auto result = testing::runWorkers("nccl_two_ranks", options);
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::comm
