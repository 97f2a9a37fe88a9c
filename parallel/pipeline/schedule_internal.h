// Private to parallel/pipeline/schedule*.cc: the generators makeSchedule
// dispatches to, and the per-chunk-pass cost and memory every part uses.
#pragma once

#include <string>
#include <vector>

#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::parallel::pipeline::detail {

// An empty schedule (no actions) with chunk c on owner(c), p*v chunks.
PipelineSchedule emptySchedule(const std::string& name, int stages, int microBatches, int chunksPerRank,
                               std::vector<int> chunkOwner);
// Rank r holds r, r+p, ... (1f1b, interleaved, zb_h1/h2, auto).
std::vector<int> roundRobinOwners(int stages, int chunksPerRank);
// ZB-V: rank r holds r and 2p-1-r.
std::vector<int> vShapeOwners(int stages);

inline Action compute(ActionKind kind, int chunk, int microBatch) { return Action{kind, microBatch, chunk, -1}; }

// Time and memory of one chunk pass (costs are of a whole stage, see schedule.h).
double passCost(const PipelineCosts& costs, ActionKind kind, int chunksPerRank);
double passMemory(const PipelineCosts& costs, ActionKind kind, int chunksPerRank);

// schedule_zero_bubble.cc
PipelineSchedule zbH1(int stages, int microBatches);
PipelineSchedule zbH2(int stages, int microBatches, const PipelineCosts& costs);
// schedule_zb_v.cc
PipelineSchedule zbV(int stages, int microBatches, const PipelineCosts& costs);
// schedule_auto.cc
PipelineSchedule autoSchedule(int stages, int microBatches, const PipelineCosts& costs);

}  // namespace tessera::parallel::pipeline::detail
