// One node of an elastic tessera-train run (tessera-run --nnodes MIN:MAX sets
// TESSERA_ELASTIC=1): the ElasticMesh (parallel/elastic.h) + DiLoCo across
// nodes + live recovery (checkpoint/live_recovery.h) + fault plans
// (comm/fault.h), around the same TrainJob and Trainer a fixed-size run uses.
//
// Founders start training at once; a joiner is admitted at the next outer
// step, receives the whole training state from the source the leader chose
// (verified per tensor), restores it and trains on. After every committed
// outer step the sources serve their joiners from a snapshot, in the
// background. Rank 0 of the node appends the metrics and event lines.
//
// Checkpoints (ElasticCheckpoints): at outer-step boundaries, after the
// commit, the committed decision's leader node (members.front()) saves one
// replica's whole state -- what live recovery sends a joiner: theta_g and the
// outer momentum, its inner optimizer state, step, sampler, RNG -- through
// checkpoint::Checkpointer (asynchronous, checksummed, atomic rename), all of
// its processes writing their parts collectively over the node's local group.
// Due: at outer step k (after inner step s = k*H) when s crosses a multiple of
// `every` (floor(s / every) > floor((s - H) / every)), and at the last outer
// step of the run: "every N steps", rounded up to the next outer step. The
// directory must be shared storage that every node's hosts can read and write.
// A node that finds a newer generation of the job (it was taken for dead)
// writes nothing and rejoins (kExitEvicted).
// Founders of the job -- of its first generation, or of one re-founded after
// every node died (parallel/elastic.h) -- load the latest checkpoint in `dir`
// (else `resume`, else they start from the config's seed) the way a joiner
// loads its peer's state, so the outer steps continue from the checkpoint's:
// at most the outer steps since it are redone, none applied twice. The
// founders' leader picks the checkpoint and publishes its choice in the store
// ("elastic/resume"), so every founder loads the same one.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "launcher/train_config.h"

namespace tessera::launcher {

// tessera-train's --checkpoint-* and --resume in an elastic run (see above).
struct ElasticCheckpoints {
  std::string dir;       // the job's checkpoint root, on shared storage; "" : no checkpoints
  int64_t every = 0;     // steps between saves, rounded up to outer steps; 0: the last outer step only
  int keep = 3;          // complete checkpoints kept
  int level = 3;         // zstd level; 0: uncompressed
  std::string resume;    // founders start from this checkpoint when `dir` holds none
  std::map<std::string, std::string> meta;  // added to every checkpoint's meta (the config as given)
};

// The exit code for the process: 0 done (or left on SIGTERM), 1 a runtime
// error, 2 a bad config, parallel::kExitEvicted when the node was dropped
// and must rejoin (tessera-run restarts it).
int runElasticNode(const TrainJobConfig& job, const std::string& metricsPath, const std::string& faultPlan,
                   const ElasticCheckpoints& checkpoints = {});

}  // namespace tessera::launcher
