// The `auto` schedule: the Zero Bubble paper's greedy heuristic (arXiv
// 2401.10241 §3.2, the initial solution of its ILP; the sail-sg repo's
// auto_schedule.py) from the costs f, b, w, comm, the per-pass memory and a
// memory limit. One chunk per rank. The ILP refinement is left out.
//
// Per micro-batch i the heuristic places, stage by stage, F(i) (unless the
// stage is far enough ahead) and then B(i) from the last stage back to the
// first, and puts W passes in front of them: when memory would overflow (W
// frees it), and into the wait for the input of the F or the B when a W fits
// there. Warm-up: as many F on each stage as fit before the first B comes
// back. Three yes/no choices, all 8 combinations tried, the shortest
// simulated makespan kept:
//   allowBubbleBeforeFirstB  warm-up F may run past the first B's arrival
//   prioritizeB              a stage 2+ F ahead of the next skips its F when
//                            that would delay the B coming back
//   noBubbleGreedy           a W goes into a short wait even when it then
//                            delays the pass that waited (else only a wait
//                            longer than the worst stage's accumulated one)
#include <algorithm>
#include <limits>

#include "parallel/pipeline/schedule_internal.h"
#include "tessera/core/config.h"

namespace tessera::parallel::pipeline::detail {
namespace {

constexpr double kEps = 1e-9;
constexpr double kUnset = std::numeric_limits<double>::quiet_NaN();

struct Flags {
  bool allowBubbleBeforeFirstB = false;
  bool prioritizeB = false;
  bool noBubbleGreedy = false;
};

// This flag combination cannot meet the memory limit (or ran out of order).
struct CannotPlace {};

class GreedyBuilder {
 public:
  GreedyBuilder(int p, int M, const PipelineCosts& costs, double limit, Flags flags)
      : p_(p), M_(M), c_(costs), limit_(limit), flags_(flags), s_(emptySchedule("auto", p, M, 1, roundRobinOwners(p, 1))) {
    const size_t n = static_cast<size_t>(p);
    f_.assign(n, 0);
    b_.assign(n, 0);
    w_.assign(n, 0);
    end_.assign(n, 0);
    mem_.assign(n, 0);
    bubble_.assign(n, 0);
    tF_.assign(n, std::vector<double>(static_cast<size_t>(M), kUnset));
    tB_ = tF_;
  }

  PipelineSchedule build() {
    warmUp();
    for (int i = 1; i < M_; ++i) steadyRound(i);
    for (int j = 0; j < p_; ++j) {
      while (w_[at(j)] < M_) put(j, ActionKind::kBackwardWeight);
    }
    return std::move(s_);
  }

 private:
  static size_t at(int j) { return static_cast<size_t>(j); }
  double cost(ActionKind k) const { return passCost(c_, k, 1); }
  double memory(ActionKind k) const { return passMemory(c_, k, 1); }
  double maxBubble() const { return *std::max_element(bubble_.begin(), bubble_.end()); }
  static double known(double t) {
    if (t != t) throw CannotPlace{};  // NaN: a pass read before it was placed
    return t;
  }

  // Appends the next pass of `kind` on stage j, as early as its inputs allow.
  void put(int j, ActionKind kind) {
    const double mem = memory(kind);
    if (mem_[at(j)] + mem > limit_ + kEps) throw CannotPlace{};
    int& count = kind == ActionKind::kForward ? f_[at(j)] : kind == ActionKind::kBackwardInput ? b_[at(j)] : w_[at(j)];
    const int m = count++;
    const double noWait = end_[at(j)] + cost(kind);
    double done = noWait;
    if (kind == ActionKind::kForward && j > 0) done = std::max(done, known(tF_[at(j - 1)][m]) + c_.comm + cost(kind));
    if (kind == ActionKind::kBackwardInput && j + 1 < p_) {
      done = std::max(done, known(tB_[at(j + 1)][m]) + c_.comm + cost(kind));
    }
    if (kind == ActionKind::kBackwardInput && known(tF_[at(j)][m]) > done - cost(kind) + kEps) throw CannotPlace{};
    if (f_[at(j)] > 1 || kind != ActionKind::kForward) bubble_[at(j)] += done - noWait;
    end_[at(j)] = done;
    mem_[at(j)] += mem;
    if (kind == ActionKind::kForward) tF_[at(j)][m] = done;
    if (kind == ActionKind::kBackwardInput) tB_[at(j)][m] = done;
    s_.actions[at(j)].push_back(compute(kind, j, m));
  }

  // W passes until `mem` more fits on stage j.
  void makeRoom(int j, double mem) {
    while (mem_[at(j)] + mem > limit_ + kEps) {
      if (w_[at(j)] >= b_[at(j)]) throw CannotPlace{};
      put(j, ActionKind::kBackwardWeight);
    }
  }

  // W passes into the wait until `arrival` (the input of the next pass).
  void fillWait(int j, double arrival) {
    while (w_[at(j)] < b_[at(j)] && end_[at(j)] + cost(ActionKind::kBackwardWeight) <= arrival + kEps) {
      put(j, ActionKind::kBackwardWeight);
    }
    if (w_[at(j)] < b_[at(j)] && end_[at(j)] < arrival - kEps) {
      // A W longer than the wait: worth it when the wait is too long to leave,
      // and with noBubbleGreedy also when it is short.
      const bool affordable = arrival - end_[at(j)] <= maxBubble() - bubble_[at(j)] + kEps;
      if (!affordable || flags_.noBubbleGreedy) put(j, ActionKind::kBackwardWeight);
    }
  }

  // Micro-batch 0 on every stage, then as many F per stage as fit before the
  // first B comes back, then B(0) from the last stage to the first.
  void warmUp() {
    for (int j = 0; j < p_; ++j) put(j, ActionKind::kForward);
    std::vector<int> extra(at(p_), 0);
    double backAt = tF_[at(p_ - 1)][0] + cost(ActionKind::kBackwardInput);  // when B(0) ends on stage j+1
    for (int j = p_ - 2; j >= 0; --j) {
      double mem = mem_[at(j)], busyUntil = end_[at(j)];
      while (f_[at(j)] + extra[at(j)] < M_ && mem + memory(ActionKind::kForward) <= limit_ + kEps) {
        const double fEnd = busyUntil + cost(ActionKind::kForward);
        if (flags_.allowBubbleBeforeFirstB ? fEnd > backAt + c_.comm + kEps : busyUntil >= backAt + c_.comm - kEps) {
          break;
        }
        mem += memory(ActionKind::kForward);
        busyUntil = fEnd;
        ++extra[at(j)];
      }
      backAt = std::max(busyUntil, backAt + c_.comm) + cost(ActionKind::kBackwardInput);
    }
    // A later stage runs fewer warm-up F than the one before it.
    for (int j = 1; j < p_; ++j) {
      while (extra[at(j)] > 0 && extra[at(j)] >= extra[at(j - 1)] && f_[at(j)] + extra[at(j)] < M_) --extra[at(j)];
    }
    for (int j = 0; j < p_; ++j) {
      for (int k = 0; k < extra[at(j)]; ++k) put(j, ActionKind::kForward);
    }
    for (int j = p_ - 1; j >= 0; --j) put(j, ActionKind::kBackwardInput);
  }

  // Whether stage j, 2+ F ahead of stage j+1, should skip its F this round.
  bool skipForward(int j) {
    const double nextBack = end_[at(j + 1)] + cost(ActionKind::kForward) + cost(ActionKind::kBackwardInput) + c_.comm;
    if (end_[at(j)] >= nextBack) return true;
    double wCost = 0, memWithW = mem_[at(j)] + memory(ActionKind::kForward);
    for (int k = 0; memWithW > limit_ + kEps && w_[at(j)] + k < b_[at(j)]; ++k) {
      wCost += cost(ActionKind::kBackwardWeight);
      memWithW += memory(ActionKind::kBackwardWeight);
    }
    if (end_[at(j)] + cost(ActionKind::kForward) + wCost <= nextBack + kEps) return false;
    return nextBack - end_[at(j)] <= maxBubble() - bubble_[at(j)] + kEps;
  }

  void steadyRound(int i) {
    std::vector<int> forward(at(p_), 0);
    for (int j = 0; j < p_; ++j) {
      if (f_[at(j)] >= M_) continue;
      const bool ahead = j + 1 < p_ && f_[at(j)] >= f_[at(j + 1)] + 2;
      forward[at(j)] = flags_.prioritizeB && ahead && skipForward(j) ? 0 : 1;
    }
    // A stage runs its F only when the next stage runs one too.
    for (int j = p_ - 2; j >= 0; --j) forward[at(j)] = std::min(forward[at(j)], forward[at(j + 1)]);
    for (int j = 0; j < p_; ++j) {
      if (forward[at(j)] == 0) continue;
      makeRoom(j, memory(ActionKind::kForward));
      if (j > 0) fillWait(j, known(tF_[at(j - 1)][static_cast<size_t>(f_[at(j)])]) + c_.comm);
      put(j, ActionKind::kForward);
    }
    for (int j = p_ - 1; j >= 0; --j) {
      if (b_[at(j)] != i) throw CannotPlace{};
      makeRoom(j, memory(ActionKind::kBackwardInput));
      if (j + 1 < p_) fillWait(j, known(tB_[at(j + 1)][static_cast<size_t>(i)]) + c_.comm);
      // The first stage has nothing left to wait for once its F are done.
      if (j == 0 && f_[0] == M_) {
        while (w_[0] < b_[0]) put(0, ActionKind::kBackwardWeight);
      }
      put(j, ActionKind::kBackwardInput);
    }
  }

  int p_, M_;
  PipelineCosts c_;
  double limit_;
  Flags flags_;
  PipelineSchedule s_;
  std::vector<int> f_, b_, w_;          // passes placed per stage
  std::vector<double> end_, mem_;       // per stage: end of its last pass, memory now
  std::vector<double> bubble_;          // per stage: waits since its first F
  std::vector<std::vector<double>> tF_, tB_;  // end times per (stage, micro-batch)
};

}  // namespace

PipelineSchedule autoSchedule(int p, int M, const PipelineCosts& costs) {
  double limit = costs.memLimit;
  if (limit <= 0) {
    const Simulation ref = simulate(makeSchedule("1f1b", p, M, 1, costs), costs);
    limit = *std::max_element(ref.peakMemory.begin(), ref.peakMemory.end());
  }
  PipelineCosts bounded = costs;
  bounded.memLimit = limit;
  PipelineSchedule best;
  double bestMakespan = std::numeric_limits<double>::infinity();
  for (int bits = 0; bits < 8; ++bits) {
    const Flags flags{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
    PipelineSchedule candidate;
    try {
      candidate = GreedyBuilder(p, M, costs, limit, flags).build();
    } catch (const CannotPlace&) {
      continue;
    }
    if (!validateSchedule(candidate, bounded).empty()) continue;
    const double makespan = simulate(candidate, costs).makespan;
    if (makespan < bestMakespan - kEps) {
      bestMakespan = makespan;
      best = std::move(candidate);
    }
  }
  TESSERA_CHECK_CONFIG(!best.actions.empty(), "pipeline.schedule",
                       "auto cannot fit " << p << " stages x " << M << " micro-batches under the memory limit " << limit
                                          << " (memF " << costs.memF << ", memB " << costs.memB << ", memW "
                                          << costs.memW << "); raise the limit to at least 1f1b's peak or pick another "
                                          << "schedule");
  return best;
}

}  // namespace tessera::parallel::pipeline::detail
