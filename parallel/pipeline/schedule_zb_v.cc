// ZB-V (Zero Bubble, arXiv 2401.10241 §6): two chunks per rank in a V, rank r
// holding chunk r on the way down and chunk 2p-1-r on the way up, so the
// first rank also computes the loss and every rank sees the same round trip.
// Memory bound: p memF per rank (2p chunk passes of memF/2), 1F1B's peak.
//
// Built in rounds, as the paper's handcrafted V (the sail-sg repo's zbv.py),
// in our own structure:
//   warm-up   each rank runs first-chunk F until the second-chunk F of
//             micro-batch 0 comes back up to it, then the ranks are evened
//             out so each holds as many F as the one before it;
//   rounds    2M rounds of one B and one F per rank: the B of the chunk whose
//             gradient is (or will first be) there, the F of the second chunk
//             when its input is there, else of the first; W passes go into
//             the waits for those inputs, and in front of any pass that would
//             overflow the memory bound;
//   tail      the remaining W.
// Two yes/no choices (fill a long wait before a B / before an F with a W)
// and a re-run that tolerates each rank's own bubble from the previous run
// are tried; the shortest simulated makespan is kept.
#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>

#include "parallel/pipeline/schedule_internal.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline::detail {
namespace {

constexpr double kEps = 1e-9;
const double kUnset = std::numeric_limits<double>::quiet_NaN();

class VShapeBuilder {
 public:
  VShapeBuilder(int p, int M, const PipelineCosts& costs, bool fillBeforeB, bool fillBeforeF,
                std::vector<double> approved)
      : p_(p), M_(M), c_(costs), fillB_(fillBeforeB), fillF_(fillBeforeF), approved_(std::move(approved)),
        s_(emptySchedule("zb_v", p, M, 2, vShapeOwners(p))) {
    limit_ = p * costs.memF;
    const size_t n = static_cast<size_t>(p);
    st_.resize(n);
    tF_.assign(static_cast<size_t>(2 * p), std::vector<double>(static_cast<size_t>(M), kUnset));
    tB_ = tF_;
  }

  PipelineSchedule build() {
    warmUp();
    for (int round = 0; round < 2 * M_; ++round) {
      backwardRound();
      forwardRound();
    }
    for (int i = 0; i < p_; ++i) {
      while (!st_[at(i)].pendingW.empty()) putW(i);
    }
    return std::move(s_);
  }

  std::vector<double> stageBubbles() const {
    std::vector<double> out;
    for (const auto& st : st_) out.push_back(st.bubble);
    return out;
  }

 private:
  struct Stage {
    int fDown = 0, fUp = 0, bDown = 0, bUp = 0;  // passes placed per kind and chunk
    double cur = 0, mem = 0, bubble = 0;
    std::deque<std::pair<int, int>> pendingW;  // (chunk, m) in B order
  };

  static size_t at(int i) { return static_cast<size_t>(i); }
  int down(int i) const { return i; }
  int up(int i) const { return 2 * p_ - 1 - i; }
  double cost(ActionKind k) const { return passCost(c_, k, 2); }
  double memory(ActionKind k) const { return passMemory(c_, k, 2); }
  static bool placed(double t) { return !std::isnan(t); }

  double maxBubble(int i) const {
    double worst = 0;
    for (const auto& st : st_) worst = std::max(worst, st.bubble);
    if (approved_.empty()) return worst;
    const double maxApproved = *std::max_element(approved_.begin(), approved_.end());
    return std::max(worst, maxApproved - approved_[at(i)]);
  }

  // Places the next pass of `kind` on `chunk` of stage i, as early as allowed.
  void put(int i, ActionKind kind, int chunk) {
    Stage& st = st_[at(i)];
    const bool isDown = chunk == down(i);
    int& count = kind == ActionKind::kForward ? (isDown ? st.fDown : st.fUp) : (isDown ? st.bDown : st.bUp);
    const int m = count;
    TESSERA_CHECK(m < M_, "zb_v builder: too many passes of chunk " << chunk);
    const double noWait = st.cur + cost(kind);
    double end = noWait;
    const auto after = [&](double t, int from) {
      TESSERA_CHECK(placed(t), "zb_v builder: " << toString(kind) << "(c" << chunk << ",m" << m
                                                << ") placed before its input");
      const double hop = s_.chunkOwner[static_cast<size_t>(from)] == i ? 0 : c_.comm;
      end = std::max(end, t + hop + cost(kind));
    };
    if (kind == ActionKind::kForward && chunk > 0) after(tF_[static_cast<size_t>(chunk - 1)][at(m)], chunk - 1);
    if (kind == ActionKind::kBackwardInput) {
      after(tF_[static_cast<size_t>(chunk)][at(m)], chunk);
      if (chunk + 1 < 2 * p_) after(tB_[static_cast<size_t>(chunk + 1)][at(m)], chunk + 1);
    }
    if (st.fDown > 0) st.bubble += end - noWait;
    st.cur = end;
    st.mem += memory(kind);
    ++count;
    (kind == ActionKind::kForward ? tF_ : tB_)[static_cast<size_t>(chunk)][at(m)] = end;
    if (kind == ActionKind::kBackwardInput) st.pendingW.emplace_back(chunk, m);
    s_.actions[at(i)].push_back(compute(kind, chunk, m));
  }

  void putW(int i) {
    Stage& st = st_[at(i)];
    const auto [chunk, m] = st.pendingW.front();
    st.pendingW.pop_front();
    st.cur += cost(ActionKind::kBackwardWeight);
    st.mem += memory(ActionKind::kBackwardWeight);
    s_.actions[at(i)].push_back(compute(ActionKind::kBackwardWeight, chunk, m));
  }

  void makeRoom(int i, double mem) {
    while (st_[at(i)].mem + mem > limit_ + kEps) {
      TESSERA_CHECK(!st_[at(i)].pendingW.empty(), "zb_v builder: rank " << i << " cannot fit the memory bound");
      putW(i);
    }
  }

  // W passes into the wait for an input that arrives at `arrival` (NaN: none);
  // a W longer than the wait only when the wait exceeds the tolerated bubble.
  void fillWait(int i, double arrival, bool fillLong) {
    if (!placed(arrival)) return;
    Stage& st = st_[at(i)];
    while (!st.pendingW.empty() && arrival >= st.cur + cost(ActionKind::kBackwardWeight) - kEps) putW(i);
    if (!st.pendingW.empty() && arrival - st.cur > maxBubble(i) - st.bubble + kEps && fillLong) putW(i);
  }

  double arrivalOf(double t) const { return placed(t) ? t + c_.comm : kUnset; }

  void warmUp() {
    for (int i = 0; i < p_; ++i) put(i, ActionKind::kForward, down(i));
    for (int i = p_ - 1; i >= 0; --i) {
      if (i + 1 < p_) {
        // First-chunk F (on this rank and the ones before it) until micro-batch
        // 0 comes back up from rank i+1, keeping room for the pending second-chunk F.
        const double back = tF_[static_cast<size_t>(up(i + 1))][0] + c_.comm;
        Stage& st = st_[at(i)];
        while (st.mem + memory(ActionKind::kForward) * (2 + 2 * i) <= limit_ + kEps &&
               st.cur + cost(ActionKind::kForward) <= back + kEps && st.fDown < M_) {
          for (int j = 0; j <= i; ++j) {
            if (st_[at(j)].fDown < M_) put(j, ActionKind::kForward, down(j));
          }
        }
      }
      put(i, ActionKind::kForward, up(i));
    }
    // Each rank at least as many F as the one before it, more second-chunk ones.
    bool upNext = false;
    for (int i = 1; i < p_; ++i) {
      for (int guard = 0; guard < 4 * M_; ++guard) {
        const Stage &a = st_[at(i)], &prev = st_[at(i - 1)];
        if (!(a.fDown + a.fUp < prev.fDown + prev.fUp || (a.fUp <= prev.fUp && prev.fUp < M_))) break;
        for (int j = p_ - 1; j >= i; --j) {
          const Stage& s = st_[at(j)];
          if ((upNext ? s.fUp : s.fDown) < M_) put(j, ActionKind::kForward, upNext ? up(j) : down(j));
        }
        upNext = !upNext;
      }
    }
  }

  void backwardRound() {
    for (int i = 0; i < p_; ++i) makeRoom(i, memory(ActionKind::kBackwardInput));
    // The second (up) chunk's B runs from rank 0 to p-1, the first (down)
    // chunk's from p-1 to 0: downs in descending rank order, then ups ascending.
    std::vector<int> downs, ups;
    for (int i = 0; i < p_; ++i) {
      const Stage& st = st_[at(i)];
      const bool downReady = i == p_ - 1 || placed(tB_[static_cast<size_t>(down(i + 1))][at(std::min(st.bDown, M_ - 1))]);
      if (st.bDown < st.bUp && (downReady || st.bUp >= M_)) {
        downs.push_back(i);
      } else {
        ups.push_back(i);
      }
    }
    std::reverse(downs.begin(), downs.end());
    for (int i : downs) {
      const double arrival = i + 1 < p_ ? arrivalOf(tB_[static_cast<size_t>(down(i + 1))][at(st_[at(i)].bDown)]) : kUnset;
      fillWait(i, arrival, true);
      put(i, ActionKind::kBackwardInput, down(i));
    }
    for (int i : ups) {
      if (st_[at(i)].bUp >= M_) continue;
      const double arrival = i > 0 ? arrivalOf(tB_[static_cast<size_t>(up(i - 1))][at(st_[at(i)].bUp)]) : kUnset;
      fillWait(i, arrival, fillB_);
      put(i, ActionKind::kBackwardInput, up(i));
    }
  }

  void forwardRound() {
    for (int i = 0; i < p_; ++i) {
      const Stage& st = st_[at(i)];
      if (st.fUp >= M_) continue;
      int chunk = -1;
      if (st.fUp >= st.fDown) {
        chunk = down(i);
      } else if (i == p_ - 1 || placed(tF_[static_cast<size_t>(up(i + 1))][at(st.fUp)])) {
        chunk = up(i);
      } else if (st.fDown < M_ && (i == 0 || placed(tF_[static_cast<size_t>(down(i - 1))][at(st.fDown)]))) {
        chunk = down(i);
      }
      if (chunk < 0) continue;
      makeRoom(i, memory(ActionKind::kForward));
      double arrival = kUnset;
      if (chunk == down(i) && i > 0) arrival = arrivalOf(tF_[static_cast<size_t>(down(i - 1))][at(st.fDown)]);
      if (chunk == up(i) && i + 1 < p_) arrival = arrivalOf(tF_[static_cast<size_t>(up(i + 1))][at(st.fUp)]);
      fillWait(i, arrival, fillF_);
      put(i, ActionKind::kForward, chunk);
    }
  }

  int p_, M_;
  PipelineCosts c_;
  bool fillB_, fillF_;
  std::vector<double> approved_;  // per rank: bubble tolerated from the previous run; empty: none
  PipelineSchedule s_;
  double limit_ = 0;
  std::vector<Stage> st_;
  std::vector<std::vector<double>> tF_, tB_;  // end times per (chunk, micro-batch)
};

}  // namespace

PipelineSchedule zbV(int p, int M, const PipelineCosts& costs) {
  PipelineSchedule best;
  double bestMakespan = std::numeric_limits<double>::infinity();
  std::string lastError;
  for (int bits = 0; bits < 4; ++bits) {
    std::vector<double> approved;
    double previous = std::numeric_limits<double>::infinity();
    // Re-run tolerating each rank's own bubble while that shortens the schedule.
    for (int attempt = 0; attempt < 8; ++attempt) {
      PipelineSchedule candidate;
      std::vector<double> bubbles;
      try {
        VShapeBuilder builder(p, M, costs, (bits & 1) != 0, (bits & 2) != 0, approved);
        candidate = builder.build();
        bubbles = builder.stageBubbles();
      } catch (const Error& e) {
        lastError = e.what();
        break;
      }
      if (!validateSchedule(candidate, PipelineCosts{costs.f, costs.b, costs.w, costs.comm, costs.memF, costs.memB,
                                                     costs.memW, 0})
               .empty()) {
        break;
      }
      const double makespan = simulate(candidate, costs).makespan;
      if (makespan < bestMakespan - kEps) {
        bestMakespan = makespan;
        best = std::move(candidate);
      }
      if (makespan >= previous - kEps) break;
      previous = makespan;
      approved = bubbles;
    }
  }
  TESSERA_CHECK(!best.actions.empty(), "zb_v: no V schedule for " << p << " stages x " << M
                                                                   << " micro-batches: " << lastError);
  return best;
}

}  // namespace tessera::parallel::pipeline::detail
