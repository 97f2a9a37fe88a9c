// withOffload (offload.h): which (chunk, micro-batch) of each rank offloads
// its saved activations, and where the kOffload / kReload actions go.
//
// Positions are counted in compute actions of the rank's list (F, B, W, BW):
// F(c, m) at position f, its B at position b. Without offload (c, m) is
// resident over [f, b]; offloaded, during its F (f) and from the compute
// action before B, whose time the reload overlaps, to B ([b-1, b]). So an
// offload only helps when b - f >= 3, and that is the eligibility rule.
#include <algorithm>
#include <map>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/parallel/pipeline/offload.h"

namespace tessera::parallel::pipeline {
namespace {

bool isBackwardOfKey(ActionKind kind) { return kind == ActionKind::kBackwardInput || kind == ActionKind::kBackward; }

struct Lifetime {
  int chunk = 0, microBatch = 0;
  int f = -1, b = -1;  // compute positions of F and of B (or BW)
  bool chosen = false;
  bool eligible() const { return f >= 0 && b - f >= 3; }
  bool residentAt(int t) const {
    if (t < f || t > b) return false;
    return !chosen || t == f || t >= b - 1;
  }
};

std::vector<Lifetime> lifetimesOf(const std::vector<Action>& actions) {
  std::map<std::pair<int, int>, Lifetime> byKey;
  int position = 0;
  for (const Action& a : actions) {
    if (!isComputeKind(a.kind)) continue;
    Lifetime& l = byKey[{a.chunk, a.microBatch}];
    l.chunk = a.chunk;
    l.microBatch = a.microBatch;
    if (a.kind == ActionKind::kForward) l.f = position;
    if (isBackwardOfKey(a.kind)) l.b = position;
    ++position;
  }
  std::vector<Lifetime> out;
  for (auto& [key, l] : byKey) {
    if (l.f >= 0 && l.b >= 0) out.push_back(l);
  }
  return out;
}

// PipeOffload's selective rule: wherever the resident count exceeds the
// budget, offload the live, eligible (chunk, m) that lives longest.
void chooseSelective(std::vector<Lifetime>& lifetimes, double budget, double perPass) {
  int end = 0;
  for (const Lifetime& l : lifetimes) end = std::max(end, l.b + 1);
  for (int t = 0; t < end; ++t) {
    for (;;) {
      double count = 0;
      for (const Lifetime& l : lifetimes) count += l.residentAt(t) ? perPass : 0;
      if (count <= budget + 1e-9) break;
      Lifetime* best = nullptr;
      for (Lifetime& l : lifetimes) {
        if (l.chosen || !l.eligible() || !(l.f < t && t < l.b - 1)) continue;  // choosing must lower count(t)
        if (best == nullptr || l.b - l.f > best->b - best->f || (l.b - l.f == best->b - best->f && l.f < best->f)) {
          best = &l;
        }
      }
      if (best == nullptr) break;  // nothing left to offload at t: the budget cannot hold here
      best->chosen = true;
    }
  }
}

std::vector<Action> insertOffloads(const std::vector<Action>& actions, const std::vector<Lifetime>& lifetimes) {
  std::map<std::pair<int, int>, const Lifetime*> chosenByKey;
  std::multimap<int, const Lifetime*> reloadBefore;  // compute position -> reloads placed ahead of it
  for (const Lifetime& l : lifetimes) {
    if (!l.chosen) continue;
    chosenByKey[{l.chunk, l.microBatch}] = &l;
    reloadBefore.emplace(l.b - 1, &l);
  }
  std::vector<Action> out;
  std::vector<Action> pendingOffload;  // goes after the sends that follow its F
  auto flush = [&] {
    out.insert(out.end(), pendingOffload.begin(), pendingOffload.end());
    pendingOffload.clear();
  };
  int position = 0;
  for (const Action& a : actions) {
    const bool isSend = a.kind == ActionKind::kSendActivation || a.kind == ActionKind::kSendGrad;
    if (!isSend) flush();
    if (isComputeKind(a.kind)) {
      auto [first, last] = reloadBefore.equal_range(position);
      for (auto it = first; it != last; ++it) {
        out.push_back(Action{ActionKind::kReload, it->second->microBatch, it->second->chunk, -1});
      }
      ++position;
    }
    out.push_back(a);
    if (a.kind == ActionKind::kForward && chosenByKey.count({a.chunk, a.microBatch}) != 0) {
      pendingOffload.push_back(Action{ActionKind::kOffload, a.microBatch, a.chunk, -1});
    }
  }
  flush();
  return out;
}

}  // namespace

PipelineSchedule withOffload(PipelineSchedule schedule, const std::string& policy, double budgetMicroBatches) {
  const auto& names = offloadPolicies();
  TESSERA_CHECK_ARG(std::find(names.begin(), names.end(), policy) != names.end(),
                    "pipeline.offload: unknown policy \"" << policy << "\"; valid: \"none\", \"all\", \"selective\"");
  TESSERA_CHECK_ARG(budgetMicroBatches >= 0,
                    "pipeline.offload_budget_mb: the budget must be >= 0 micro-batches, got " << budgetMicroBatches);
  const double perPass = 1.0 / std::max(1, schedule.chunksPerRank);
  for (auto& actions : schedule.actions) {
    actions.erase(std::remove_if(actions.begin(), actions.end(),
                                 [](const Action& a) {
                                   return a.kind == ActionKind::kOffload || a.kind == ActionKind::kReload;
                                 }),
                  actions.end());
    if (policy == "none") continue;
    std::vector<Lifetime> lifetimes = lifetimesOf(actions);
    if (policy == "all") {
      for (Lifetime& l : lifetimes) l.chosen = l.eligible();
    } else {
      chooseSelective(lifetimes, budgetMicroBatches, perPass);
    }
    actions = insertOffloads(actions, lifetimes);
  }
  return schedule;
}

}  // namespace tessera::parallel::pipeline
