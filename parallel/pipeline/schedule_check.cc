// The schedule validator and the simulator. Both run the schedule the same
// way: every rank walks its list in order and an action runs once what it
// depends on has run (a topological execution); the simulator keeps the
// times, the validator keeps what got stuck.
#include <algorithm>
#include <limits>
#include <sstream>

#include "parallel/pipeline/schedule_internal.h"
#include "tessera/core/error.h"
#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::parallel::pipeline {
namespace {

// What a (chunk, micro-batch) goes through; a fused BW is both kB and kW.
enum Pass { kF = 0, kB, kW, kOffload, kReload, kSendAct, kRecvAct, kSendGrad, kRecvGrad, kPasses };

struct Where {
  int rank = -1;
  int pos = -1;
};

// Where each pass of each (chunk, micro-batch) sits in the lists.
class PassIndex {
 public:
  PassIndex(const PipelineSchedule& s, std::vector<std::string>& problems)
      : s_(s), chunks_(s.chunks()), where_(static_cast<size_t>(kPasses * chunks_ * s.microBatches)) {
    for (int r = 0; r < s.stages; ++r) {
      const auto& list = s.actions[static_cast<size_t>(r)];
      for (int i = 0; i < static_cast<int>(list.size()); ++i) add(r, i, list[static_cast<size_t>(i)], problems);
    }
  }

  // Where{} (absent) for a chunk or micro-batch out of range.
  Where at(Pass pass, int chunk, int mb) const {
    if (chunk < 0 || chunk >= chunks_ || mb < 0 || mb >= s_.microBatches) return Where{};
    return where_[slot(pass, chunk, mb)];
  }
  bool has(Pass pass, int chunk, int mb) const { return at(pass, chunk, mb).rank >= 0; }
  int owner(int chunk) const { return s_.chunkOwner[static_cast<size_t>(chunk)]; }
  int last() const { return chunks_ - 1; }

  // The compute (or offload) passes `a` needs done before it starts.
  std::vector<Where> dependencies(const Action& a) const {
    std::vector<Where> deps;
    const int c = a.chunk, m = a.microBatch;
    switch (a.kind) {
      case ActionKind::kForward:
        if (c > 0) deps.push_back(at(kF, c - 1, m));
        break;
      case ActionKind::kBackwardInput:
      case ActionKind::kBackward:
        deps.push_back(at(kF, c, m));
        if (c < last()) deps.push_back(at(kB, c + 1, m));
        if (has(kOffload, c, m)) deps.push_back(at(kReload, c, m));
        break;
      case ActionKind::kBackwardWeight: deps.push_back(at(kB, c, m)); break;
      case ActionKind::kOffload: deps.push_back(at(kF, c, m)); break;
      case ActionKind::kReload: deps.push_back(at(kOffload, c, m)); break;
      case ActionKind::kSendActivation: deps.push_back(at(kF, c, m)); break;
      case ActionKind::kSendGrad: deps.push_back(at(kB, c, m)); break;
      case ActionKind::kRecvActivation: deps.push_back(at(kSendAct, c - 1, m)); break;
      case ActionKind::kRecvGrad: deps.push_back(at(kSendGrad, c + 1, m)); break;
    }
    return deps;
  }

 private:
  size_t slot(Pass pass, int chunk, int mb) const {
    return static_cast<size_t>((pass * chunks_ + chunk) * s_.microBatches + mb);
  }

  void put(Pass pass, int r, int i, const Action& a, std::vector<std::string>& problems) {
    Where& w = where_[slot(pass, a.chunk, a.microBatch)];
    if (w.rank >= 0) {
      problems.push_back("rank " + std::to_string(r) + ": " + toString(a) + " appears twice (also rank " +
                         std::to_string(w.rank) + " position " + std::to_string(w.pos) + ")");
      return;
    }
    w = Where{r, i};
  }

  void add(int r, int i, const Action& a, std::vector<std::string>& problems) {
    const std::string at = "rank " + std::to_string(r) + " position " + std::to_string(i) + ": " + toString(a);
    if (a.chunk < 0 || a.chunk >= chunks_ || a.microBatch < 0 || a.microBatch >= s_.microBatches) {
      problems.push_back(at + ": chunk or micro-batch out of range");
      return;
    }
    if (owner(a.chunk) != r) {
      problems.push_back(at + ": chunk " + std::to_string(a.chunk) + " belongs to rank " +
                         std::to_string(owner(a.chunk)));
      return;
    }
    switch (a.kind) {
      case ActionKind::kForward: put(kF, r, i, a, problems); break;
      case ActionKind::kBackwardInput: put(kB, r, i, a, problems); break;
      case ActionKind::kBackwardWeight: put(kW, r, i, a, problems); break;
      case ActionKind::kBackward:
        put(kB, r, i, a, problems);
        put(kW, r, i, a, problems);
        break;
      case ActionKind::kOffload: put(kOffload, r, i, a, problems); break;
      case ActionKind::kReload: put(kReload, r, i, a, problems); break;
      case ActionKind::kSendActivation:
      case ActionKind::kRecvActivation:
      case ActionKind::kSendGrad:
      case ActionKind::kRecvGrad: addTransfer(r, i, a, at, problems); break;
    }
  }

  // A transfer must name the neighbour chunk's owner, on another rank.
  void addTransfer(int r, int i, const Action& a, const std::string& at, std::vector<std::string>& problems) {
    const bool toNext = a.kind == ActionKind::kSendActivation || a.kind == ActionKind::kRecvGrad;
    const int neighbour = toNext ? a.chunk + 1 : a.chunk - 1;
    if (neighbour < 0 || neighbour > last()) {
      problems.push_back(at + ": chunk " + std::to_string(a.chunk) + " has no neighbour on that side");
      return;
    }
    if (owner(neighbour) == r) {
      problems.push_back(at + ": chunk " + std::to_string(neighbour) + " is on this rank (a local hand-off, no transfer)");
      return;
    }
    if (a.peer != owner(neighbour)) {
      problems.push_back(at + ": peer should be rank " + std::to_string(owner(neighbour)) + ", the owner of chunk " +
                         std::to_string(neighbour));
      return;
    }
    const Pass pass = a.kind == ActionKind::kSendActivation ? kSendAct
                      : a.kind == ActionKind::kRecvActivation ? kRecvAct
                      : a.kind == ActionKind::kSendGrad       ? kSendGrad
                                                              : kRecvGrad;
    put(pass, r, i, a, problems);
  }

  const PipelineSchedule& s_;
  int chunks_;
  std::vector<Where> where_;
};

bool hasTransfers(const PipelineSchedule& s) {
  for (const auto& list : s.actions) {
    for (const Action& a : list) {
      if (!isComputeKind(a.kind) && a.kind != ActionKind::kOffload && a.kind != ActionKind::kReload) return true;
    }
  }
  return false;
}

// Every pass present once; with transfers, every edge between ranks carried
// by a send after its producer and a receive before its consumer.
void checkCompleteness(const PipelineSchedule& s, const PassIndex& index, std::vector<std::string>& problems) {
  const bool transfers = hasTransfers(s);
  const auto before = [](Where a, Where b) { return a.rank >= 0 && b.rank >= 0 && a.rank == b.rank && a.pos < b.pos; };
  for (int c = 0; c < s.chunks(); ++c) {
    for (int m = 0; m < s.microBatches; ++m) {
      const std::string what = "(c" + std::to_string(c) + ",m" + std::to_string(m) + ")";
      const std::string owner = " (owner rank " + std::to_string(index.owner(c)) + ")";
      for (Pass p : {kF, kB, kW}) {
        if (!index.has(p, c, m)) problems.push_back(std::string("missing ") + "FBW"[p] + what + owner);
      }
      if (index.has(kOffload, c, m) != index.has(kReload, c, m)) {
        problems.push_back("Offload" + what + " and Reload" + what + " must come in pairs" + owner);
      }
      if (!transfers) continue;
      if (c > 0 && index.owner(c - 1) != index.owner(c)) {
        const Where send = index.at(kSendAct, c - 1, m), recv = index.at(kRecvAct, c, m);
        if (send.rank < 0) problems.push_back("missing SendActivation(c" + std::to_string(c - 1) + ",m" + std::to_string(m) + ") on rank " + std::to_string(index.owner(c - 1)));
        if (recv.rank < 0) problems.push_back("missing RecvActivation" + what + " on rank " + std::to_string(index.owner(c)));
        if (send.rank >= 0 && !before(index.at(kF, c - 1, m), send)) problems.push_back("SendActivation(c" + std::to_string(c - 1) + ",m" + std::to_string(m) + ") is not after its F on rank " + std::to_string(send.rank));
        if (recv.rank >= 0 && !before(recv, index.at(kF, c, m))) problems.push_back("RecvActivation" + what + " is not before F" + what + " on rank " + std::to_string(recv.rank));
      }
      if (c < index.last() && index.owner(c + 1) != index.owner(c)) {
        const Where send = index.at(kSendGrad, c + 1, m), recv = index.at(kRecvGrad, c, m);
        if (send.rank < 0) problems.push_back("missing SendGrad(c" + std::to_string(c + 1) + ",m" + std::to_string(m) + ") on rank " + std::to_string(index.owner(c + 1)));
        if (recv.rank < 0) problems.push_back("missing RecvGrad" + what + " on rank " + std::to_string(index.owner(c)));
        if (send.rank >= 0 && !before(index.at(kB, c + 1, m), send)) problems.push_back("SendGrad(c" + std::to_string(c + 1) + ",m" + std::to_string(m) + ") is not after its B on rank " + std::to_string(send.rank));
        if (recv.rank >= 0 && !before(recv, index.at(kB, c, m))) problems.push_back("RecvGrad" + what + " is not before B" + what + " on rank " + std::to_string(recv.rank));
      }
    }
  }
}

// On one rank, a dependency listed after its dependant can never run first.
void checkLocalOrder(const PipelineSchedule& s, const PassIndex& index, std::vector<std::string>& problems) {
  for (int r = 0; r < s.stages; ++r) {
    const auto& list = s.actions[static_cast<size_t>(r)];
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[static_cast<size_t>(i)];
      if (!isComputeKind(a.kind)) continue;
      for (const Where& d : index.dependencies(a)) {
        if (d.rank == r && d.pos > i) {
          problems.push_back("rank " + std::to_string(r) + ": " + toString(a) + " at position " + std::to_string(i) +
                             " comes before " + toString(list[static_cast<size_t>(d.pos)]) + " (position " +
                             std::to_string(d.pos) + ") it depends on");
        }
      }
    }
  }
}

struct Execution {
  std::vector<std::vector<double>> start, end;  // per rank, per position
  std::vector<int> reached;                     // per rank: actions run
  std::vector<std::string> stuck;               // "rank r waits at X" when some could not run
};

// Runs every rank's list in order; an action runs once its dependencies ran.
// Times: compute from max(rank free, dependency end (+ comm across ranks));
// a receive from reaching it until its send + comm; the rest take no time.
Execution execute(const PipelineSchedule& s, const PassIndex& index, const PipelineCosts& costs) {
  Execution ex;
  const size_t p = static_cast<size_t>(s.stages);
  ex.start.resize(p);
  ex.end.resize(p);
  ex.reached.assign(p, 0);
  for (size_t r = 0; r < p; ++r) {
    ex.start[r].assign(s.actions[r].size(), 0);
    ex.end[r].assign(s.actions[r].size(), 0);
  }
  std::vector<double> free(p, 0);
  const auto ran = [&](Where w) { return w.rank >= 0 && ex.reached[static_cast<size_t>(w.rank)] > w.pos; };
  for (bool progress = true; progress;) {
    progress = false;
    for (size_t r = 0; r < p; ++r) {
      const auto& list = s.actions[r];
      while (ex.reached[r] < static_cast<int>(list.size())) {
        const size_t i = static_cast<size_t>(ex.reached[r]);
        const Action& a = list[i];
        const auto deps = index.dependencies(a);
        if (!std::all_of(deps.begin(), deps.end(), ran)) break;
        double ready = free[r];
        for (const Where& d : deps) {
          const double hop = d.rank != static_cast<int>(r) ? costs.comm : 0;
          ready = std::max(ready, ex.end[static_cast<size_t>(d.rank)][static_cast<size_t>(d.pos)] + hop);
        }
        const bool recv = a.kind == ActionKind::kRecvActivation || a.kind == ActionKind::kRecvGrad;
        ex.start[r][i] = recv ? free[r] : ready;
        ex.end[r][i] = ready + detail::passCost(costs, a.kind, s.chunksPerRank);
        free[r] = ex.end[r][i];
        ++ex.reached[r];
        progress = true;
      }
    }
  }
  for (size_t r = 0; r < p; ++r) {
    if (ex.reached[r] < static_cast<int>(s.actions[r].size())) {
      ex.stuck.push_back("rank " + std::to_string(r) + " waits forever at " +
                         toString(s.actions[r][static_cast<size_t>(ex.reached[r])]) + " (position " +
                         std::to_string(ex.reached[r]) + ")");
    }
  }
  return ex;
}

// Running sum per rank in list order (a rank runs its list in order).
std::vector<double> peakMemory(const PipelineSchedule& s, const PipelineCosts& costs, std::vector<std::string>* problems) {
  std::vector<double> peak(static_cast<size_t>(s.stages), 0);
  for (int r = 0; r < s.stages; ++r) {
    double sum = 0;
    bool reported = false;
    for (const Action& a : s.actions[static_cast<size_t>(r)]) {
      sum += detail::passMemory(costs, a.kind, s.chunksPerRank);
      peak[static_cast<size_t>(r)] = std::max(peak[static_cast<size_t>(r)], sum);
      if (problems != nullptr && costs.memLimit > 0 && sum > costs.memLimit + 1e-9 && !reported) {
        std::ostringstream msg;
        msg << "rank " << r << ": memory " << sum << " after " << toString(a) << " exceeds the limit " << costs.memLimit;
        problems->push_back(msg.str());
        reported = true;  // once per rank: the first overrun names the culprit
      }
    }
  }
  return peak;
}

// Shape problems that make the rest meaningless.
bool checkShape(const PipelineSchedule& s, std::vector<std::string>& problems) {
  if (s.stages < 1 || s.microBatches < 1 || s.chunksPerRank < 1) {
    problems.push_back("stages, microBatches and chunksPerRank must be >= 1");
    return false;
  }
  if (s.chunks() != s.stages * s.chunksPerRank) {
    problems.push_back("chunkOwner has " + std::to_string(s.chunks()) + " entries, expected stages * chunksPerRank = " +
                       std::to_string(s.stages * s.chunksPerRank));
    return false;
  }
  if (static_cast<int>(s.actions.size()) != s.stages) {
    problems.push_back("actions has " + std::to_string(s.actions.size()) + " rank lists, expected " +
                       std::to_string(s.stages));
    return false;
  }
  for (int r = 0; r < s.stages; ++r) {
    const int held = static_cast<int>(s.chunksOf(r).size());
    if (held != s.chunksPerRank) {
      problems.push_back("rank " + std::to_string(r) + " holds " + std::to_string(held) + " chunks, expected " +
                         std::to_string(s.chunksPerRank));
    }
  }
  for (int owner : s.chunkOwner) {
    if (owner < 0 || owner >= s.stages) {
      problems.push_back("chunkOwner names rank " + std::to_string(owner) + " outside [0, " + std::to_string(s.stages) + ")");
      return false;
    }
  }
  return problems.empty();
}

}  // namespace

std::vector<std::string> validateSchedule(const PipelineSchedule& s, const PipelineCosts& costs) {
  std::vector<std::string> problems;
  if (!checkShape(s, problems)) return problems;
  const PassIndex index(s, problems);
  checkCompleteness(s, index, problems);
  checkLocalOrder(s, index, problems);
  const Execution ex = execute(s, index, costs);
  for (const auto& line : ex.stuck) problems.push_back("deadlock: " + line);
  peakMemory(s, costs, &problems);
  return problems;
}

Simulation simulate(const PipelineSchedule& s, const PipelineCosts& costs) {
  std::vector<std::string> problems;
  TESSERA_CHECK_ARG(checkShape(s, problems), "cannot simulate pipeline schedule '" << s.name << "': " << problems[0]);
  const PassIndex index(s, problems);
  const Execution ex = execute(s, index, costs);
  if (!ex.stuck.empty()) {
    std::string all;
    for (const auto& line : ex.stuck) all += (all.empty() ? "" : "; ") + line;
    throw InvalidArgument("pipeline schedule '" + s.name + "' cannot run to the end: " + all +
                          " (run validateSchedule for every problem)");
  }
  Simulation sim;
  for (int r = 0; r < s.stages; ++r) {
    double first = std::numeric_limits<double>::infinity(), lastEnd = 0;
    const auto& list = s.actions[static_cast<size_t>(r)];
    for (size_t i = 0; i < list.size(); ++i) {
      const double start = ex.start[static_cast<size_t>(r)][i], end = ex.end[static_cast<size_t>(r)][i];
      sim.timeline.push_back(SimulatedAction{r, list[i], start, end});
      if (!isComputeKind(list[i].kind)) continue;
      first = std::min(first, start);
      lastEnd = std::max(lastEnd, end);
    }
    if (lastEnd > 0) sim.makespan = std::max(sim.makespan, lastEnd - first);
  }
  const double work = s.microBatches * (costs.f + costs.b + costs.w);
  sim.bubbleRate = sim.makespan > 0 ? 1.0 - work / sim.makespan : 0.0;
  sim.peakMemory = peakMemory(s, costs, nullptr);
  return sim;
}

}  // namespace tessera::parallel::pipeline
