// Pipeline schedules as data: per rank, an ordered list of actions (F, B, W,
// fused BW, send/recv, offload/reload), the generators that build them, a
// validator and a simulator that times them from per-pass costs.
//
// A schedule is plain data so that one executor (executor.h) runs every
// schedule, the validator can check any list (generated or hand-written), and
// the simulator can predict what a run should cost. Nothing here touches
// tensors or communicators.
//
// Vocabulary (see also executor.h): p = stages (ranks of the pp axis),
// M = micro-batches per pipeline step, v = chunks per rank, chunk c in
// [0, p*v) = a contiguous run of the model; chunk 0 takes the tokens, chunk
// p*v-1 computes the loss. F = forward of (chunk, micro-batch), B = its
// input-gradient backward, W = its weight-gradient pass, BW = B and W fused.
//
// Dependencies (Zero Bubble, arXiv 2401.10241 §2): F(c,m) after F(c-1,m);
// B(c,m) after B(c+1,m), or after F(c,m) on the last chunk; W(c,m) after
// B(c,m); a fused BW counts as both.
//
// Costs and memory (PipelineCosts) are those of a whole STAGE, i.e. of all v
// chunks of one rank for one micro-batch: with v chunks per rank each chunk
// pass costs f/v, b/v, w/v and adds memF/v, memB/v, memW/v. That keeps the
// bubble definition 1 - M(f+b+w)/makespan the same for every v. The transfer
// cost `comm` is per message, not divided.
//
// The generators (makeSchedule):
//   gpipe             all F, then all fused BW (ascending micro-batches). Any M >= 1.
//   1f1b              PipeDream-flush / Megatron 1F1B with fused BW: rank r warms up
//                     with min(p-1-r, M) F, then alternates F and BW. Any M >= 1.
//   interleaved_1f1b  Megatron's interleaved 1F1B, v >= 2 chunks per rank (rank r
//                     holds chunks r, r+p, ...), micro-batches in groups of p:
//                     needs M % p == 0, as Megatron.
//   zb_h1             Zero Bubble ZB-H1: 1F1B's warm-up, B and W split, rank r
//                     defers up to r W passes (filled into its cool-down idle
//                     time), so every rank holds at most p micro-batches (1F1B's
//                     peak). Any M >= 1.
//   zb_h2             Zero Bubble ZB-H2: up to 2p-1 micro-batches in flight per
//                     rank; extra warm-up F fill the wait for the first B, and
//                     W passes fill every later wait (the tail turns into the
//                     paper's parallelogram). Built by a timed list scheduler
//                     from the costs (B first, then F within the memory bound,
//                     then W). Any M >= 1.
//   zb_v              Zero Bubble ZB-V: 2 chunks per rank in a V (rank r holds r and
//                     2p-1-r; the turn at rank p-1 is a local hand-off), at most
//                     p memF per rank (2p chunk passes). Built in rounds of one B
//                     and one F per rank after a warm-up, W filling the waits, as
//                     the paper's handcrafted V (schedule_zb_v.cc). Any M >= 1.
//   auto              Zero Bubble's automatic heuristic (§3.2 of the paper; the
//                     sail-sg repo's auto_schedule.py): from f, b, w, comm and
//                     the per-pass memory, warm up with as many F as fit before
//                     the first B returns, alternate F and B, fill waits with W,
//                     force W at the memory limit; 8 flag combinations, the
//                     shortest simulated makespan kept. One chunk per rank.
//                     Memory limit: costs.memLimit, or when 0 the peak memory
//                     of 1f1b with the same p, M and memory costs (the paper's
//                     ZB-1p setting).
#pragma once

#include <string>
#include <vector>

namespace tessera::parallel::pipeline {

enum class ActionKind {
  kForward,
  kBackwardInput,   // B: input gradient only; the weight-gradient GEMMs are deferred
  kBackwardWeight,  // W: the deferred weight gradients of one (chunk, micro-batch)
  kBackward,        // fused BW
  kSendActivation,
  kRecvActivation,
  kSendGrad,
  kRecvGrad,
  kOffload,         // saved activations of (chunk, m) to host memory (after its F)
  kReload,          // back to the device (before its B)
};

// "F", "B", "W", "BW", "SendActivation", ...
const char* toString(ActionKind kind);
// F, B, W or BW (named apart from the executor's own helper).
bool isComputeKind(ActionKind kind);

struct Action {
  ActionKind kind = ActionKind::kForward;
  int microBatch = 0;  // in [0, M)
  // Global chunk index in [0, p*v). Compute: the chunk computed. Send/recv: the
  // chunk on THIS rank whose output is sent or which consumes the received tensor:
  //   SendActivation(c): F output of c, to the owner of c+1
  //   RecvActivation(c): input of c, from the owner of c-1
  //   SendGrad(c):       input gradient of c, to the owner of c-1
  //   RecvGrad(c):       output gradient of c, from the owner of c+1
  int chunk = 0;
  int peer = -1;  // send/recv: the pp rank on the other side; -1 otherwise
};

// "F(c1,m3)", "SendGrad(c2,m0)->1".
std::string toString(const Action& action);

struct PipelineSchedule {
  std::string name;             // "1f1b", ...
  int stages = 0;               // p
  int microBatches = 0;         // M
  int chunksPerRank = 1;        // v
  std::vector<int> chunkOwner;  // size p*v: chunk -> rank
  std::vector<std::vector<Action>> actions;  // per rank, in execution order

  int chunks() const { return static_cast<int>(chunkOwner.size()); }
  std::vector<int> chunksOf(int rank) const;  // ascending
};

// Per-pass costs and memory of a whole stage (see the header comment).
struct PipelineCosts {
  double f = 1, b = 1, w = 1;  // time of F, B, W of one micro-batch through a stage
  double comm = 0;             // time of one point-to-point transfer between ranks
  // Activation memory, in any unit: F adds memF, B adds memB, W adds memW, a
  // fused BW adds memB + memW. The defaults model "F saves one unit, W frees
  // it" (B keeps what W needs), so a rank's running sum is its micro-batches
  // in flight.
  double memF = 1, memB = 0, memW = -1;
  double memLimit = 0;  // bound on the running sum of every rank; 0: none
};

// Builds schedule `name` (compute actions only; see withCommunication).
// `virtualStages` is v for interleaved_1f1b (ignored by the others: zb_v has
// v = 2, the rest v = 1). `costs` shape zb_h2, zb_v and auto. Throws
// ConfigError naming the key: "pipeline.schedule" (unknown name, with the
// valid ones; or auto cannot fit costs.memLimit), "pipeline.microbatches"
// (M < 1, or M % p != 0 for interleaved_1f1b), "pipeline.virtual_stages"
// (v < 2 for interleaved_1f1b), "parallel.pp" (p < 1).
PipelineSchedule makeSchedule(const std::string& name, int stages, int microBatches, int virtualStages,
                              const PipelineCosts& costs);
// gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zb_v, auto.
const std::vector<std::string>& scheduleNames();

// Inserts the send/recv actions (any already there are dropped first): a
// receive right before the compute action that consumes it, a send right
// after the one that produces it, and none between two chunks of one rank
// (ZB-V's turn at rank p-1 is a local hand-off).
PipelineSchedule withCommunication(PipelineSchedule computeOnly);

// Every problem found, each naming the rank and the action; empty = valid.
// Checks: chunkOwner and the rank lists are well formed; every compute pass
// appears exactly once per (chunk, micro-batch), on the chunk's owner; on one
// rank, a pass never comes before one it depends on; when the schedule has any
// send/recv, every transfer between ranks has its send after the producer and
// its receive before the consumer, paired on the peer (same micro-batch,
// matching chunk) and nothing unpaired; the schedule cannot deadlock with
// asynchronous sends and receives that block at the consuming action
// (checked by executing it topologically); and when costs.memLimit > 0 no
// rank's running memory sum exceeds it.
std::vector<std::string> validateSchedule(const PipelineSchedule& schedule, const PipelineCosts& costs);

struct SimulatedAction {
  int rank = 0;
  Action action;
  double start = 0, end = 0;  // send: start == end; recv: from reaching it to the arrival
};

struct Simulation {
  // The longest rank's time from the start of its first compute action to the
  // end of its last (waits in leading receives do not count).
  double makespan = 0;
  double bubbleRate = 0;            // 1 - M (f + b + w) / makespan
  std::vector<double> peakMemory;   // per rank: max of the running sum (from 0)
  std::vector<SimulatedAction> timeline;  // every action, per rank in list order
};

// Times the schedule: each rank runs its list in order; a compute action
// starts when the rank is free and its dependencies are done (+ comm when on
// another rank); a receive waits for its send + comm; sends and
// offload/reload take no time. Throws InvalidArgument naming the stuck
// actions when the schedule deadlocks or misses a pass.
Simulation simulate(const PipelineSchedule& schedule, const PipelineCosts& costs);

}  // namespace tessera::parallel::pipeline
