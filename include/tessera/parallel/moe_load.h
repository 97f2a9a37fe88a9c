// The MoE routing counters of a whole job, for the metrics line: the fraction
// of token choices dropped over capacity and each expert's load (tokens
// routed / capacity), per MoE layer and summed over every rank.
//
// Each MoeFeedForwardImpl counts its own training forwards
// (MoeFeedForwardImpl::takeLoad: eval forwards count nothing). Ranks see
// different parts of that: pipeline stages hold different blocks, ep (and
// dp) ranks route different tokens, tp ranks route the SAME tokens. A
// collector sums every layer's counters over a communicator spanning all of
// them -- the world -- in one all-reduce. Duplicates (tp ranks; FSDP's
// recomputation routing a forward twice) scale a layer's choices, drops,
// routed counts and capacity alike, so the ratios reported are those of the
// distinct tokens.
//
// What it reports: a layer's dropped fraction is dropped / choices (choices =
// tokens x top_k); expert e's load is routed[e] / C, C summed over the
// forwards counted (1.0: the expert was asked for exactly its capacity on
// average; above 1 its surplus was dropped); the overall dropped fraction
// sums drops and choices over the layers.
//
// Not here: the counting itself (core/models/moe.h), where the metrics line
// is written (train/trainer.h: TrainerParts::extraMetrics).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/metrics.h"
#include "tessera/core/models/moe.h"

namespace torch::nn {
class Module;
}

namespace tessera::parallel {

// One MoE layer's counters, summed over the collector's ranks.
struct MoeLayerLoad {
  int64_t block = 0;         // the block's GLOBAL index ("blocks.<block>.moe")
  models::MoeLoad counts;    // summed counters; counts.routed has one entry per global expert
  double droppedFraction() const { return counts.droppedFraction(); }
  std::vector<double> load() const { return counts.load(); }
};

// What one collect() saw: every MoE layer some rank holds.
struct MoeLoadReport {
  std::vector<MoeLayerLoad> layers;  // ascending block index
  // Dropped choices over all choices, every layer together (0 when nothing was counted).
  double droppedFraction() const;
  // The metrics line's "moe" object:
  //   {"dropped": 0.0312, "layers": {"<block>": {"dropped": 0.0417,
  //                                              "load": {"<expert>": 1.021, ...}}, ...}}
  // Layers and experts keyed by their global indices (the parameter names'
  // <i> and <e>); fractions rounded to 4 decimals, loads to 3.
  MetricsRecord toMetrics() const;
};

class MoeLoadCollector {
 public:
  // Finds every MoeFeedForwardImpl in `module` (named_modules(); a module
  // whose name has no "blocks.<i>." component is an InvalidArgument) and
  // discards their counts so far. numLayers and numExperts are the WHOLE
  // model's (GptConfig::n_layer, moe.num_experts), the same on every rank of
  // `comm`: they size the all-reduce, which must match on every rank although
  // ranks hold different blocks (a rank with no MoE layer is fine).
  // InvalidArgument for a block index outside [0, numLayers), a layer with
  // another expert count, or a null comm. Keeps the layers alive (shared
  // ownership); local.
  MoeLoadCollector(torch::nn::Module& module, int64_t numLayers, int64_t numExperts, comm::CommPtr comm);

  // Collective over comm (one all-reduce of numLayers x (numExperts + 4)
  // int64): every held layer's takeLoad() -- the counts since the previous
  // collect(), or since construction -- summed over the ranks. Layers no rank
  // holds are left out. The same report on every rank.
  MoeLoadReport collect();

  // A TrainerParts::extraMetrics hook: collect(), then the line gets
  // "moe": report.toMetrics() (nothing when no rank holds an MoE layer).
  // Collective as collect(); the collector must outlive the hook.
  std::function<void(MetricsRecord&)> metricsHook();

  // The global block indices this rank holds an MoE layer of, ascending.
  std::vector<int64_t> heldBlocks() const;

 private:
  struct Layer {
    int64_t block = 0;
    std::shared_ptr<models::MoeFeedForwardImpl> moe;
  };
  std::vector<Layer> layers_;  // ascending block
  int64_t numLayers_ = 0;
  int64_t numExperts_ = 0;
  comm::CommPtr comm_;
};

}  // namespace tessera::parallel
