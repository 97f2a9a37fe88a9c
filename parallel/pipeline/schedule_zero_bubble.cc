// The handcrafted one-chunk Zero Bubble schedules (arXiv 2401.10241 §3.1):
// ZB-H1 as a fixed order, ZB-H2 through a timed list scheduler that places
// each rank's next pass as the costs say it becomes ready. ZB-V is in
// schedule_zb_v.cc.
#include <algorithm>
#include <deque>
#include <limits>
#include <set>

#include "parallel/pipeline/schedule_internal.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline::detail {

// ZB-H1: 1F1B's warm-up (min(p-1-r, M) F on rank r), then F, B per step with
// rank r keeping up to r W passes deferred; the deferred W fill the cool-down,
// where 1F1B's rank r waits for the gradients of the later ranks. In flight
// per rank: (p - r) from 1F1B plus r deferred = p, 1F1B's peak on rank 0, so
// the paper's bubble (p-1)(F+B-W) comes at 1F1B's memory.
PipelineSchedule zbH1(int p, int M) {
  PipelineSchedule s = emptySchedule("zb_h1", p, M, 1, roundRobinOwners(p, 1));
  for (int r = 0; r < p; ++r) {
    auto& list = s.actions[static_cast<size_t>(r)];
    const int warmup = std::min(p - 1 - r, M);
    int wDone = 0;
    for (int m = 0; m < warmup; ++m) list.push_back(compute(ActionKind::kForward, r, m));
    for (int m = 0; m < M; ++m) {
      if (warmup + m < M) list.push_back(compute(ActionKind::kForward, r, warmup + m));
      list.push_back(compute(ActionKind::kBackwardInput, r, m));
      if (m + 1 - wDone > r) list.push_back(compute(ActionKind::kBackwardWeight, r, wDone++));
    }
    while (wDone < M) list.push_back(compute(ActionKind::kBackwardWeight, r, wDone++));
  }
  return s;
}

namespace {

constexpr double kEps = 1e-9;
constexpr double kNotDone = std::numeric_limits<double>::infinity();

// A timed list scheduler: ranks pick their next pass at the moment they are
// free, by one rule everywhere: a B whose gradient has arrived (the critical
// path back to the first stage), else an F whose input has arrived and that
// fits the in-flight bound (later chunk first: it leads to the loss), else a
// deferred W (fills what would otherwise be a bubble), else wait for the next
// arrival. "In flight" counts chunk passes F'd and not yet W'd. On ranks with
// two chunks, one slot stays reserved while a micro-batch still owes its
// second chunk's F, so a rank full of first-chunk passes cannot deadlock.
class TimedListScheduler {
 public:
  TimedListScheduler(PipelineSchedule& s, const PipelineCosts& costs, int inflightCap)
      : s_(s), costs_(costs), cap_(inflightCap), C_(s.chunks()), M_(s.microBatches) {
    endF_.assign(static_cast<size_t>(C_ * M_), kNotDone);
    endB_.assign(static_cast<size_t>(C_ * M_), kNotDone);
    nextF_.assign(static_cast<size_t>(C_), 0);
    nextB_.assign(static_cast<size_t>(C_), 0);
    ranks_.resize(static_cast<size_t>(s.stages));
  }

  void run() {
    const int total = C_ * M_ * 3;
    int placed = 0;
    while (placed < total) {
      double t = kNotDone;
      for (const auto& rk : ranks_) {
        if (!rk.finished) t = std::min(t, rk.wake);
      }
      bool any = false;
      for (int r = 0; r < s_.stages; ++r) {
        Rank& rk = ranks_[static_cast<size_t>(r)];
        if (rk.finished || rk.wake > t + kEps) continue;
        if (placeNext(r, t)) {
          any = true;
          ++placed;
        }
      }
      if (any) continue;
      // Nobody at t could start anything: wake them at the next arrival.
      const auto next = events_.upper_bound(t + kEps);
      TESSERA_CHECK(next != events_.end(), "pipeline schedule '" << s_.name << "': the list scheduler is stuck at t = "
                                                                 << t << " with " << total - placed << " passes left");
      for (auto& rk : ranks_) {
        if (!rk.finished && rk.wake <= t + kEps) rk.wake = *next;
      }
    }
  }

 private:
  struct Rank {
    double wake = 0;
    int inflight = 0;
    bool finished = false;
    std::deque<std::pair<int, int>> pendingW;  // (chunk, m) in B order
  };

  size_t at(int c, int m) const { return static_cast<size_t>(c * M_ + m); }
  int owner(int c) const { return s_.chunkOwner[static_cast<size_t>(c)]; }
  // When a pass done on owner(c) is visible on rank r.
  double arrival(double end, int c, int r) const { return owner(c) == r ? end : end + costs_.comm; }

  bool bReady(int c, int r, double t) const {
    const int m = nextB_[static_cast<size_t>(c)];
    if (m >= M_ || endF_[at(c, m)] > t + kEps) return false;
    return c == C_ - 1 || arrival(endB_[at(c + 1, m)], c + 1, r) <= t + kEps;
  }

  bool fReady(int c, int r, double t) const {
    const int m = nextF_[static_cast<size_t>(c)];
    if (m >= M_) return false;
    return c == 0 || arrival(endF_[at(c - 1, m)], c - 1, r) <= t + kEps;
  }

  // Micro-batches whose F ran on an earlier chunk of r but not yet on its last.
  int owedSecondPasses(const std::vector<int>& chunks) const {
    if (chunks.size() < 2) return 0;
    return nextF_[static_cast<size_t>(chunks.front())] - nextF_[static_cast<size_t>(chunks.back())];
  }

  bool placeNext(int r, double t) {
    Rank& rk = ranks_[static_cast<size_t>(r)];
    const std::vector<int> chunks = s_.chunksOf(r);
    int bestB = -1;
    for (int c : chunks) {
      if (!bReady(c, r, t)) continue;
      if (bestB < 0 || nextB_[static_cast<size_t>(c)] < nextB_[static_cast<size_t>(bestB)] ||
          (nextB_[static_cast<size_t>(c)] == nextB_[static_cast<size_t>(bestB)] && c > bestB)) {
        bestB = c;
      }
    }
    if (bestB >= 0) {
      const int m = nextB_[static_cast<size_t>(bestB)]++;
      const double end = place(r, compute(ActionKind::kBackwardInput, bestB, m), t);
      endB_[at(bestB, m)] = end;
      rk.pendingW.emplace_back(bestB, m);
      return true;
    }
    for (auto it = chunks.rbegin(); it != chunks.rend(); ++it) {
      const int c = *it;
      const bool last = c == chunks.back();
      const int reserve = !last && owedSecondPasses(chunks) > 0 ? 1 : 0;
      if (rk.inflight + 1 + reserve > cap_ || !fReady(c, r, t)) continue;
      const int m = nextF_[static_cast<size_t>(c)]++;
      endF_[at(c, m)] = place(r, compute(ActionKind::kForward, c, m), t);
      ++rk.inflight;
      return true;
    }
    if (!rk.pendingW.empty()) {
      const auto [c, m] = rk.pendingW.front();
      rk.pendingW.pop_front();
      place(r, compute(ActionKind::kBackwardWeight, c, m), t);
      --rk.inflight;
      return true;
    }
    return false;
  }

  double place(int r, const Action& a, double t) {
    Rank& rk = ranks_[static_cast<size_t>(r)];
    const double end = t + passCost(costs_, a.kind, s_.chunksPerRank);
    s_.actions[static_cast<size_t>(r)].push_back(a);
    events_.insert(end);
    events_.insert(end + costs_.comm);
    rk.wake = end;
    rk.finished = static_cast<int>(s_.actions[static_cast<size_t>(r)].size()) ==
                  3 * M_ * static_cast<int>(s_.chunksOf(r).size());
    return end;
  }

  PipelineSchedule& s_;
  const PipelineCosts& costs_;
  int cap_;
  int C_, M_;
  std::vector<double> endF_, endB_;
  std::vector<int> nextF_, nextB_;
  std::vector<Rank> ranks_;
  std::set<double> events_;
};

}  // namespace

// ZB-H2: the in-flight bound 2p-1 lets rank r run 2(p-1-r)+1 F before its
// first gradient returns (equal costs), which fills 1F1B's warm-up bubble;
// deferred W fill every later wait, so the tail becomes the paper's
// parallelogram. Peak (2p-1) memF per rank.
PipelineSchedule zbH2(int p, int M, const PipelineCosts& costs) {
  PipelineSchedule s = emptySchedule("zb_h2", p, M, 1, roundRobinOwners(p, 1));
  TimedListScheduler(s, costs, 2 * p - 1).run();
  return s;
}

}  // namespace tessera::parallel::pipeline::detail
