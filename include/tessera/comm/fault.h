// In-process fault injection: what goes wrong, where and when, as data
// (a FaultPlan), so an experiment is reproducible and a test can ask for
// exactly the failure it checks.
//
// Plan text (TOML `[faults] plan = "..."`, env TESSERA_FAULT_PLAN, or
// `tessera-train --fault ...`): faults separated by ';', each
// "kind:key=value,key=value":
//   kill:rank=R,step=S            rank R raises SIGKILL on itself before step S
//   slow:rank=R,factor=F          rank R's steps take F times as long (F >= 1; it sleeps (F-1) x its step time)
//   delay:fraction=P,ms=M[,comm=NAME][,rank=R]
//                                 each message (collective or send) of matching
//                                 communicators waits M ms first with probability P
//   drop:fraction=P[,comm=NAME][,rank=R]
//                                 each matching operation is dropped with
//                                 probability P: it fails with CommError
//                                 ("dropped by the fault plan") as a lost
//                                 message would after its retries
//   kill:rank=R,collective=N[,comm=NAME]
//                                 rank R raises SIGKILL on itself as its N-th
//                                 collective on a matching communicator starts
//                                 (e.g. inside an outer all-reduce: its peers
//                                 are already waiting on it)
//   fail:collective=N[,comm=NAME][,rank=R]
//                                 the N-th collective (1-based, counted per
//                                 communicator) of matching communicators fails
//                                 with CommError
//   seed=X                        random seed for the fractions (default 1)
// rank: the global rank the fault applies to (omitted: every rank). comm: a
// substring of the communicator's name() ("elastic" matches "elastic/e3/l0").
// Unknown kinds or keys, missing keys and out-of-range values are
// InvalidArgument naming the fault and the accepted form.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"

namespace tessera::comm {

struct FaultPlan {
  static constexpr int kAnyRank = -1;

  struct Kill {
    int rank = 0;
    int64_t step = 0;
  };
  struct Slow {
    int rank = kAnyRank;
    double factor = 1.0;
  };
  struct MessageFault {       // delay or drop
    double fraction = 0.0;    // probability per operation, in [0, 1]
    std::chrono::milliseconds delay{0};  // delay only
    std::string comm;         // substring of the communicator name; "" = all
    int rank = kAnyRank;
  };
  struct FailCollective {
    int64_t n = 1;            // 1-based
    std::string comm;
    int rank = kAnyRank;
    bool kill = false;        // kill:...,collective=N: SIGKILL instead of a CommError
  };

  std::vector<Kill> kills;
  std::vector<Slow> slow;
  std::vector<MessageFault> delays;
  std::vector<MessageFault> drops;
  std::vector<FailCollective> failures;
  uint64_t seed = 1;

  bool empty() const;
  // The plan as text that parse() reads back.
  std::string describe() const;
  // See the header comment. Throws InvalidArgument.
  static FaultPlan parse(const std::string& text);
  // parse(TESSERA_FAULT_PLAN), or an empty plan when unset.
  static FaultPlan fromEnv();
};

// Wraps `inner` so that the plan's delay/drop/fail faults for `rank` apply to
// its operations; returns `inner` itself when none match it. The wrapper
// forwards everything else (split() children are wrapped too; stats count
// the inner traffic).
// Details: "messages" are collectives and sends (a recv is never faulted). A
// delay sleeps on the calling thread before the operation is issued. A
// dropped or failed operation never reaches `inner`; its Work's wait() throws
// CommError. A dropped or failed collective breaks the wrapper, as a real
// failure breaks a backend (every later call throws CommError at once); the
// peers wait for it until their timeout. A dropped send breaks nothing. Each
// wrapper draws from its own stream, seeded by plan.seed, rank and name().
CommPtr injectFaults(CommPtr inner, const FaultPlan& plan, int rank);

// The step-level faults (kill, slow) for one rank, driven by the training
// loop: call beforeStep(step) before each optimizer step (step = steps
// completed so far) and afterStep(seconds) with the step's wall time.
class StepFaults {
 public:
  StepFaults(FaultPlan plan, int rank);
  // Raises SIGKILL on this process when the plan kills this rank at `step`
  // (logged first, flushed).
  void beforeStep(int64_t step);
  // Sleeps (factor - 1) x stepSeconds when this rank is slowed.
  void afterStep(double stepSeconds);
  bool active() const;

 private:
  FaultPlan plan_;
  int rank_;
};

}  // namespace tessera::comm
