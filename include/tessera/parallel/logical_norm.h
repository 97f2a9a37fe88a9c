// The gradient norm over logical parameters, each counted exactly once,
// whatever mix of data, tensor and expert parallelism holds it
// (DataParallel::gradNorm's contract; used for clipping).
//
// Every range of every optimizer tensor (DataParallel::parameterLayout; FSDP's
// padding is in no range) falls in one of four categories: dense or expert
// parameter (isExpertParameter: the name contains ".moe.experts."), and
// split over tp or not (`tpSharded`, from tensorParallelParameters). This
// rank's sums of squares per category are then summed over exactly the ranks
// holding different pieces of the same kind, never over replicas:
//
//   dense, expert     over the strategy's shard group of that kind (FSDP:
//                     the dense units' dp_shard (x ep) group, the expert
//                     units' dp_shard group; none/DDP hold whole tensors:
//                     no reduction),
//   expert            then over ep (each ep rank holds other experts),
//   tp-split kinds    then over tp (replicated ones -- LayerNorm, the
//                     biases of row-parallel layers, wpe, the router --
//                     have the same gradient on every tp rank).
//
// So for both FSDP under expert parallelism (dense shards over
// dp_shard x ep, expert shards over dp_shard) and none/DDP (whole dense
// parameters; whole experts that differ over ep) every logical element is
// counted once, and the norm is the same on every rank. Ranks that differ
// only along dp_replicate hold replicas: they compute the same value and are
// never summed over.
#pragma once

#include <memory>
#include <set>
#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::parallel {

// The strategy `inner` (built on the tensor- and expert-parallel model) with
// gradNorm() over logical parameters (file comment); everything else is
// `inner`'s. The layout is classified once, here.
//   tpSharded:       parameter names split over tp (tensorParallelParameters).
//   tpComm:          the tp group; null or one rank: no tensor parallelism.
//   epComm:          the ep group (ranks holding different experts); null or
//                    one rank: no expert parallelism.
//   denseShardComm:  the group over which `inner` holds distinct shards of
//                    the dense parameters (FSDP's shard comm, dp_shard x ep
//                    under expert parallelism); null when it holds them whole
//                    (none, DDP).
//   expertShardComm: the same for expert parameters (FSDP's expert units:
//                    dp_shard); null: the experts are held as the dense
//                    parameters are (in the dense units: no expert
//                    parallelism). Must not be null when denseShardComm spans
//                    several ranks and epComm does too (expert shards would
//                    be counted once per ep rank): InvalidArgument.
// gradNorm() is collective over every non-trivial comm above, in a fixed
// order (shard groups, ep, tp); every rank of the job calls it. Throws
// InvalidArgument for a null `inner` or the combination above.
std::unique_ptr<DataParallel> withLogicalNorm(std::unique_ptr<DataParallel> inner, std::set<std::string> tpSharded,
                                              comm::CommPtr tpComm, comm::CommPtr epComm,
                                              comm::CommPtr denseShardComm, comm::CommPtr expertShardComm);

}  // namespace tessera::parallel
