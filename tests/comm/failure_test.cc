// Failures must surface as clear errors within the timeout, never as hangs:
// mismatched sizes, a rank that never arrives, a killed peer, a recv with no
// matching send, a group one rank never joins, an unreachable store. Each
// scenario runs real Gloo processes; every rank checks the error it got.
#include <gtest/gtest.h>
#include <signal.h>

#include <thread>

#include "tessera/comm/gloo.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"
#include "tests/harness/multiprocess.h"

namespace tessera {
namespace {

using namespace std::chrono_literals;

// Runs op, expects it to throw E within `limit`, and checks that the message
// contains every one of `phrases`. Prints the message for the test log.
template <typename E>
void expectFailure(const std::function<void()>& op, std::chrono::milliseconds limit,
                   const std::vector<std::string>& phrases) {
  Stopwatch watch;
  try {
    op();
  } catch (const E& e) {
    const std::string message = e.what();
    std::fprintf(stderr, "got expected error after %.2f s: %s\n", watch.seconds(), message.c_str());
    TESSERA_CHECK(watch.millis() <= limit.count(),
                  "error took " << watch.seconds() << " s, longer than " << limit.count() << " ms");
    for (const auto& phrase : phrases) {
      TESSERA_CHECK(message.find(phrase) != std::string::npos, "error lacks '" << phrase << "': " << message);
    }
    return;
  }
  TESSERA_CHECK(false, "operation succeeded but should have failed");
}

constexpr auto kShort = 1500ms;
// Gloo's timeout + the diagnosis grace (1 s at this timeout) + scheduling slack.
constexpr auto kLimit = 8000ms;

TESSERA_WORKER(mismatched_sizes) {
  auto c = ctx.world();
  auto t = at::ones({c->rank() == 0 ? 1000 : 7}, at::kFloat);
  // Gloo may throw CommError (peer closed) or TimeoutError; both derive from Error.
  expectFailure<Error>([&] { c->allReduce(t, comm::ReduceOp::kSum, {kShort}); }, kLimit,
                       {"allreduce #0", "was not started", "ranks disagree", "float32[1000]", "float32[7]"});
  // The communicator is broken now, and says so at once.
  expectFailure<CommError>([&] { c->barrier(); }, 1000ms, {"broken"});
}

TESSERA_WORKER(rank_never_arrives) {
  auto c = ctx.world();
  c->barrier();
  if (c->rank() == c->size() - 1) {
    std::this_thread::sleep_for(6s);  // busy elsewhere: never joins the allreduce
    return;
  }
  auto t = at::ones({1000}, at::kFloat);
  expectFailure<Error>([&] { c->allReduce(t, comm::ReduceOp::kSum, {kShort}); }, kLimit,
                       {"allreduce #1", "group 'world'", "did not arrive",
                        ": " + std::to_string(c->size() - 1)});
}

TESSERA_WORKER(killed_peer) {
  auto c = ctx.world();
  c->barrier();
  if (c->rank() == 1) raise(SIGKILL);
  auto t = at::ones({1 << 20}, at::kFloat);
  // A dead peer is noticed through its closed sockets long before a 20 s timeout.
  expectFailure<Error>([&] { c->allReduce(t, comm::ReduceOp::kSum, {20s}); }, 15000ms,
                       {"allreduce #1", "did not arrive", "1"});
}

TESSERA_WORKER(recv_without_send) {
  auto c = ctx.world();
  if (c->rank() == 1) {
    std::this_thread::sleep_for(3s);  // alive, but never sends
    return;
  }
  auto t = at::zeros({10}, at::kFloat);
  expectFailure<TimeoutError>([&] { c->recv(t, 1, /*tag=*/3, {kShort}); }, kLimit,
                              {"recv of float32[10] from rank 1 tag 3", "never posted the matching send"});
  // Gloo closed the pair on the timeout: the group is broken, and says so at once.
  expectFailure<CommError>([&] { c->barrier(); }, 1000ms, {"broken", "recv of float32[10]"});
}

TESSERA_WORKER(join_missing_rank) {
  // WORLD_SIZE says 3 but only ranks 0 and 1 were started.
  comm::GlooOptions options;
  options.timeout = kShort;
  expectFailure<TimeoutError>([&] { comm::makeGlooCommunicator(ctx.store, "world", ctx.rank, 3, options); },
                              kLimit, {"forming Gloo group 'world'", "never registered: 2"});
}

void runScenario(const std::string& worker, int ranks, const std::vector<int>& expectedCodes) {
  testing::RunOptions options;
  options.ranks = ranks;
  options.deadline = 60s;
  const auto result = testing::runWorkers(worker, options);
  ASSERT_FALSE(result.timedOut) << result.report();
  for (int r = 0; r < ranks; ++r) {
    EXPECT_EQ(result.exitCodes[r], expectedCodes[r]) << "rank " << r << "\n" << result.report();
  }
}

TEST(CommFailures, MismatchedSizesNameBothShapes) { runScenario("mismatched_sizes", 2, {0, 0}); }
TEST(CommFailures, RankThatNeverArrivesIsNamed) { runScenario("rank_never_arrives", 3, {0, 0, 0}); }
TEST(CommFailures, KilledPeerIsNamedBeforeTheTimeout) {
  runScenario("killed_peer", 3, {0, 128 + SIGKILL, 0});
}
TEST(CommFailures, RecvWithoutSendTimesOut) { runScenario("recv_without_send", 2, {0, 0}); }
TEST(CommFailures, GroupWithAMissingRankTimesOut) { runScenario("join_missing_rank", 2, {0, 0}); }

TEST(CommFailures, UnreachableStoreNamesTheAddress) {
  comm::TcpStoreOptions options;
  options.host = "127.0.0.1";
  options.port = 1;  // nothing listens on a privileged port here
  options.timeout = 1000ms;
  Stopwatch watch;
  try {
    comm::TcpStore store(options);
    FAIL() << "connected to a store that does not exist";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("MASTER_ADDR"), std::string::npos) << e.what();
  }
  EXPECT_LT(watch.seconds(), 10.0);
}

TEST(CommFailures, BadArgumentsAreRejectedBeforeAnyTraffic) {
  auto single = comm::makeSingleRankCommunicator();
  auto strided = at::ones({4, 4}, at::kFloat).t();
  try {
    single->allReduce(strided);
    FAIL() << "non-contiguous tensor accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("contiguous"), std::string::npos) << e.what();
  }
  try {
    single->allReduce(at::ones({2}, at::kBool));
    FAIL() << "bool tensor accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("float32, float64"), std::string::npos) << e.what();
  }
  try {
    single->allGather(at::ones({3}), at::empty({4}));
    FAIL() << "mismatched allGather sizes accepted";
  } catch (const InvalidArgument& e) {
    SUCCEED();
  }
}

}  // namespace
}  // namespace tessera
