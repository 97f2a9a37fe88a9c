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
#pragma once

#include <string>

#include "launcher/train_config.h"

namespace tessera::launcher {

// The exit code for the process: 0 done (or left on SIGTERM), 1 a runtime
// error, 2 a bad config, parallel::kExitEvicted when the node was dropped
// and must rejoin (tessera-run restarts it).
int runElasticNode(const TrainJobConfig& job, const std::string& metricsPath, const std::string& faultPlan);

}  // namespace tessera::launcher
