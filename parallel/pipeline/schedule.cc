// Pipeline schedules: names, the classic generators (GPipe, 1F1B, Megatron's
// interleaved 1F1B), makeSchedule's checks and the send/recv insertion. The
// zero-bubble generators are in schedule_zero_bubble.cc and schedule_auto.cc,
// the validator and the simulator in schedule_check.cc.
#include "tessera/parallel/pipeline/schedule.h"

#include <algorithm>
#include <sstream>

#include "parallel/pipeline/schedule_internal.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline {

const char* toString(ActionKind kind) {
  switch (kind) {
    case ActionKind::kForward: return "F";
    case ActionKind::kBackwardInput: return "B";
    case ActionKind::kBackwardWeight: return "W";
    case ActionKind::kBackward: return "BW";
    case ActionKind::kSendActivation: return "SendActivation";
    case ActionKind::kRecvActivation: return "RecvActivation";
    case ActionKind::kSendGrad: return "SendGrad";
    case ActionKind::kRecvGrad: return "RecvGrad";
    case ActionKind::kOffload: return "Offload";
    case ActionKind::kReload: return "Reload";
  }
  return "?";
}

bool isComputeKind(ActionKind kind) {
  return kind == ActionKind::kForward || kind == ActionKind::kBackwardInput || kind == ActionKind::kBackwardWeight ||
         kind == ActionKind::kBackward;
}

std::string toString(const Action& action) {
  std::ostringstream out;
  out << toString(action.kind) << "(c" << action.chunk << ",m" << action.microBatch << ")";
  if (action.peer >= 0) {
    const bool send = action.kind == ActionKind::kSendActivation || action.kind == ActionKind::kSendGrad;
    out << (send ? "->" : "<-") << action.peer;
  }
  return out.str();
}

std::vector<int> PipelineSchedule::chunksOf(int rank) const {
  std::vector<int> out;
  for (int c = 0; c < chunks(); ++c) {
    if (chunkOwner[static_cast<size_t>(c)] == rank) out.push_back(c);
  }
  return out;
}

const std::vector<std::string>& scheduleNames() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_h2", "zb_v",
                                                 "auto"};
  return names;
}

namespace detail {

PipelineSchedule emptySchedule(const std::string& name, int stages, int microBatches, int chunksPerRank,
                               std::vector<int> chunkOwner) {
  PipelineSchedule s;
  s.name = name;
  s.stages = stages;
  s.microBatches = microBatches;
  s.chunksPerRank = chunksPerRank;
  s.chunkOwner = std::move(chunkOwner);
  s.actions.resize(static_cast<size_t>(stages));
  return s;
}

std::vector<int> roundRobinOwners(int stages, int chunksPerRank) {
  std::vector<int> owner(static_cast<size_t>(stages * chunksPerRank));
  for (size_t c = 0; c < owner.size(); ++c) owner[c] = static_cast<int>(c) % stages;
  return owner;
}

std::vector<int> vShapeOwners(int stages) {
  std::vector<int> owner(static_cast<size_t>(2 * stages));
  for (int c = 0; c < 2 * stages; ++c) owner[static_cast<size_t>(c)] = c < stages ? c : 2 * stages - 1 - c;
  return owner;
}

double passCost(const PipelineCosts& costs, ActionKind kind, int chunksPerRank) {
  const double v = chunksPerRank;
  switch (kind) {
    case ActionKind::kForward: return costs.f / v;
    case ActionKind::kBackwardInput: return costs.b / v;
    case ActionKind::kBackwardWeight: return costs.w / v;
    case ActionKind::kBackward: return (costs.b + costs.w) / v;
    default: return 0;
  }
}

double passMemory(const PipelineCosts& costs, ActionKind kind, int chunksPerRank) {
  const double v = chunksPerRank;
  switch (kind) {
    case ActionKind::kForward: return costs.memF / v;
    case ActionKind::kBackwardInput: return costs.memB / v;
    case ActionKind::kBackwardWeight: return costs.memW / v;
    case ActionKind::kBackward: return (costs.memB + costs.memW) / v;
    // Offload moves F's saved activations off the device; reload brings them back.
    case ActionKind::kOffload: return -costs.memF / v;
    case ActionKind::kReload: return costs.memF / v;
    default: return 0;
  }
}

}  // namespace detail

namespace {

using detail::compute;

// All F, then all fused BW, ascending micro-batches on every rank.
PipelineSchedule gpipe(int p, int M) {
  PipelineSchedule s = detail::emptySchedule("gpipe", p, M, 1, detail::roundRobinOwners(p, 1));
  for (int r = 0; r < p; ++r) {
    auto& list = s.actions[static_cast<size_t>(r)];
    for (int m = 0; m < M; ++m) list.push_back(compute(ActionKind::kForward, r, m));
    for (int m = 0; m < M; ++m) list.push_back(compute(ActionKind::kBackward, r, m));
  }
  return s;
}

// 1F1B read as warm-up / steady / cool-down: rank r runs min(p-1-r, M) F
// ahead, then one F and one BW per step, then the remaining BW.
PipelineSchedule oneFOneB(int p, int M) {
  PipelineSchedule s = detail::emptySchedule("1f1b", p, M, 1, detail::roundRobinOwners(p, 1));
  for (int r = 0; r < p; ++r) {
    auto& list = s.actions[static_cast<size_t>(r)];
    const int warmup = std::min(p - 1 - r, M);
    for (int m = 0; m < warmup; ++m) list.push_back(compute(ActionKind::kForward, r, m));
    for (int m = 0; m < M; ++m) {
      if (warmup + m < M) list.push_back(compute(ActionKind::kForward, r, warmup + m));
      list.push_back(compute(ActionKind::kBackward, r, m));
    }
  }
  return s;
}

// Megatron's interleaved 1F1B. Rank r runs M*v "virtual micro-batches"; the
// i-th forward one is micro-batch (i / pv) p + i % p of local chunk (i / p) % v
// (groups of p micro-batches go through one chunk, then the next), the i-th
// backward one the same micro-batch of local chunk v-1-(i/p)%v. Warm-up:
// 2(p-1-r) + (v-1)p forward ones, then 1F1B over the virtual micro-batches.
PipelineSchedule interleaved1F1B(int p, int M, int v) {
  PipelineSchedule s = detail::emptySchedule("interleaved_1f1b", p, M, v, detail::roundRobinOwners(p, v));
  const int total = M * v;
  const auto microBatchOf = [&](int i) { return (i / (p * v)) * p + i % p; };
  const auto forwardChunk = [&](int r, int i) { return ((i / p) % v) * p + r; };
  const auto backwardChunk = [&](int r, int i) { return (v - 1 - (i / p) % v) * p + r; };
  for (int r = 0; r < p; ++r) {
    auto& list = s.actions[static_cast<size_t>(r)];
    const int warmup = std::min(2 * (p - 1 - r) + (v - 1) * p, total);
    for (int i = 0; i < warmup; ++i) list.push_back(compute(ActionKind::kForward, forwardChunk(r, i), microBatchOf(i)));
    for (int i = 0; i < total; ++i) {
      const int f = warmup + i;
      if (f < total) list.push_back(compute(ActionKind::kForward, forwardChunk(r, f), microBatchOf(f)));
      list.push_back(compute(ActionKind::kBackward, backwardChunk(r, i), microBatchOf(i)));
    }
  }
  return s;
}

std::string validNames() {
  std::string out;
  for (const auto& n : scheduleNames()) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

PipelineSchedule makeSchedule(const std::string& name, int stages, int microBatches, int virtualStages,
                              const PipelineCosts& costs) {
  const auto& names = scheduleNames();
  TESSERA_CHECK_CONFIG(std::find(names.begin(), names.end(), name) != names.end(), "pipeline.schedule",
                       "unknown schedule '" << name << "'; valid: " << validNames());
  TESSERA_CHECK_CONFIG(stages >= 1, "parallel.pp", "pipeline stages must be >= 1, got " << stages);
  TESSERA_CHECK_CONFIG(microBatches >= 1, "pipeline.microbatches",
                       "must be >= 1, got " << microBatches << " (schedule '" << name << "')");
  if (name == "gpipe") return gpipe(stages, microBatches);
  if (name == "1f1b") return oneFOneB(stages, microBatches);
  if (name == "interleaved_1f1b") {
    TESSERA_CHECK_CONFIG(virtualStages >= 2, "pipeline.virtual_stages",
                         "interleaved_1f1b needs >= 2 chunks per rank, got " << virtualStages
                                                                             << "; use 1f1b for one chunk");
    TESSERA_CHECK_CONFIG(microBatches % stages == 0, "pipeline.microbatches",
                         "interleaved_1f1b runs micro-batches in groups of pp = "
                             << stages << " (as Megatron): " << microBatches << " is not a multiple; use "
                             << (microBatches / stages + 1) * stages << " or a schedule without that need (1f1b, "
                             << "zb_h1, zb_h2, zb_v, auto)");
    return interleaved1F1B(stages, microBatches, virtualStages);
  }
  if (name == "zb_h1") return detail::zbH1(stages, microBatches);
  if (name == "zb_h2") return detail::zbH2(stages, microBatches, costs);
  if (name == "zb_v") return detail::zbV(stages, microBatches, costs);
  return detail::autoSchedule(stages, microBatches, costs);
}

PipelineSchedule withCommunication(PipelineSchedule s) {
  const int last = s.chunks() - 1;
  const auto owner = [&](int c) { return s.chunkOwner[static_cast<size_t>(c)]; };
  for (int r = 0; r < s.stages; ++r) {
    std::vector<Action> out;
    for (const Action& a : s.actions[static_cast<size_t>(r)]) {
      const bool forward = a.kind == ActionKind::kForward;
      const bool backward = a.kind == ActionKind::kBackwardInput || a.kind == ActionKind::kBackward;
      if (!isComputeKind(a.kind) && a.kind != ActionKind::kOffload && a.kind != ActionKind::kReload) continue;
      // Receive right before the consumer: the executor posts it there and
      // the consumer waits for it.
      if (forward && a.chunk > 0 && owner(a.chunk - 1) != r) {
        out.push_back(Action{ActionKind::kRecvActivation, a.microBatch, a.chunk, owner(a.chunk - 1)});
      }
      if (backward && a.chunk < last && owner(a.chunk + 1) != r) {
        out.push_back(Action{ActionKind::kRecvGrad, a.microBatch, a.chunk, owner(a.chunk + 1)});
      }
      out.push_back(a);
      if (forward && a.chunk < last && owner(a.chunk + 1) != r) {
        out.push_back(Action{ActionKind::kSendActivation, a.microBatch, a.chunk, owner(a.chunk + 1)});
      }
      if (backward && a.chunk > 0 && owner(a.chunk - 1) != r) {
        out.push_back(Action{ActionKind::kSendGrad, a.microBatch, a.chunk, owner(a.chunk - 1)});
      }
    }
    s.actions[static_cast<size_t>(r)] = std::move(out);
  }
  return s;
}

}  // namespace tessera::parallel::pipeline
