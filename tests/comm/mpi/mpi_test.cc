// What is specific to the MPI backend: splitting into sub-communicators,
// sends and receives that never queue behind collectives, timeouts (MPI has
// none of its own) and their diagnosis, mismatched collectives with and
// without the pre-collective verification, the bfloat16/float16 user
// reduction ops, and the ring-model statistics. The collective matrix
// shared with Gloo lives in tests/comm/collectives_test.cc.
//
// Failure workers end with std::_Exit: after a failure a worker thread stays
// blocked inside MPI and MPI_Finalize is skipped, so mpirun reports the job as
// failed. Those tests therefore judge each rank's output, not exit codes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>

#include "tessera/comm/communicator.h"
#include "tessera/comm/mpi.h"
#include "tessera/core/error.h"
#include "tests/harness/multiprocess.h"

namespace tessera::comm {
namespace {

using testing::expectTensorsEqual;
using testing::RunOptions;
using testing::runWorkers;
using Clock = std::chrono::steady_clock;

constexpr Timeout kShortTimeout = std::chrono::milliseconds(1500);

// Prints the marker the test looks for, gives the other ranks a moment to
// print theirs (mpirun kills them once one rank exits without MPI_Finalize),
// and leaves without running destructors or atexit handlers.
[[noreturn]] void reportAndExit(const std::string& marker, const std::string& detail) {
  std::printf("%s %s\n", marker.c_str(), detail.c_str());
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::seconds(1));
  std::_Exit(0);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

at::Tensor floats(std::initializer_list<float> values) { return at::tensor(std::vector<float>(values)); }

RunOptions mpiRun(int ranks, std::chrono::seconds deadline = std::chrono::seconds(60)) {
  RunOptions options;
  options.ranks = ranks;
  options.backend = "mpi";
  options.deadline = deadline;
  return options;
}

// ---- split ------------------------------------------------------------------

TESSERA_WORKER(mpi_split) {
  auto world = ctx.world();
  const int color = world->rank() % 2;
  // Reverse key order: child ranks must follow the key, not the parent rank.
  auto half = world->split(color, world->size() - world->rank(), "parity");
  TESSERA_CHECK(half != nullptr, "rank " << world->rank() << " got no child group");
  TESSERA_CHECK_EQ(half->name(), std::string("world/parity"));
  TESSERA_CHECK_EQ(half->backend(), std::string("mpi"));
  TESSERA_CHECK_EQ(half->size(), 2);
  TESSERA_CHECK_EQ(half->rank(), world->rank() < 2 ? 1 : 0);  // ranks {0,2} and {1,3}, reversed
  auto sum = at::full({5}, static_cast<float>(world->rank()));
  half->allReduce(sum);
  expectTensorsEqual(sum, at::full({5}, color == 0 ? 2.0f : 4.0f), "allreduce inside the parity group");
  auto members = at::empty({2}, at::kInt);
  half->allGather(at::full({1}, world->rank(), at::kInt), members);
  const std::vector<int> expected = color == 0 ? std::vector<int>{2, 0} : std::vector<int>{3, 1};
  expectTensorsEqual(members, at::tensor(expected, at::kInt), "members of the parity group in key order");

  // kNoColor: rank 0 joins nothing; the others form one group.
  auto rest = world->split(world->rank() == 0 ? Communicator::kNoColor : 7, 0, "rest");
  if (world->rank() == 0) {
    TESSERA_CHECK(rest == nullptr, "kNoColor must return nullptr");
  } else {
    TESSERA_CHECK(rest != nullptr && rest->size() == 3, "rank " << world->rank() << " not in a group of 3");
    auto one = at::ones({3});
    rest->allReduce(one);
    expectTensorsEqual(one, at::full({3}, 3.0f), "allreduce inside the 'rest' group");
  }
  world->barrier();  // the parent still works after both splits
}

TEST(MpiTest, SplitFormsGroupsByColorOrderedByKey) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_split", mpiRun(4));
  ASSERT_TRUE(result.ok()) << result.report();
}

// ---- point to point -----------------------------------------------------------

TESSERA_WORKER(mpi_p2p) {
  auto comm = ctx.world();
  const int peer = 1 - comm->rank();
  // Large enough for MPI's rendezvous protocol: posted as blocking sends in
  // the same order on both ranks, this exchange would deadlock.
  const int64_t n = 1 << 20;
  auto outgoing = at::arange(n, at::kFloat) + 1000.0f * comm->rank();
  auto incoming = at::zeros({n});

  // Rank 0 queues an allreduce that rank 1 joins only after the exchange: if
  // sends/recvs queued behind collectives, rank 0 would never send.
  auto ones = at::ones({4});
  WorkPtr allreduce;
  if (comm->rank() == 0) allreduce = comm->allReduceAsync(ones, ReduceOp::kSum);
  auto recv = comm->recvAsync(incoming, peer, 5);
  auto send = comm->sendAsync(outgoing, peer, 5);
  recv->wait();
  send->wait();
  expectTensorsEqual(incoming, at::arange(n, at::kFloat) + 1000.0f * peer, "exchanged tensor");
  if (comm->rank() == 1) allreduce = comm->allReduceAsync(ones, ReduceOp::kSum);
  allreduce->wait();
  expectTensorsEqual(ones, at::full({4}, 2.0f), "allreduce issued around the exchange");

  // Tags: received in the reverse order of sending.
  if (comm->rank() == 0) {
    comm->send(floats({7}), 1, 7);
    comm->send(floats({8}), 1, 8);
  } else {
    auto eight = at::zeros({1});
    auto seven = at::zeros({1});
    auto w8 = comm->recvAsync(eight, 0, 8);
    auto w7 = comm->recvAsync(seven, 0, 7);
    w8->wait();
    w7->wait();
    expectTensorsEqual(seven, floats({7}), "tag 7");
    expectTensorsEqual(eight, floats({8}), "tag 8");
  }

  // A size mismatch is a clear CommError on the receiver.
  if (comm->rank() == 0) {
    comm->send(floats({1, 2, 3}), 1, 9);
  } else {
    auto tooBig = at::zeros({5});
    try {
      comm->recv(tooBig, 0, 9);
      TESSERA_CHECK(false, "a recv of 5 elements matched a send of 3 without error");
    } catch (const CommError& e) {
      TESSERA_CHECK(contains(e.what(), "received 3 elements but expects 5"), "unclear error: " << e.what());
    }
  }
  comm->barrier();
  const CommStats stats = comm->stats();
  TESSERA_CHECK_EQ(stats.of(OpKind::kSend).calls, comm->rank() == 0 ? 4u : 1u);
}

TEST(MpiTest, SendsAndRecvsDoNotQueueBehindCollectives) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_p2p", mpiRun(2));
  ASSERT_TRUE(result.ok()) << result.report();
}

TESSERA_WORKER(mpi_recv_timeout) {
  auto comm = ctx.world();
  if (comm->rank() == 1) {
    std::this_thread::sleep_for(kShortTimeout + std::chrono::seconds(5));  // alive, never sends
    std::_Exit(0);
  }
  auto tensor = at::zeros({10});
  const auto start = Clock::now();
  std::string message;
  try {
    comm->recv(tensor, 1, 3, CallOptions{kShortTimeout});
    TESSERA_CHECK(false, "a recv completed without a send");
  } catch (const TimeoutError& e) {
    message = e.what();
  }
  TESSERA_CHECK(secondsSince(start) < 1.5 + 1.0, "the recv timed out after " << secondsSince(start) << " s");
  TESSERA_CHECK(contains(message, "recv of float32[10] from rank 1 tag 3") &&
                    contains(message, "never posted the matching send"),
                "unclear recv timeout: " << message);
  // The request stays posted and would match a later send: the group is broken.
  try {
    comm->barrier();
    TESSERA_CHECK(false, "a broken group ran a barrier");
  } catch (const CommError& e) {
    TESSERA_CHECK(contains(e.what(), "broken") && contains(e.what(), "recv of float32[10]"),
                  "later call's error lacks the recv timeout: " << e.what());
  }
  reportAndExit("RECV-TIMEOUT-CHECKED", message);
}

TEST(MpiTest, RecvWithoutSendTimesOut) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_recv_timeout", mpiRun(2, std::chrono::seconds(40)));
  ASSERT_FALSE(result.timedOut) << result.report();
  EXPECT_TRUE(contains(result.outputs[0], "RECV-TIMEOUT-CHECKED")) << result.report();
}

// ---- timeout ------------------------------------------------------------------

TESSERA_WORKER(mpi_timeout) {
  auto comm = ctx.world();
  const auto grace = std::chrono::milliseconds(1000);  // diagnosisGrace(1500 ms)
  if (comm->rank() == 2) {
    // Never joins the allreduce; ranks 0 and 1 must give up without it.
    std::this_thread::sleep_for(kShortTimeout + grace + std::chrono::seconds(5));
    std::_Exit(0);
  }
  auto tensor = at::ones({16});
  const auto start = Clock::now();
  auto work = comm->allReduceAsync(tensor, ReduceOp::kSum, CallOptions{kShortTimeout});
  // A bounded wait shorter than the operation's timeout leaves it pending.
  try {
    work->wait(std::chrono::milliseconds(200));
    TESSERA_CHECK(false, "the allreduce completed without rank 2");
  } catch (const TimeoutError& e) {
    TESSERA_CHECK(contains(e.what(), "still pending"), "unexpected early error: " << e.what());
  }
  // Polling sees the stuck operation end too (as failed) once it is overdue.
  while (!work->isCompleted()) {
    TESSERA_CHECK(secondsSince(start) < 1.5 + 2.0, "isCompleted() stayed false past the timeout");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::string message;
  try {
    work->wait();
    TESSERA_CHECK(false, "the allreduce completed without rank 2");
  } catch (const TimeoutError& e) {
    message = e.what();
  }
  const double waited = secondsSince(start);
  TESSERA_CHECK(waited < 1.5 + 1.0 + 3.0, "the timeout fired after " << waited << " s");
  TESSERA_CHECK(contains(message, "allreduce #0 float32[16]"), "operation not named: " << message);
  TESSERA_CHECK(contains(message, "group 'world'"), "group not named: " << message);
  TESSERA_CHECK(contains(message, "did not arrive") && contains(message, "): 2"),
                "rank 2 not named as missing: " << message);
  // Broken: the next call fails at once with the first error.
  const auto again = Clock::now();
  try {
    comm->barrier();
    TESSERA_CHECK(false, "a broken group ran a barrier");
  } catch (const CommError& e) {
    TESSERA_CHECK(contains(e.what(), "broken") && contains(e.what(), "allreduce #0"),
                  "later call's error lacks the first failure: " << e.what());
  }
  TESSERA_CHECK(secondsSince(again) < 0.5, "a broken group's call took " << secondsSince(again) << " s");
  if (ctx.arg("ending") == "return") {
    // The ordinary way out: destructors and atexit handlers must not wait for
    // the worker thread still blocked in MPI_Allreduce.
    std::printf("TIMEOUT-CHECKED %s\n", message.c_str());
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::seconds(1));
    return;
  }
  reportAndExit("TIMEOUT-CHECKED", message);
}

TEST(MpiTest, TimeoutNamesTheMissingRankAndExits) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_timeout", mpiRun(3, std::chrono::seconds(40)));
  ASSERT_FALSE(result.timedOut) << "a rank hung after the timeout\n" << result.report();
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(contains(result.outputs[r], "TIMEOUT-CHECKED")) << "rank " << r << "\n" << result.report();
  }
}

TEST(MpiTest, ProcessExitAfterTimeoutDoesNotHang) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  RunOptions options = mpiRun(3, std::chrono::seconds(40));
  options.args["ending"] = "return";
  const auto start = Clock::now();
  auto result = runWorkers("mpi_timeout", options);
  ASSERT_FALSE(result.timedOut) << "a rank hung on its way out\n" << result.report();
  EXPECT_LT(secondsSince(start), 20.0) << result.report();
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(contains(result.outputs[r], "TIMEOUT-CHECKED")) << "rank " << r << "\n" << result.report();
  }
}

// ---- size mismatch ------------------------------------------------------------

// Runs op, which must fail with a CommError or TimeoutError; returns the message.
std::string failureOf(const std::function<void()>& op) {
  try {
    op();
  } catch (const CommError& e) {
    return e.what();
  } catch (const TimeoutError& e) {
    return e.what();
  }
  TESSERA_CHECK(false, "mismatched collectives went unnoticed");
  return "";
}

TESSERA_WORKER(mpi_mismatch) {
  const bool verify = ctx.arg("verify") != "0";
  if (!verify) setenv("TESSERA_VERIFY_COLLECTIVES", "0", 1);
  auto comm = ctx.world();
  auto tensor = at::ones({comm->rank() == 0 ? 4 : 8});
  // Verified: every rank refuses before any data moves. Unverified: MPI fails
  // on the rank that receives too much (MPI_ERR_TRUNCATE); the other completes
  // and learns of it from the failure report at its next collective.
  const std::string message = failureOf([&] {
    comm->allReduce(tensor, ReduceOp::kSum, CallOptions{kShortTimeout});
    comm->barrier(CallOptions{kShortTimeout});
  });
  TESSERA_CHECK(contains(message, "ranks disagree") && contains(message, "allreduce #0 float32[4]") &&
                    contains(message, "allreduce #0 float32[8]"),
                "the error does not name both sizes: " << message);
  TESSERA_CHECK(!verify || contains(message, "was not started"), "verification did not stop it: " << message);
  if (verify) {
    // Equal element sizes: only the verification can tell float32 from int32.
    auto second = ctx.world();
    auto mixed = at::ones({4}, comm->rank() == 0 ? at::kFloat : at::kInt);
    const std::string dtypes = failureOf([&] { second->allReduce(mixed, ReduceOp::kSum, CallOptions{kShortTimeout}); });
    TESSERA_CHECK(contains(dtypes, "float32[4]") && contains(dtypes, "int32[4]") &&
                      contains(dtypes, "was not started"),
                  "the error does not name both dtypes: " << dtypes);
  }
  reportAndExit("MISMATCH-CHECKED", message);
}

void expectMismatchNamed(const std::string& verify) {
  RunOptions options = mpiRun(2, std::chrono::seconds(40));
  options.args["verify"] = verify;
  auto result = runWorkers("mpi_mismatch", options);
  ASSERT_FALSE(result.timedOut) << result.report();
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(contains(result.outputs[r], "MISMATCH-CHECKED")) << "rank " << r << "\n" << result.report();
  }
}

TEST(MpiTest, MismatchedCollectivesAreRefusedOnEveryRank) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  expectMismatchNamed("1");
}

TEST(MpiTest, MismatchedSizesAreNamedWithoutVerification) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  expectMismatchNamed("0");
}

// ---- 16-bit floats ------------------------------------------------------------

// Values whose partial sums are exact in bfloat16 and float16 (small
// multiples of 0.5), so any reduction order gives the same bits.
at::Tensor halfInput(int64_t n, int rank, at::ScalarType type) {
  auto i = at::arange(n, at::kFloat);
  return ((i.remainder(16) - 8) * 0.5 + rank * (i.remainder(3) - 1)).to(type);
}

TESSERA_WORKER(mpi_half_floats) {
  auto comm = ctx.world();
  const int64_t n = 100003;  // odd and large: MPI reduces in segments
  for (at::ScalarType type : {at::kBFloat16, at::kHalf}) {
    at::Tensor expectedSum = at::zeros({n}, at::kFloat);
    at::Tensor expectedMax = halfInput(n, 0, type).to(at::kFloat);
    at::Tensor expectedMin = expectedMax.clone();
    for (int r = 0; r < comm->size(); ++r) {
      const at::Tensor x = halfInput(n, r, type).to(at::kFloat);
      expectedSum += x;
      expectedMax = at::maximum(expectedMax, x);
      expectedMin = at::minimum(expectedMin, x);
    }
    const std::string name = type == at::kHalf ? "float16" : "bfloat16";
    auto sum = halfInput(n, comm->rank(), type);
    comm->allReduce(sum, ReduceOp::kSum);
    expectTensorsEqual(sum, expectedSum.to(type), name + " sum");
    auto max = halfInput(n, comm->rank(), type);
    comm->allReduce(max, ReduceOp::kMax);
    expectTensorsEqual(max, expectedMax.to(type), name + " max");
    auto min = halfInput(n, comm->rank(), type);
    comm->allReduce(min, ReduceOp::kMin);
    expectTensorsEqual(min, expectedMin.to(type), name + " min");
    // The same user op through MPI_Reduce_scatter.
    const int64_t chunk = 1001;
    auto input = halfInput(chunk * comm->size(), comm->rank(), type);
    auto output = at::empty({chunk}, type);
    comm->reduceScatter(input, output, ReduceOp::kSum);
    at::Tensor whole = at::zeros({chunk * comm->size()}, at::kFloat);
    for (int r = 0; r < comm->size(); ++r) whole += halfInput(chunk * comm->size(), r, type).to(at::kFloat);
    expectTensorsEqual(output, whole.slice(0, chunk * comm->rank(), chunk * (comm->rank() + 1)).to(type),
                       name + " reduceScatter sum");
  }
}

TEST(MpiTest, HalfFloatReductionsAreExact) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_half_floats", mpiRun(3));
  ASSERT_TRUE(result.ok()) << result.report();
}

// ---- statistics ---------------------------------------------------------------

void checkStats(const OpStats& s, uint64_t calls, uint64_t sent, uint64_t received, const char* what) {
  TESSERA_CHECK(s.calls == calls && s.bytesSent == sent && s.bytesReceived == received,
                what << ": calls/sent/received = " << s.calls << "/" << s.bytesSent << "/" << s.bytesReceived
                     << ", expected " << calls << "/" << sent << "/" << received);
}

TESSERA_WORKER(mpi_stats) {
  auto comm = ctx.world();
  const int r = comm->rank();
  TESSERA_CHECK_EQ(comm->size(), 3);
  comm->resetStats();
  comm->allReduce(at::ones({1200}));  // 4800 bytes: 2 * 2/3 of it each way
  comm->broadcast(at::ones({12}), 0);
  comm->allGather(at::ones({5}), at::empty({15}));
  comm->reduceScatter(at::ones({6}), at::empty({r + 1}), ReduceOp::kSum, {1, 2, 3});
  comm->allToAll(at::ones({9}), at::empty({9}));
  comm->barrier();
  if (r == 0) comm->send(at::ones({10}), 1, 3);
  if (r == 1) comm->recv(at::empty({10}), 0, 3);
  // Zero elements on every rank: counted, no bytes.
  comm->allReduce(at::empty({0}));
  comm->allGather(at::empty({0}), at::empty({0}));
  comm->allToAll(at::empty({0}), at::empty({0}));
  comm->broadcast(at::empty({0}), 2);

  const CommStats s = comm->stats();
  checkStats(s.of(OpKind::kAllReduce), 2, 6400, 6400, "allreduce");
  checkStats(s.of(OpKind::kBroadcast), 2, r == 0 ? 48 : 0, r == 0 ? 0 : 48, "broadcast");
  checkStats(s.of(OpKind::kAllGather), 2, 40, 40, "allgather");
  checkStats(s.of(OpKind::kReduceScatter), 1, (6 - (r + 1)) * 4, (6 - (r + 1)) * 4, "reduce_scatter");
  checkStats(s.of(OpKind::kAllToAll), 2, 24, 24, "alltoall");
  checkStats(s.of(OpKind::kBarrier), 1, 0, 0, "barrier");
  checkStats(s.of(OpKind::kSend), r == 0 ? 1 : 0, r == 0 ? 40 : 0, 0, "send");
  checkStats(s.of(OpKind::kRecv), r == 1 ? 1 : 0, 0, r == 1 ? 40 : 0, "recv");
  TESSERA_CHECK(s.totalSeconds() > 0, "no time recorded");
}

TEST(MpiTest, StatsFollowTheRingModel) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "built without MPI or mpirun missing";
  auto result = runWorkers("mpi_stats", mpiRun(3));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::comm
