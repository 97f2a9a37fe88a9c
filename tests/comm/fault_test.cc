// Fault injection (comm/fault.h): the plan's text form, the communicator
// wrapper's delay/drop/fail faults (on a group of one, and on a real 2-rank
// Gloo group where the peer must notice), and the step faults (a kill that
// really SIGKILLs a worker process, a slowdown).
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <thread>

#include "tessera/comm/fault.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"
#include "tests/harness/multiprocess.h"

namespace tessera {
namespace {

using comm::FaultPlan;
using namespace std::chrono_literals;

bool contains(const std::string& text, const std::string& phrase) { return text.find(phrase) != std::string::npos; }

// ------------------------------------------------------------------ plans ---

TEST(FaultPlan, ParsesEveryKind) {
  const auto plan = FaultPlan::parse(
      " kill:rank=2,step=10; slow:rank=1,factor=2.5 ;slow:factor=1.5;"
      "delay:fraction=0.25,ms=40,comm=elastic,rank=3;drop:fraction=0.1;fail:collective=7,comm=world/tp;seed=42");
  ASSERT_EQ(plan.kills.size(), 1u);
  EXPECT_EQ(plan.kills[0].rank, 2);
  EXPECT_EQ(plan.kills[0].step, 10);
  ASSERT_EQ(plan.slow.size(), 2u);
  EXPECT_EQ(plan.slow[0].rank, 1);
  EXPECT_EQ(plan.slow[0].factor, 2.5);
  EXPECT_EQ(plan.slow[1].rank, FaultPlan::kAnyRank);
  EXPECT_EQ(plan.slow[1].factor, 1.5);
  ASSERT_EQ(plan.delays.size(), 1u);
  EXPECT_EQ(plan.delays[0].fraction, 0.25);
  EXPECT_EQ(plan.delays[0].delay, 40ms);
  EXPECT_EQ(plan.delays[0].comm, "elastic");
  EXPECT_EQ(plan.delays[0].rank, 3);
  ASSERT_EQ(plan.drops.size(), 1u);
  EXPECT_EQ(plan.drops[0].fraction, 0.1);
  EXPECT_EQ(plan.drops[0].comm, "");
  EXPECT_EQ(plan.drops[0].rank, FaultPlan::kAnyRank);
  ASSERT_EQ(plan.failures.size(), 1u);
  EXPECT_EQ(plan.failures[0].n, 7);
  EXPECT_EQ(plan.failures[0].comm, "world/tp");
  EXPECT_EQ(plan.seed, 42u);
  EXPECT_FALSE(plan.empty());
}

TEST(FaultPlan, DescribeReadsBack) {
  const std::string text =
      "kill:rank=0,step=3;slow:rank=1,factor=3;slow:factor=1.1;delay:fraction=0.3,ms=5,comm=e;"
      "drop:fraction=1,rank=2;fail:collective=4,comm=world,rank=0;seed=9";
  EXPECT_EQ(FaultPlan::parse(text).describe(), text);
  const auto again = FaultPlan::parse(FaultPlan::parse(text).describe());
  EXPECT_EQ(again.slow[1].factor, 1.1);
  EXPECT_EQ(again.delays[0].fraction, 0.3);
  EXPECT_EQ(again.seed, 9u);
}

TEST(FaultPlan, EmptyTextIsAnEmptyPlan) {
  EXPECT_TRUE(FaultPlan::parse("").empty());
  EXPECT_TRUE(FaultPlan::parse(" ; ;").empty());
  EXPECT_TRUE(FaultPlan::parse("seed=5").empty());
  EXPECT_EQ(FaultPlan::parse("seed=5").seed, 5u);
  EXPECT_EQ(FaultPlan::parse("").seed, 1u);
}

TEST(FaultPlan, EveryErrorNamesTheProblem) {
  // text, then phrases its error must contain.
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"explode:rank=1", {"unknown kind 'explode'", "kill:rank=R,step=S"}},
      {"kill:rank=1", {"kill:rank=1", "missing key 'step'", "kill:rank=R,step=S"}},
      {"kill:rank=1,step=2,when=now", {"unknown key 'when'"}},
      {"kill:rank=x,step=2", {"rank='x' is not an integer"}},
      {"kill:rank=-1,step=2", {"rank=-1 is out of range"}},
      {"kill:rank=1,rank=2,step=2", {"key 'rank' is given twice"}},
      {"slow:rank=1,factor=0.5", {"factor=0.5 is out of range", "slow:"}},
      {"slow:rank=1,factor=fast", {"factor='fast' is not a number"}},
      {"delay:fraction=0.5", {"missing key 'ms'", "delay:fraction=P,ms=M"}},
      {"delay:fraction=0.5,ms=-3", {"ms=-3 is out of range"}},
      {"drop:fraction=1.5", {"fraction=1.5 is out of range", "[0, 1]"}},
      {"drop:fraction=0.5,comm=", {"key 'comm' has no value"}},
      {"drop:fraction=0.5,", {"is not key=value"}},
      {"fail:collective=0", {"collective=0 is out of range", "fail:collective=N"}},
      {"fail:n=3", {"unknown key 'n'"}},
      {"seed=abc", {"seed='abc' is not a non-negative integer"}},
      {"seed=1;seed=2", {"the seed is given twice"}},
      {"drop", {"'drop' is not a fault", "kind:key=value"}},
  };
  for (const auto& [text, phrases] : cases) {
    try {
      FaultPlan::parse(text);
      ADD_FAILURE() << "parsed '" << text << "' without an error";
    } catch (const InvalidArgument& e) {
      for (const auto& phrase : phrases) {
        EXPECT_TRUE(contains(e.what(), phrase)) << "'" << text << "': error lacks '" << phrase << "': " << e.what();
      }
    }
  }
}

TEST(FaultPlan, FromEnv) {
  unsetenv("TESSERA_FAULT_PLAN");
  EXPECT_TRUE(FaultPlan::fromEnv().empty());
  setenv("TESSERA_FAULT_PLAN", "fail:collective=2", 1);
  EXPECT_EQ(FaultPlan::fromEnv().failures.at(0).n, 2);
  setenv("TESSERA_FAULT_PLAN", "fail:collective=zero", 1);
  try {
    FaultPlan::fromEnv();
    ADD_FAILURE() << "a bad TESSERA_FAULT_PLAN was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_TRUE(contains(e.what(), "TESSERA_FAULT_PLAN")) << e.what();
  }
  unsetenv("TESSERA_FAULT_PLAN");
}

// ------------------------------------------------- the wrapper, one rank ---

// Whether one all-reduce through c was dropped (CommError) or went through.
bool allReduceDropped(comm::Communicator& c) {
  try {
    c.allReduce(at::ones({4}));
    return false;
  } catch (const CommError& e) {
    EXPECT_TRUE(contains(e.what(), "dropped by the fault plan (drop:fraction=")) << e.what();
    return true;
  }
}

TEST(FaultInjection, NothingMatchingReturnsTheCommunicatorItself) {
  auto single = comm::makeSingleRankCommunicator("world");
  EXPECT_EQ(comm::injectFaults(single, FaultPlan{}, 0), single);
  EXPECT_EQ(comm::injectFaults(single, FaultPlan::parse("drop:fraction=1,rank=1"), 0), single);
  EXPECT_EQ(comm::injectFaults(single, FaultPlan::parse("drop:fraction=1,comm=elastic"), 0), single);
  EXPECT_EQ(comm::injectFaults(single, FaultPlan::parse("kill:rank=0,step=1;slow:factor=2"), 0), single);
  EXPECT_NE(comm::injectFaults(single, FaultPlan::parse("drop:fraction=1,rank=0"), 0), single);
}

TEST(FaultInjection, CommFilterMatchesBySubstring) {
  const auto plan = FaultPlan::parse("drop:fraction=1,comm=lastic/e3");
  auto matching = comm::makeSingleRankCommunicator("elastic/e3/l0");
  auto other = comm::makeSingleRankCommunicator("elastic/e4/l0");
  auto wrapped = comm::injectFaults(matching, plan, 0);
  EXPECT_NE(wrapped, matching);
  EXPECT_EQ(wrapped->name(), "elastic/e3/l0");
  EXPECT_EQ(wrapped->backend(), "single");
  EXPECT_TRUE(allReduceDropped(*wrapped));
  EXPECT_EQ(comm::injectFaults(other, plan, 0), other);
}

TEST(FaultInjection, DropAllFailsAtOnceAndBreaksTheGroup) {
  auto c = comm::injectFaults(comm::makeSingleRankCommunicator(), FaultPlan::parse("drop:fraction=1"), 0);
  Stopwatch watch;
  EXPECT_TRUE(allReduceDropped(*c));
  try {
    c->barrier();
    ADD_FAILURE() << "a broken group ran a barrier";
  } catch (const CommError& e) {
    EXPECT_TRUE(contains(e.what(), "broken")) << e.what();
    EXPECT_TRUE(contains(e.what(), "allreduce #1")) << e.what();
  }
  EXPECT_LT(watch.seconds(), 5.0);  // no timeout was waited for
}

TEST(FaultInjection, DropNoneNeverDrops) {
  auto inner = comm::makeSingleRankCommunicator();
  auto c = comm::injectFaults(inner, FaultPlan::parse("drop:fraction=0"), 0);
  ASSERT_NE(c, inner);
  for (int i = 0; i < 200; ++i) ASSERT_FALSE(allReduceDropped(*c)) << "operation " << i;
  // The wrapper's stats are the inner traffic.
  EXPECT_EQ(c->stats().of(comm::OpKind::kAllReduce).calls, 200u);
}

TEST(FaultInjection, DropFractionIsRoughlyThatFraction) {
  // A drop breaks the group, so each of the 200 operations runs on its own
  // wrapper; the seed varies so that each draws a different number.
  auto inner = comm::makeSingleRankCommunicator();
  auto pattern = [&](int rank) {
    std::vector<bool> dropped;
    for (int i = 0; i < 200; ++i) {
      auto plan = FaultPlan::parse("drop:fraction=0.3");
      plan.seed = 1000 + i;
      dropped.push_back(allReduceDropped(*comm::injectFaults(inner, plan, rank)));
    }
    return dropped;
  };
  const auto first = pattern(0);
  const auto count = std::count(first.begin(), first.end(), true);
  EXPECT_GE(count, 30) << "of 200";
  EXPECT_LE(count, 90) << "of 200";
  EXPECT_EQ(pattern(0), first) << "the same seed and rank must give the same decisions";
  EXPECT_NE(pattern(1), first) << "another rank must draw differently";
}

TEST(FaultInjection, FailCountsCollectivesPerCommunicatorAndWrapsSplitChildren) {
  auto c = comm::injectFaults(comm::makeSingleRankCommunicator("single"),
                              FaultPlan::parse("fail:collective=2,comm=single"), 0);
  c->allReduce(at::ones({2}));  // #1 of the parent
  auto child = c->split(0, 0, "child");
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->name(), "single/child");
  child->barrier();  // #1 of the child
  try {
    child->allReduce(at::ones({2}));  // #2 of the child
    ADD_FAILURE() << "the child's 2nd collective did not fail";
  } catch (const CommError& e) {
    EXPECT_TRUE(contains(e.what(), "allreduce #2 on group 'single/child'")) << e.what();
    EXPECT_TRUE(contains(e.what(), "failed by the fault plan (fail:collective=2,comm=single)")) << e.what();
  }
  EXPECT_EQ(c->split(comm::Communicator::kNoColor, 0, "none"), nullptr);
  EXPECT_THROW(c->broadcast(at::ones({2}), 0), CommError);  // #2 of the parent
}

TEST(FaultInjection, DelayAddsAtLeastItsTime) {
  auto c = comm::injectFaults(comm::makeSingleRankCommunicator(), FaultPlan::parse("delay:fraction=1,ms=30"), 0);
  Stopwatch watch;
  for (int i = 0; i < 3; ++i) c->allReduce(at::ones({4}));
  EXPECT_GE(watch.millis(), 90);
}

// ------------------------------------------- the wrapper, two Gloo ranks ---

TESSERA_WORKER(fail_third_allreduce) {
  auto world = ctx.world(3s);
  auto c = comm::injectFaults(world, FaultPlan::parse("fail:collective=3,rank=1"), ctx.rank);
  TESSERA_CHECK((c == world) == (ctx.rank == 0), "rank " << ctx.rank << " was wrapped wrongly");
  for (int i = 1; i <= 2; ++i) {
    auto t = at::full({5}, static_cast<float>(ctx.rank + i));
    c->allReduce(t);
    // (0 + i) + (1 + i), written out independently of the collective.
    testing::expectTensorsEqual(t, at::full({5}, static_cast<float>(2 * i + 1)), "allreduce " + std::to_string(i));
  }
  auto t = at::ones({5});
  Stopwatch watch;
  try {
    c->allReduce(t);
    TESSERA_CHECK(false, "the 3rd allreduce succeeded on rank " << ctx.rank);
  } catch (const CommError& e) {
    // Rank 1's own failure, or rank 0 seeing a peer that left.
    std::fprintf(stderr, "rank %d got CommError after %.2f s: %s\n", ctx.rank, watch.seconds(), e.what());
    if (ctx.rank == 1) {
      TESSERA_CHECK(contains(e.what(), "allreduce #3") && contains(e.what(), "fail:collective=3"), e.what());
      TESSERA_CHECK(watch.seconds() < 1.0, "the injected failure took " << watch.seconds() << " s");
    }
  } catch (const TimeoutError& e) {
    std::fprintf(stderr, "rank %d got TimeoutError after %.2f s: %s\n", ctx.rank, watch.seconds(), e.what());
    TESSERA_CHECK(ctx.rank == 0, "rank 1 timed out instead of failing at once: " << e.what());
  }
  if (ctx.rank == 1) {
    try {
      c->barrier();
      TESSERA_CHECK(false, "the broken group ran a barrier");
    } catch (const CommError& e) {
      TESSERA_CHECK(contains(e.what(), "broken"), e.what());
    }
  }
}

TEST(FaultInjectionGloo, FailedThirdAllReduceReachesBothRanks) {
  testing::RunOptions options;
  options.ranks = 2;
  options.deadline = 40s;
  const auto result = testing::runWorkers("fail_third_allreduce", options);
  ASSERT_TRUE(result.ok()) << result.report();
}

// ------------------------------------------------------------ step faults ---

TESSERA_WORKER(kill_at_step) {
  comm::StepFaults faults(FaultPlan::parse("kill:rank=1,step=3"), ctx.rank);
  TESSERA_CHECK(faults.active() == (ctx.rank == 1), "active() on rank " << ctx.rank);
  for (int64_t step = 0; step < 6; ++step) {
    faults.beforeStep(step);
    std::printf("step %ld done\n", static_cast<long>(step));
  }
}

TEST(StepFaults, KillRaisesSigkillAtTheStep) {
  testing::RunOptions options;
  options.ranks = 2;
  options.deadline = 30s;
  const auto result = testing::runWorkers("kill_at_step", options);
  ASSERT_FALSE(result.timedOut) << result.report();
  EXPECT_EQ(result.exitCodes[0], 0) << result.report();
  EXPECT_EQ(result.exitCodes[1], 128 + SIGKILL) << result.report();
  const std::string& killed = result.outputs[1];
  EXPECT_TRUE(contains(killed, "step 2 done")) << killed;
  EXPECT_FALSE(contains(killed, "step 3 done")) << killed;
  EXPECT_TRUE(contains(killed, "killing rank 1 with SIGKILL before step 3")) << killed;
  EXPECT_TRUE(contains(result.outputs[0], "step 5 done")) << result.outputs[0];
}

TEST(StepFaults, SlowSleepsFactorMinusOneTimesTheStep) {
  comm::StepFaults slowed(FaultPlan::parse("slow:rank=1,factor=3"), 1);
  EXPECT_TRUE(slowed.active());
  Stopwatch watch;
  slowed.afterStep(0.05);  // sleeps (3 - 1) x 50 ms
  EXPECT_GE(watch.millis(), 100);

  comm::StepFaults other(FaultPlan::parse("slow:rank=1,factor=3;kill:rank=1,step=0"), 0);
  EXPECT_FALSE(other.active());
  other.beforeStep(0);  // rank 1's kill: nothing happens here
  other.afterStep(0.05);
}

}  // namespace
}  // namespace tessera
