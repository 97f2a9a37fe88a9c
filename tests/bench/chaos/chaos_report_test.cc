// tessera-chaos without training: plans are read and refused as documented,
// and the report's figures come out of synthetic journal + metrics files as
// computed by hand from the definitions in bench/chaos/report.h.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench/chaos/plan.h"
#include "bench/chaos/report.h"
#include "bench/chaos/runner.h"
#include "tessera/core/config.h"

namespace tessera::chaos {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

constexpr double kT0 = 1.7e9;  // a Unix time, as tessera-train's event lines carry

// A fresh directory, removed when the test passed (kept for a look otherwise).
class TestDir {
 public:
  explicit TestDir(const std::string& name)
      : path_(fs::temp_directory_path() / ("tessera-chaos-test-" + name + "-" + std::to_string(getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TestDir() {
    if (!::testing::Test::HasFailure()) fs::remove_all(path_);
  }
  operator const fs::path&() const { return path_; }
  std::string string() const { return path_.string(); }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

// Writes one node incarnation's metrics file and the journal lines that say
// when the runner saw its step lines.
class SyntheticRun {
 public:
  SyntheticRun(fs::path dir, const json& start) : dir_(std::move(dir)) { journal_.push_back(start); }

  void launch(int node, int incarnation, double t) {
    const std::string name = "node" + std::to_string(node) + "-" + std::to_string(incarnation) + ".jsonl";
    journal_.push_back({{"type", "launch"}, {"node", node}, {"incarnation", incarnation}, {"unix", kT0 + t},
                        {"metrics", name}});
    files_[{node, incarnation}] = name;
  }
  void action(const std::string& what, int node, double t) {
    journal_.push_back({{"type", "action"}, {"action", what}, {"node", node}, {"unix", kT0 + t}});
  }
  void exit(int node, int incarnation, double t, int code) {
    journal_.push_back({{"type", "exit"}, {"node", node}, {"incarnation", incarnation}, {"unix", kT0 + t},
                        {"code", code}});
  }
  void end(double t) { journal_.push_back({{"type", "end"}, {"unix", kT0 + t}, {"reason", "finished"}}); }

  // A step line; the runner saw it at t (seconds since the start).
  void step(int node, int incarnation, int64_t step, double loss, double t, int64_t commBytes = 0) {
    auto& lines = lines_[{node, incarnation}];
    journal_.push_back({{"type", "seen"}, {"node", node}, {"incarnation", incarnation},
                        {"line", static_cast<int64_t>(lines.size())}, {"unix", kT0 + t}});
    lines.push_back({{"step", step}, {"loss", loss}, {"time_s", t - 0.1}, {"comm_bytes", commBytes}});
  }
  void event(int node, int incarnation, json e, double t) {
    e["time_s"] = kT0 + t;
    lines_[{node, incarnation}].push_back(e);
  }
  void membership(const std::vector<int>& nodes, int64_t epoch, int64_t outer, std::vector<std::string> members,
                  double t, std::vector<std::string> joined = {}, std::vector<std::string> dropped = {}) {
    for (int n : nodes) {
      event(n, n == 2 && epoch >= 3 ? 1 : 0,
            {{"event", "membership"}, {"epoch", epoch}, {"outer_step", outer}, {"members", members},
             {"joined", joined}, {"dropped", dropped}},
            t);
    }
  }
  // outer step k committed at t by the (node, incarnation)s given.
  void commit(const std::vector<std::pair<int, int>>& who, int64_t k, int64_t epoch, int attempts, double t,
              const std::string& hash = "") {
    for (const auto& [n, inc] : who) {
      event(n, inc,
            {{"event", "outer_step"}, {"step", k * 10}, {"outer_step", k}, {"epoch", epoch}, {"attempts", attempts},
             {"param_hash", hash.empty() ? "h" + std::to_string(k) : hash}},
            t);
    }
  }

  void write() {
    std::ofstream journal(dir_ / "chaos.jsonl");
    for (const auto& j : journal_) journal << j.dump() << "\n";
    for (const auto& [key, name] : files_) {
      std::ofstream out(dir_ / name);
      for (const auto& j : lines_[key]) out << j.dump() << "\n";
    }
  }

  std::map<std::pair<int, int>, std::vector<json>> lines_;

 private:
  fs::path dir_;
  std::vector<json> journal_;
  std::map<std::pair<int, int>, std::string> files_;
};

// Three nodes, DiLoCo with H = 10 inner steps of 1 s. Node 2 is killed at
// 25 s (inside the round of outer step 3), restarted at 30 s, recovers at
// 38 s and is a member again from epoch 3 (46.5 s).
SyntheticRun scenario(const fs::path& dir) {
  SyntheticRun run(dir, {{"type", "start"}, {"unix", kT0}, {"nodes", 3}, {"nproc_per_node", 1},
                         {"network", "netns"}, {"rate_bps", 1e8}, {"tokens_per_node_step", 1024}, {"steps", 60}});
  for (int n = 0; n < 3; ++n) run.launch(n, 0, 0.1);
  run.membership({0, 1, 2}, 1, 0, {"0.0", "1.0", "2.0"}, 1.0);
  // Step lines every 2 steps, seen 0.2 s after step s at s seconds.
  for (int n = 0; n < 2; ++n) {
    for (int s = 2; s <= 60; s += 2) run.step(n, 0, s, 4.0 - s / 30.0 + 0.2 * n, s + 0.2, s * 100);
  }
  for (int s = 2; s <= 24; s += 2) run.step(2, 0, s, 4.0 - s / 30.0 + 0.1, s + 0.2, s * 100);
  run.commit({{0, 0}, {1, 0}, {2, 0}}, 1, 1, 1, 10.0);
  run.commit({{0, 0}, {1, 0}, {2, 0}}, 2, 1, 1, 20.0);
  run.action("kill", 2, 25.0);
  run.exit(2, 0, 25.01, -9);
  run.action("restart", 2, 30.0);
  run.launch(2, 1, 30.05);
  run.event(0, 0, {{"event", "retry"}, {"outer_step", 3}, {"attempt", 1}, {"error", "peer 2.0 gone"}}, 32.0);
  run.event(1, 0, {{"event", "retry"}, {"outer_step", 3}, {"attempt", 1}, {"error", "peer 2.0 gone"}}, 32.1);
  run.membership({0, 1}, 2, 3, {"0.0", "1.0"}, 36.0, {"2.1"}, {"2.0"});
  run.commit({{0, 0}, {1, 0}}, 3, 2, 2, 37.0);
  run.event(2, 1, {{"event", "recovered"}, {"from", "0.0"}, {"bytes", 2e6}, {"seconds", 0.25}, {"outer_step", 3}},
            38.0);
  for (int s = 32; s <= 60; s += 2) run.step(2, 1, s, 4.0 - s / 30.0 + 0.1, s + 0.3, (s - 30) * 100);
  run.membership({0, 1, 2}, 3, 4, {"0.0", "1.0", "2.1"}, 46.5, {}, {});
  run.commit({{0, 0}, {1, 0}, {2, 1}}, 4, 3, 1, 47.0);
  run.commit({{0, 0}, {1, 0}, {2, 1}}, 5, 3, 1, 57.0);
  run.commit({{0, 0}, {1, 0}, {2, 1}}, 6, 3, 1, 67.0);
  run.exit(0, 0, 70.0, 0);
  run.exit(1, 0, 70.0, 0);
  run.exit(2, 1, 70.0, 0);
  run.end(71.0);
  return run;
}

TEST(ChaosReport, RecoveryRejoinAndCommitsFromSyntheticRun) {
  const TestDir dir("scenario");
  SyntheticRun run = scenario(dir);
  run.write();
  const ChaosRecord record = loadChaosRecord(dir.string());
  ASSERT_EQ(record.runs.size(), 4u);
  EXPECT_EQ(record.endReason, "finished");
  const ChaosReport r = computeReport(record);

  EXPECT_DOUBLE_EQ(r.wallSeconds, 71.0);
  // Commits 1..6, none lost or repeated; one retried attempt (outer step 3, attempt 1).
  EXPECT_EQ(r.firstOuterStep, 1);
  EXPECT_EQ(r.lastOuterStep, 6);
  EXPECT_EQ(r.committedOuterSteps, 6);
  EXPECT_TRUE(r.lostOuterSteps.empty());
  EXPECT_TRUE(r.repeatedOuterSteps.empty());
  EXPECT_TRUE(r.hashMismatches.empty());
  EXPECT_EQ(r.retries, 1);
  // Same-epoch single-attempt gaps: 1->2, 4->5, 5->6, all 10 s.
  EXPECT_NEAR(r.typicalRoundS, 10.0, 1e-6);

  ASSERT_EQ(r.failures.size(), 1u);
  const FailureResult& f = r.failures[0];
  EXPECT_EQ(f.node, 2);
  EXPECT_NEAR(f.atS, 25.0, 1e-6);
  EXPECT_EQ(f.deadMembers, std::vector<std::string>{"2.0"});
  EXPECT_TRUE(f.survived);
  EXPECT_EQ(f.resumedOuterStep, 3);
  EXPECT_NEAR(f.recoveryS, 37.0 - 25.0, 1e-6);
  // Without the failure outer step 3 would have committed at 20 + 10 = 30 s.
  EXPECT_NEAR(f.stallS, 37.0 - 30.0, 1e-6);
  // Highest step logged by 25 s: 24; last commit before: outer step 2 = step 20.
  EXPECT_EQ(f.stepsDiscarded, 4);
  EXPECT_NEAR(f.tokensDiscarded, 4 * 1024.0, 1e-9);
  EXPECT_EQ(r.survivedFailures, 1);
  EXPECT_NEAR(r.meanRecoveryS, 12.0, 1e-6);
  EXPECT_NEAR(r.meanStallS, 7.0, 1e-6);

  ASSERT_EQ(r.joins.size(), 1u);
  const JoinResult& j = r.joins[0];
  EXPECT_TRUE(j.recovered);
  EXPECT_NEAR(j.rejoinS, 38.0 - 30.0, 1e-6);
  EXPECT_EQ(j.from, "0.0");
  EXPECT_NEAR(j.bytesPerSecond, 2e6 / 0.25, 1e-6);
  EXPECT_NEAR(j.linkFraction, 2e6 / 0.25 * 8 / 1e8, 1e-9);  // 0.64 of 100 Mbit/s
  EXPECT_EQ(j.member, "2.1");
  EXPECT_NEAR(j.memberS, 46.5 - 30.0, 1e-6);
  EXPECT_NEAR(r.meanLinkFraction, 0.64, 1e-9);
  // Ring payloads 2(m-1)/m: outer steps 1-2 and 4-6 with 3 members, 3 with 2.
  EXPECT_NEAR(r.ringPayloads, 5 * (4.0 / 3.0) + 1.0, 1e-9);

  // Final loss: mean over the nodes at step 60 (4 - 2 + {0, 0.2, 0.1}).
  EXPECT_EQ(r.finalStep, 60);
  EXPECT_NEAR(r.finalLoss, 2.1, 1e-9);
  ASSERT_EQ(r.nodes.size(), 3u);
  EXPECT_EQ(r.nodes[2].incarnations, 2);
  EXPECT_EQ(r.nodes[2].commBytes, 2400 + 3000);  // each incarnation counts from 0
  EXPECT_EQ(r.nodes[0].commBytes, 6000);

  const auto out = reportJson(record, r);
  EXPECT_EQ(out["summary"]["survived_failures"], 1);
  EXPECT_EQ(out["summary"]["lost_committed_steps"], 0);
  EXPECT_EQ(out["failures"][0]["dead_members"][0], "2.0");
  EXPECT_DOUBLE_EQ(out["joins"][0]["rejoin_s"].get<double>(), 8.0);
}

TEST(ChaosReport, StepLinesTakeTheTimeTheRunnerSawThem) {
  const TestDir dir("times");
  SyntheticRun run = scenario(dir);
  run.write();
  const ChaosRecord record = loadChaosRecord(dir.string());
  const IncarnationRecord& node0 = record.runs[0];
  ASSERT_FALSE(node0.lines.empty());
  bool checked = false;
  for (const auto& line : node0.lines) {
    if (line.value.contains("step") && !line.value.contains("event") && line.value["step"] == 10) {
      EXPECT_NEAR(line.unix - kT0, 10.2, 1e-6);  // seen, not trainer-relative time_s (10.1)
      checked = true;
    }
  }
  EXPECT_TRUE(checked);
}

TEST(ChaosReport, LostRepeatedAndDivergedCommitsAreCounted) {
  const TestDir dir("broken");
  SyntheticRun run = scenario(dir);
  // Drop outer step 4 everywhere; node 0 logs outer step 5 twice; node 1's
  // outer step 6 has other parameters.
  for (auto& [key, lines] : run.lines_) {
    std::vector<json> kept;
    for (const auto& l : lines) {
      const bool isCommit = l.value("event", "") == "outer_step";
      if (isCommit && l["outer_step"] == 4) continue;
      if (isCommit && l["outer_step"] == 6 && key.first == 1) {
        json changed = l;
        changed["param_hash"] = "different";
        kept.push_back(changed);
        continue;
      }
      kept.push_back(l);
      if (isCommit && l["outer_step"] == 5 && key.first == 0) kept.push_back(l);
    }
    lines = kept;
  }
  run.write();
  const ChaosReport r = computeReport(loadChaosRecord(dir.string()));
  EXPECT_EQ(r.lostOuterSteps, std::vector<int64_t>{4});
  EXPECT_EQ(r.repeatedOuterSteps, std::vector<int64_t>{5});
  EXPECT_EQ(r.hashMismatches, std::vector<int64_t>{6});
  EXPECT_EQ(r.committedOuterSteps, 5);
}

TEST(ChaosReport, KillThatNeverRecoversIsNotSurvived) {
  const TestDir dir("dead");
  SyntheticRun run(dir, {{"type", "start"}, {"unix", kT0}, {"nodes", 2}, {"tokens_per_node_step", 10}});
  run.launch(0, 0, 0);
  run.launch(1, 0, 0);
  run.membership({0, 1}, 1, 0, {"0.0", "1.0"}, 1.0);
  run.commit({{0, 0}, {1, 0}}, 1, 1, 1, 10.0);
  run.action("kill", 1, 12.0);
  // Node 0 commits once more, but still in epoch 1 with node 1 as a member:
  // that decision predates the kill, so training has not resumed without it.
  run.commit({{0, 0}}, 2, 1, 1, 12.5);
  run.end(40.0);
  run.write();
  const ChaosReport r = computeReport(loadChaosRecord(dir.string()));
  ASSERT_EQ(r.failures.size(), 1u);
  EXPECT_FALSE(r.failures[0].survived);
  EXPECT_LT(r.failures[0].recoveryS, 0);
  EXPECT_EQ(r.survivedFailures, 0);
  EXPECT_LT(r.meanRecoveryS, 0);
}

// A partition is a failure; after the heal the node's launcher restarts its
// evicted workers (same runner incarnation, new member 1.1), which recover.
TEST(ChaosReport, PartitionIsAFailureAndHealRecoversInTheSameIncarnation) {
  const TestDir dir("heal");
  SyntheticRun run(dir, {{"type", "start"}, {"unix", kT0}, {"nodes", 2}, {"rate_bps", 1e8}});
  run.launch(0, 0, 0);
  run.launch(1, 0, 0);
  run.membership({0, 1}, 1, 0, {"0.0", "1.0"}, 1.0);
  run.commit({{0, 0}, {1, 0}}, 1, 1, 1, 10.0);
  run.action("partition", 1, 12.0);
  run.membership({0}, 2, 2, {"0.0"}, 19.0, {}, {"1.0"});
  run.commit({{0, 0}}, 2, 2, 2, 19.5);
  run.action("heal", 1, 25.0);
  run.event(1, 0, {{"event", "recovered"}, {"from", "0.0"}, {"bytes", 1e6}, {"seconds", 0.1}}, 27.0);
  run.membership({0}, 3, 3, {"0.0", "1.1"}, 29.0);
  run.commit({{0, 0}, {1, 0}}, 3, 3, 1, 29.5);
  run.end(35.0);
  run.write();
  const ChaosReport r = computeReport(loadChaosRecord(dir.string()));
  ASSERT_EQ(r.failures.size(), 1u);
  EXPECT_EQ(r.failures[0].action, "partition");
  EXPECT_TRUE(r.failures[0].survived);
  EXPECT_NEAR(r.failures[0].recoveryS, 7.5, 1e-6);
  ASSERT_EQ(r.joins.size(), 1u);
  EXPECT_EQ(r.joins[0].action, "heal");
  EXPECT_TRUE(r.joins[0].recovered);
  EXPECT_NEAR(r.joins[0].rejoinS, 2.0, 1e-6);
  EXPECT_NEAR(r.joins[0].linkFraction, 1e7 * 8 / 1e8, 1e-9);
  EXPECT_EQ(r.joins[0].member, "1.1");
  EXPECT_NEAR(r.joins[0].memberS, 4.0, 1e-6);
  // Ring payloads: 2(m-1)/m over the commits: m = 2, 1, 2 (members of each epoch).
  EXPECT_NEAR(r.ringPayloads, 1.0 + 0.0 + 1.0, 1e-9);
}

// Two kinds of failure with the elastic mesh's "decision" and "group" events:
// node 2's workers killed at 25 s (its launcher marked them dead: seen 0.3 s
// later), node 1 killed whole at 46 s (seen dead by its heartbeat timeout
// 5.5 s later; the first attempt without it failed and was retried). Each
// stall is cut into phases by hand from report.h's definition.
TEST(ChaosReport, StallPerKindAndPerPhase) {
  const TestDir dir("kinds");
  SyntheticRun run(dir, {{"type", "start"}, {"unix", kT0}, {"nodes", 3}, {"nproc_per_node", 1},
                         {"network", "loopback"}, {"store", "etcd"}, {"heartbeat_timeout_s", 5.0}});
  for (int n = 0; n < 3; ++n) run.launch(n, 0, 0.1);
  for (int n = 0; n < 3; ++n) {
    run.event(n, 0, {{"event", "membership"}, {"epoch", 1}, {"outer_step", 0}, {"members", {"0.0", "1.0", "2.0"}}},
              1.0);
  }
  run.commit({{0, 0}, {1, 0}, {2, 0}}, 1, 1, 1, 10.0);
  run.commit({{0, 0}, {1, 0}, {2, 0}}, 2, 1, 1, 20.0);
  // Workers of node 2: dead mark seen at 25.3; the leader decides at 30.4 (outer step 3's round).
  run.action("kill_workers", 2, 25.0);
  run.event(0, 0, {{"event", "decision"}, {"outer_step", 3}, {"attempt", 0}, {"epoch", 2}, {"dropped", {"2.0"}},
                   {"dead", {{{"member", "2.0"}, {"cause", "dead mark: signal 9"}, {"seen_s", kT0 + 25.3}}}}},
            30.4);
  run.event(0, 0, {{"event", "group"}, {"epoch", 2}, {"ok", true}, {"seconds", 0.2}}, 30.6);
  run.event(1, 0, {{"event", "group"}, {"epoch", 2}, {"ok", true}, {"seconds", 0.3}}, 30.7);
  for (int n = 0; n < 2; ++n) {
    run.event(n, 0, {{"event", "membership"}, {"epoch", 2}, {"outer_step", 3}, {"members", {"0.0", "1.0"}},
                     {"dropped", {"2.0"}}},
              31.0);
  }
  run.commit({{0, 0}, {1, 0}}, 3, 2, 1, 31.0);
  run.commit({{0, 0}, {1, 0}}, 4, 2, 1, 41.0);
  // Node 1 whole: seen dead at 51.5; attempt 0 decided at 52.0 fails, attempt 1 at 52.8.
  run.action("kill", 1, 46.0);
  run.event(0, 0, {{"event", "decision"}, {"outer_step", 5}, {"attempt", 0}, {"epoch", 3}, {"dropped", {"1.0"}},
                   {"dead", {{{"member", "1.0"}, {"cause", "heartbeat timeout"}, {"seen_s", kT0 + 51.5}}}}},
            52.0);
  run.event(0, 0, {{"event", "group"}, {"epoch", 3}, {"ok", false}, {"error", "abandoned"}}, 52.3);
  run.event(0, 0, {{"event", "retry"}, {"outer_step", 5}, {"attempt", 1}}, 52.5);
  run.event(0, 0, {{"event", "decision"}, {"outer_step", 5}, {"attempt", 1}, {"epoch", 4}, {"dropped", json::array()},
                   {"dead", json::array()}},
            52.8);
  run.event(0, 0, {{"event", "group"}, {"epoch", 4}, {"ok", true}}, 53.2);
  run.event(0, 0, {{"event", "membership"}, {"epoch", 4}, {"outer_step", 5}, {"members", {"0.0"}},
                   {"dropped", {"1.0"}}},
            53.5);
  run.commit({{0, 0}}, 5, 4, 2, 53.5);
  run.end(60.0);
  run.write();
  const ChaosRecord record = loadChaosRecord(dir.string());
  EXPECT_EQ(record.store, "etcd");
  EXPECT_DOUBLE_EQ(record.heartbeatTimeoutS, 5.0);
  const ChaosReport r = computeReport(record);
  EXPECT_NEAR(r.typicalRoundS, 10.0, 1e-6);  // 1->2 and 3->4
  ASSERT_EQ(r.failures.size(), 2u);

  const FailureResult& w = r.failures[0];
  EXPECT_EQ(w.kind, "workers");
  EXPECT_EQ(w.deadMembers, std::vector<std::string>{"2.0"});
  ASSERT_TRUE(w.survived);
  EXPECT_NEAR(w.stallS, 31.0 - 30.0, 1e-6);  // outer step 3 was due at 20 + 10
  EXPECT_NEAR(w.deadSeenS, 0.3, 1e-6);
  // Window [30, 31]: seen 25.3 (before it), decided 30.4, formed 30.7 (the last node's group).
  EXPECT_NEAR(w.breakdown.detectionS, 0.0, 1e-6);
  EXPECT_NEAR(w.breakdown.decisionS, 0.4, 1e-6);
  EXPECT_NEAR(w.breakdown.retryS, 0.0, 1e-6);
  EXPECT_NEAR(w.breakdown.formationS, 0.3, 1e-6);
  EXPECT_NEAR(w.breakdown.collectiveS, 0.3, 1e-6);

  const FailureResult& n = r.failures[1];
  EXPECT_EQ(n.kind, "node");
  EXPECT_EQ(n.deadMembers, std::vector<std::string>{"1.0"});
  ASSERT_TRUE(n.survived);
  EXPECT_NEAR(n.stallS, 53.5 - 51.0, 1e-6);  // due at 41 + 10
  EXPECT_NEAR(n.deadSeenS, 5.5, 1e-6);
  // Window [51, 53.5]: seen 51.5, decided 52.0, redecided 52.8 (attempt 1), formed 53.2.
  EXPECT_NEAR(n.breakdown.detectionS, 0.5, 1e-6);
  EXPECT_NEAR(n.breakdown.decisionS, 0.5, 1e-6);
  EXPECT_NEAR(n.breakdown.retryS, 0.8, 1e-6);
  EXPECT_NEAR(n.breakdown.formationS, 0.4, 1e-6);
  EXPECT_NEAR(n.breakdown.collectiveS, 0.3, 1e-6);
  const StallBreakdown& b = n.breakdown;
  EXPECT_NEAR(b.detectionS + b.decisionS + b.retryS + b.formationS + b.collectiveS, n.stallS, 1e-6)
      << "the phases must add up to the stall";

  ASSERT_EQ(r.byKind.size(), 2u);
  EXPECT_EQ(r.byKind[0].kind, "workers");
  EXPECT_EQ(r.byKind[0].failures, 1);
  EXPECT_NEAR(r.byKind[0].meanStallS, 1.0, 1e-6);
  EXPECT_NEAR(r.byKind[0].maxStallS, 1.0, 1e-6);
  EXPECT_DOUBLE_EQ(r.byKind[0].targetMeanStallS, 3.0);
  EXPECT_DOUBLE_EQ(r.byKind[0].targetMaxStallS, 6.0);
  EXPECT_EQ(r.byKind[1].kind, "node");
  EXPECT_NEAR(r.byKind[1].meanStallS, 2.5, 1e-6);
  EXPECT_NEAR(r.byKind[1].meanDeadSeenS, 5.5, 1e-6);
  EXPECT_NEAR(r.byKind[1].meanBreakdown.retryS, 0.8, 1e-6);
  EXPECT_DOUBLE_EQ(r.byKind[1].targetMeanStallS, 6.0) << "heartbeat timeout + 1 s";
  EXPECT_LT(r.byKind[1].targetMaxStallS, 0) << "no max target for silent losses";

  const auto out = reportJson(record, r);
  EXPECT_EQ(out["store"], "etcd");
  EXPECT_EQ(out["failures"][0]["kind"], "workers");
  EXPECT_DOUBLE_EQ(out["failures"][1]["breakdown"]["retry_s"].get<double>(), 0.8);
  EXPECT_DOUBLE_EQ(out["failures"][1]["dead_seen_s"].get<double>(), 5.5);
  const auto& kinds = out["summary"]["by_kind"];
  EXPECT_DOUBLE_EQ(kinds["workers"]["mean_stall_s"].get<double>(), 1.0);
  EXPECT_EQ(kinds["workers"]["target"]["met"], true);
  EXPECT_DOUBLE_EQ(kinds["node"]["target"]["mean_stall_s"].get<double>(), 6.0);
  EXPECT_EQ(kinds["node"]["target"]["met"], true);
  EXPECT_DOUBLE_EQ(kinds["node"]["mean_breakdown"]["formation_s"].get<double>(), 0.4);
}

// Without the elastic events (an older trainer) a stall is all detection.
TEST(ChaosReport, StallWithoutEventsIsAllDetection) {
  const TestDir dir("noevents");
  SyntheticRun run = scenario(dir);
  run.write();
  const ChaosReport r = computeReport(loadChaosRecord(dir.string()));
  ASSERT_EQ(r.failures.size(), 1u);
  const FailureResult& f = r.failures[0];
  EXPECT_EQ(f.kind, "node");
  EXPECT_LT(f.deadSeenS, 0);
  EXPECT_NEAR(f.breakdown.detectionS, f.stallS, 1e-6);
  EXPECT_NEAR(f.breakdown.retryS + f.breakdown.formationS + f.breakdown.collectiveS, 0.0, 1e-6);
  ASSERT_EQ(r.byKind.size(), 1u);
  EXPECT_LT(r.byKind[0].targetMeanStallS, 0) << "no heartbeat timeout in the start record: no target";
}

TEST(ChaosReport, PlotIsWrittenWhenGnuplotExists) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) GTEST_SKIP() << "gnuplot not installed";
  const TestDir dir("plot");
  scenario(dir).write();
  const ChaosRecord record = loadChaosRecord(dir.string());
  const ChaosReport r = computeReport(record);
  const std::string png = plotReport(dir.string(), record, r, &record);
  ASSERT_FALSE(png.empty()) << "see " << (dir / "report.gp.log");
  EXPECT_GT(fs::file_size(png), 1000u);
  std::ifstream tsv(dir / "report.tsv");
  std::string content((std::istreambuf_iterator<char>(tsv)), std::istreambuf_iterator<char>());
  EXPECT_NE(content.find("# node 2"), std::string::npos);
}

// --- plans ---------------------------------------------------------------

const char* const kPlan = R"(
[job]
config = "CONFIG"
steps = 40
overrides = ["data.batch_size=8", "diloco.inner_steps=5"]
nodes = 3
min_nodes = 2
max_nodes = 4
nproc_per_node = 2
heartbeat_timeout_s = 4
[elastic]
max_retries = 5
[[node]]
index = 1
fault = "slow:rank=2,factor=2"
[[event]]
at_s = 10
action = "kill"
node = 2
[[event]]
at_step = 20
action = "restart"
node = 2
[[event]]
at_s = 30
action = "join"
node = 3
[soak]
kills = 4
mtbf_s = 3
)";

std::string planWith(const fs::path& config, const std::string& extra = "") {
  std::string text = kPlan;
  text.replace(text.find("CONFIG"), 6, config.string());
  return text + extra;
}

fs::path writeConfig(const fs::path& dir) {
  const fs::path config = dir / "train.toml";
  std::ofstream(config) << "[data]\nbatch_size = 16\nseq_len = 64\n[train]\nsteps = 100\n";
  return config;
}

TEST(ChaosPlan, ReadsEveryField) {
  const TestDir dir("plan");
  const ChaosPlan p = parseChaosPlan(planWith(writeConfig(dir)), dir.string(), "test.toml", false);
  EXPECT_EQ(p.steps, 40);
  EXPECT_EQ(p.nodes, 3);
  EXPECT_EQ(p.minNodes, 2);
  EXPECT_EQ(p.maxNodes, 4);
  EXPECT_EQ(p.nprocPerNode, 2);
  EXPECT_EQ(p.network, "loopback");
  EXPECT_EQ(p.elastic.at("heartbeat_timeout_s"), "4");
  EXPECT_EQ(p.elastic.at("max_retries"), "5");
  EXPECT_EQ(p.nodeFaults.at(1), "slow:rank=2,factor=2");
  ASSERT_EQ(p.events.size(), 3u);
  EXPECT_EQ(p.events[1].atStep, 20);
  EXPECT_EQ(p.events[2].action, "join");
  EXPECT_EQ(p.slotsUsed(), 4);
  EXPECT_EQ(p.soak.kills, 4);
  const ChaosPlan plain = p.withoutFaults();
  EXPECT_TRUE(plain.events.empty());
  EXPECT_EQ(plain.soak.kills, 0);
  EXPECT_TRUE(plain.nodeFaults.empty());
  // 8 sequences (override) x 64 bytes x 2 processes per node.
  const JobShape shape = readJobShape(p);
  EXPECT_EQ(shape.steps, 40);
  EXPECT_DOUBLE_EQ(shape.tokensPerNodeStep, 8.0 * 64 * 2);
}

TEST(ChaosPlan, RefusesWhatCannotRun) {
  const TestDir dir("refuse");
  const fs::path config = writeConfig(dir);
  auto refused = [&](const std::string& extra, bool root, const std::string& needle) {
    try {
      parseChaosPlan(planWith(config, extra), dir.string(), "test.toml", root);
      ADD_FAILURE() << "accepted: " << extra;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused("[[event]]\nat_s = 5\naction = \"partition\"\nnode = 1\n", false, "needs network.mode = \"netns\"");
  refused("[[event]]\nat_s = 5\naction = \"slow\"\nnode = 1\n", false, "fault = \"slow:rank=R,factor=F\"");
  refused("[[event]]\nat_s = 5\naction = \"explode\"\nnode = 1\n", false, "unknown action 'explode'");
  refused("[[event]]\nat_s = 5\nat_step = 3\naction = \"kill\"\nnode = 1\n", false, "exactly one of at_s");
  refused("[[event]]\nat_s = 5\naction = \"kill\"\nnode = 7\n", false, "beyond max_nodes");
  refused("[network]\nmode = \"netns\"\n", false, "needs root");
  refused("[network]\nmode = \"loopback\"\nrate = \"100mbit\"\n", false, "needs mode = \"netns\"");
  // As root, netns and partitions are accepted.
  const ChaosPlan p = parseChaosPlan(
      planWith(config, "[network]\nmode = \"auto\"\nrate = \"100mbit\"\n[[event]]\nat_s = 5\naction = \"partition\"\nnode = 1\n"),
      dir.string(), "test.toml", true);
  EXPECT_EQ(p.network, "netns");
  EXPECT_EQ(p.rate, "100mbit");
  // Not root: "auto" falls back to loopback and drops the rate.
  const ChaosPlan q = parseChaosPlan(planWith(config, "[network]\nmode = \"auto\"\nrate = \"100mbit\"\n"),
                                     dir.string(), "test.toml", false);
  EXPECT_EQ(q.network, "loopback");
  EXPECT_TRUE(q.rate.empty());
}

TEST(ChaosPlan, StoreRestartsAndKillKinds) {
  const TestDir dir("kinds-plan");
  const fs::path config = writeConfig(dir);
  const ChaosPlan defaults = parseChaosPlan(planWith(config), dir.string(), "test.toml", false);
  EXPECT_EQ(defaults.store, "tessera");
  EXPECT_EQ(defaults.maxRestarts, 1000);
  EXPECT_EQ(defaults.soak.kinds, std::vector<std::string>{"node"});
  std::string text = planWith(config, "[[event]]\nat_s = 40\naction = \"kill_workers\"\nnode = 1\n");
  // [job] keys go before the first other table.
  text.insert(text.find("heartbeat_timeout_s"), "store = \"etcd\"\nmax_restarts = 7\n");
  text.insert(text.find("mtbf_s"), "kinds = [\"workers\", \"node\"]\nweights = [3, 1]\n");
  const ChaosPlan p = parseChaosPlan(text, dir.string(), "test.toml", false);
  EXPECT_EQ(p.store, "etcd");
  EXPECT_EQ(p.maxRestarts, 7);
  EXPECT_EQ(p.events.back().action, "kill_workers");
  EXPECT_EQ(p.soak.kinds, (std::vector<std::string>{"workers", "node"}));
  EXPECT_EQ(p.soak.weights, (std::vector<double>{3, 1}));
  auto refused = [&](const std::string& from, const std::string& to, const std::string& needle) {
    std::string bad = text;
    bad.replace(bad.find(from), from.size(), to);
    try {
      parseChaosPlan(bad, dir.string(), "test.toml", false);
      ADD_FAILURE() << "accepted: " << to;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused("store = \"etcd\"", "store = \"zookeeper\"", "job.store");
  refused("weights = [3, 1]", "weights = [3]", "one weight per entry");
  refused("kinds = [\"workers\", \"node\"]", "kinds = [\"network\"]", "soak.kinds");
}

TEST(ChaosPlan, RatesInTcUnits) {
  EXPECT_DOUBLE_EQ(parseRateBitsPerSecond("100mbit"), 100e6);
  EXPECT_DOUBLE_EQ(parseRateBitsPerSecond("500kbit"), 500e3);
  EXPECT_DOUBLE_EQ(parseRateBitsPerSecond("1gbit"), 1e9);
  EXPECT_DOUBLE_EQ(parseRateBitsPerSecond("10mbps"), 80e6);  // tc: bps = bytes per second
  EXPECT_THROW(parseRateBitsPerSecond("fast"), InvalidArgument);
}

}  // namespace
}  // namespace tessera::chaos
