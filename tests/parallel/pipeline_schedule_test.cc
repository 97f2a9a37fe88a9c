// Pipeline schedules: every generator passes the validator, the validator
// catches broken schedules, the simulator agrees with the closed forms, and
// the zero-bubble schedules meet the bubble targets of issue 16 §9.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::parallel::pipeline {
namespace {

PipelineCosts costsOf(double f, double b, double w, double comm = 0) {
  PipelineCosts c;
  c.f = f;
  c.b = b;
  c.w = w;
  c.comm = comm;
  return c;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

bool mentions(const std::vector<std::string>& problems, const std::string& text) {
  return std::any_of(problems.begin(), problems.end(),
                     [&](const std::string& p) { return p.find(text) != std::string::npos; });
}

// p stages, M micro-batches in the shape the issue asks: {p, 2p, 3p+1}.
std::vector<int> microBatchCounts(int p) { return {p, 2 * p, 3 * p + 1}; }

TEST(PipelineSchedule, EveryGeneratorValidatesOrRefusesWithConfigError) {
  const std::vector<PipelineCosts> costSets = {costsOf(1, 1, 1), costsOf(1, 1.5, 0.8, 0.1)};
  for (const auto& costs : costSets) {
    for (int p = 2; p <= 8; ++p) {
      for (int M : microBatchCounts(p)) {
        for (const auto& name : scheduleNames()) {
          SCOPED_TRACE(name + " p=" + std::to_string(p) + " M=" + std::to_string(M));
          PipelineSchedule s;
          try {
            s = makeSchedule(name, p, M, 2, costs);
          } catch (const ConfigError& e) {
            // Only interleaved refuses, and only M not a multiple of p.
            EXPECT_EQ(name, "interleaved_1f1b");
            EXPECT_NE(M % p, 0);
            EXPECT_EQ(e.field(), "pipeline.microbatches");
            continue;
          }
          EXPECT_EQ(s.stages, p);
          EXPECT_EQ(s.microBatches, M);
          const auto problems = validateSchedule(s, costs);
          EXPECT_TRUE(problems.empty()) << joined(problems);
          const PipelineSchedule withComm = withCommunication(s);
          const auto commProblems = validateSchedule(withComm, costs);
          EXPECT_TRUE(commProblems.empty()) << joined(commProblems);
          // Placing the transfers does not change the timing.
          EXPECT_NEAR(simulate(withComm, costs).makespan, simulate(s, costs).makespan, 1e-9);
        }
      }
    }
  }
}

TEST(PipelineSchedule, BadConfigsNameTheKey) {
  const PipelineCosts costs;
  try {
    makeSchedule("zb_h3", 4, 8, 1, costs);
    FAIL() << "unknown name accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "pipeline.schedule");
    EXPECT_NE(std::string(e.what()).find("zb_v"), std::string::npos) << e.what();
  }
  try {
    makeSchedule("interleaved_1f1b", 4, 8, 1, costs);
    FAIL() << "v = 1 accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "pipeline.virtual_stages");
  }
  try {
    makeSchedule("1f1b", 4, 0, 1, costs);
    FAIL() << "M = 0 accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "pipeline.microbatches");
  }
  PipelineCosts tight;
  tight.memLimit = 0.5;  // not even one micro-batch fits
  try {
    makeSchedule("auto", 4, 8, 1, tight);
    FAIL() << "auto accepted an impossible memory limit";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "pipeline.schedule");
  }
}

Action find(const std::vector<Action>& list, ActionKind kind, int chunk, int mb, size_t* pos) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].kind == kind && list[i].chunk == chunk && list[i].microBatch == mb) {
      *pos = i;
      return list[i];
    }
  }
  ADD_FAILURE() << "no " << toString(kind) << "(c" << chunk << ",m" << mb << ")";
  return {};
}

TEST(PipelineValidator, CatchesALocalDependencySwap) {
  const PipelineCosts costs;
  PipelineSchedule s = makeSchedule("zb_h1", 4, 8, 1, costs);
  auto& last = s.actions[3];
  size_t f = 0, b = 0;
  find(last, ActionKind::kForward, 3, 2, &f);
  find(last, ActionKind::kBackwardInput, 3, 2, &b);
  std::swap(last[f], last[b]);
  const auto problems = validateSchedule(s, costs);
  EXPECT_TRUE(mentions(problems, "depends on")) << joined(problems);
  EXPECT_THROW(simulate(s, costs), InvalidArgument);
}

TEST(PipelineValidator, CatchesACrossRankCycle) {
  // Rank 0 waits for B(1,0) before sending F(0,1); rank 1 wants F(1,1) before
  // F(1,0): each waits for the other, though each list is locally ordered.
  const PipelineCosts costs;
  PipelineSchedule s = makeSchedule("1f1b", 2, 2, 1, costs);
  using K = ActionKind;
  s.actions[0] = {Action{K::kForward, 0, 0}, Action{K::kBackward, 0, 0}, Action{K::kForward, 1, 0},
                  Action{K::kBackward, 1, 0}};
  s.actions[1] = {Action{K::kForward, 1, 1}, Action{K::kForward, 0, 1}, Action{K::kBackward, 0, 1},
                  Action{K::kBackward, 1, 1}};
  const auto problems = validateSchedule(s, costs);
  EXPECT_TRUE(mentions(problems, "deadlock")) << joined(problems);
  EXPECT_FALSE(mentions(problems, "depends on")) << joined(problems);
  // Rank 1 in 1F1B order: valid.
  s.actions[1] = {Action{K::kForward, 0, 1}, Action{K::kBackward, 0, 1}, Action{K::kForward, 1, 1},
                  Action{K::kBackward, 1, 1}};
  EXPECT_TRUE(validateSchedule(s, costs).empty()) << joined(validateSchedule(s, costs));
}

TEST(PipelineValidator, CatchesAMissingReceiveAndAWrongPeer) {
  const PipelineCosts costs;
  PipelineSchedule s = withCommunication(makeSchedule("1f1b", 4, 8, 1, costs));
  size_t pos = 0;
  find(s.actions[2], ActionKind::kRecvActivation, 2, 3, &pos);
  s.actions[2].erase(s.actions[2].begin() + static_cast<long>(pos));
  auto problems = validateSchedule(s, costs);
  EXPECT_TRUE(mentions(problems, "missing RecvActivation(c2,m3)")) << joined(problems);

  PipelineSchedule t = withCommunication(makeSchedule("zb_v", 3, 6, 1, costs));
  find(t.actions[1], ActionKind::kSendGrad, 1, 0, &pos);
  t.actions[1][pos].peer = 2;
  problems = validateSchedule(t, costs);
  EXPECT_TRUE(mentions(problems, "peer should be rank 0")) << joined(problems);
}

TEST(PipelineValidator, CatchesAMissingOrDuplicatedPass) {
  const PipelineCosts costs;
  PipelineSchedule s = makeSchedule("zb_h2", 4, 8, 1, costs);
  size_t pos = 0;
  find(s.actions[1], ActionKind::kBackwardWeight, 1, 5, &pos);
  s.actions[1].erase(s.actions[1].begin() + static_cast<long>(pos));
  EXPECT_TRUE(mentions(validateSchedule(s, costs), "missing W(c1,m5)"));
  s.actions[1].push_back(Action{ActionKind::kForward, 0, 1});
  EXPECT_TRUE(mentions(validateSchedule(s, costs), "appears twice"));
  s.actions[0].push_back(Action{ActionKind::kBackwardWeight, 5, 1});
  EXPECT_TRUE(mentions(validateSchedule(s, costs), "belongs to rank 1"));
}

TEST(PipelineValidator, CatchesAMemoryOverrun) {
  PipelineCosts costs;
  costs.memLimit = 4;  // 1F1B's peak for p = 4: 4 micro-batches in flight on rank 0
  EXPECT_TRUE(validateSchedule(makeSchedule("1f1b", 4, 12, 1, costs), costs).empty());
  EXPECT_TRUE(validateSchedule(makeSchedule("zb_h1", 4, 12, 1, costs), costs).empty());
  const auto problems = validateSchedule(makeSchedule("gpipe", 4, 12, 1, costs), costs);
  EXPECT_TRUE(mentions(problems, "rank 0: memory 5 after F(c0,m4) exceeds the limit 4")) << joined(problems);
  EXPECT_FALSE(validateSchedule(makeSchedule("zb_h2", 4, 12, 1, costs), costs).empty());  // needs 2p-1
}

TEST(PipelineSimulator, ClassicBubblesMatchTheClosedForm) {
  // 1F1B and GPipe with fused BW: makespan (M + p - 1)(F + B + W), so the
  // bubble time is (p - 1)(F + B + W).
  for (const auto& costs : {costsOf(1, 1, 1), costsOf(1, 1.5, 0.8)}) {
    const double stage = costs.f + costs.b + costs.w;
    for (int p = 2; p <= 8; ++p) {
      for (int M : microBatchCounts(p)) {
        for (const char* name : {"1f1b", "gpipe"}) {
          const Simulation sim = simulate(makeSchedule(name, p, M, 1, costs), costs);
          EXPECT_NEAR(sim.makespan - M * stage, (p - 1) * stage, 1e-9) << name << " p=" << p << " M=" << M;
          EXPECT_NEAR(sim.bubbleRate, 1 - M * stage / sim.makespan, 1e-12);
        }
        // Peak memory (defaults: F +1, W -1): 1F1B holds p - r on rank r, GPipe all M.
        const Simulation ofb = simulate(makeSchedule("1f1b", p, M, 1, costs), costs);
        for (int r = 0; r < p; ++r) EXPECT_DOUBLE_EQ(ofb.peakMemory[static_cast<size_t>(r)], std::min(p - r, M));
        EXPECT_DOUBLE_EQ(simulate(makeSchedule("gpipe", p, M, 1, costs), costs).peakMemory[0], M);
      }
    }
  }
}

TEST(PipelineSimulator, CommunicationDelaysEveryHop) {
  // Two stages, one micro-batch, F=B=W=1, comm 0.5: F0 [0,1], F1 [1.5,2.5],
  // BW1 [2.5,4.5], BW0 [5,7]: rank 0 spans 7.
  const PipelineCosts costs = costsOf(1, 1, 1, 0.5);
  const Simulation sim = simulate(withCommunication(makeSchedule("1f1b", 2, 1, 1, costs)), costs);
  EXPECT_DOUBLE_EQ(sim.makespan, 7);
  bool sawRecv = false;
  for (const auto& a : sim.timeline) {
    if (a.rank == 0 && a.action.kind == ActionKind::kRecvGrad) {
      EXPECT_DOUBLE_EQ(a.start, 1);
      EXPECT_DOUBLE_EQ(a.end, 5);
      sawRecv = true;
    }
  }
  EXPECT_TRUE(sawRecv);
}

TEST(PipelineSimulator, ZeroBubbleTargets) {
  // Issue 16 §9 (simulated), p = 4, 8 and M = 2p, 3p+1. With equal costs:
  // ZB-H1 <= 0.5 x 1F1B's bubble rate, ZB-H2 and ZB-V <= 0.15 x. With B
  // heavier than W (1 / 1.5 / 0.8, as CPU runs show) ZB-H1 keeps the paper's
  // closed form (p-1)(F+B-W), which is more than half of (p-1)(F+B+W) there,
  // and ZB-H2 / ZB-V stay well under 1F1B without reaching 0.15 x: those
  // rows are printed for the closing note and checked against 1F1B only.
  std::printf("%-8s %2s %3s %-16s %8s %8s %8s %8s\n", "costs", "p", "M", "schedule", "makespan", "bubble", "vs_1f1b",
              "peak_mem");
  for (const auto& [label, costs] : {std::pair<const char*, PipelineCosts>{"1/1/1", costsOf(1, 1, 1)},
                                     std::pair<const char*, PipelineCosts>{"1/1.5/.8", costsOf(1, 1.5, 0.8)}}) {
    const bool equal = costs.b == costs.f && costs.w == costs.f;
    for (int p : {4, 8}) {
      for (int M : {2 * p, 3 * p + 1}) {
        double base = 0;
        for (const char* name : {"1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_h2", "zb_v", "auto"}) {
          if (std::string(name) == "interleaved_1f1b" && M % p != 0) continue;
          const Simulation sim = simulate(makeSchedule(name, p, M, 2, costs), costs);
          const double peak = *std::max_element(sim.peakMemory.begin(), sim.peakMemory.end());
          const std::string n = name;
          if (n == "1f1b") base = sim.bubbleRate;
          std::printf("%-8s %2d %3d %-16s %8.2f %8.4f %8.3f %8.2f\n", label, p, M, name, sim.makespan, sim.bubbleRate,
                      sim.bubbleRate / base, peak);
          const std::string where = n + " " + label + " p=" + std::to_string(p) + " M=" + std::to_string(M);
          if (n == "zb_h1") {
            EXPECT_NEAR(sim.makespan - M * (costs.f + costs.b + costs.w), (p - 1) * (costs.f + costs.b - costs.w), 1e-9)
                << where;
            if (equal) {
              EXPECT_LE(sim.bubbleRate, 0.5 * base) << where;
            }
          }
          if (n == "zb_h2" || n == "zb_v") {
            EXPECT_LE(sim.bubbleRate, (equal ? 0.15 : 0.5) * base) << where;
          }
        }
      }
    }
  }
}

TEST(PipelineAuto, NeverLongerThanTheBestOneChunkScheduleUnderItsMemoryLimit) {
  for (const auto& costs : {costsOf(1, 1, 1), costsOf(1, 1.5, 0.8), costsOf(1, 2, 1, 0.2)}) {
    for (int p : {2, 4, 8}) {
      for (int M : microBatchCounts(p)) {
        // 0: 1F1B's peak (p); 2p - 1: ZB-H2's.
        for (double limit : {0.0, 2.0 * p - 1}) {
          PipelineCosts bounded = costs;
          bounded.memLimit = limit;
          const PipelineSchedule a = makeSchedule("auto", p, M, 1, bounded);
          bounded.memLimit = limit > 0 ? limit : std::min(p, M);
          const Simulation sa = simulate(a, costs);
          EXPECT_TRUE(validateSchedule(a, bounded).empty()) << joined(validateSchedule(a, bounded));
          for (const char* name : {"gpipe", "1f1b", "zb_h1", "zb_h2"}) {
            const PipelineSchedule s = makeSchedule(name, p, M, 1, costs);
            if (!validateSchedule(s, bounded).empty()) continue;  // over the memory limit
            EXPECT_LE(sa.makespan, simulate(s, costs).makespan + 1e-9)
                << "auto vs " << name << " p=" << p << " M=" << M << " limit=" << bounded.memLimit;
          }
        }
      }
    }
  }
}

TEST(PipelineSchedule, ZbVHandsOffLocallyAtTheTurn) {
  const PipelineCosts costs;
  const int p = 4, M = 8;
  const PipelineSchedule s = withCommunication(makeSchedule("zb_v", p, M, 1, costs));
  EXPECT_EQ(s.chunksOf(0), (std::vector<int>{0, 7}));
  EXPECT_EQ(s.chunksOf(3), (std::vector<int>{3, 4}));
  int transfers = 0;
  for (int r = 0; r < p; ++r) {
    for (const Action& a : s.actions[static_cast<size_t>(r)]) {
      if (isComputeKind(a.kind)) continue;
      ++transfers;
      EXPECT_NE(a.peer, r) << toString(a);
    }
  }
  // 2p chunks, 2p-1 edges of which 2p-2 cross ranks; each edge: activation
  // send + recv and gradient send + recv per micro-batch.
  EXPECT_EQ(transfers, (2 * p - 2) * 4 * M);
}

}  // namespace
}  // namespace tessera::parallel::pipeline
