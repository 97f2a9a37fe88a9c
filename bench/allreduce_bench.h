// The all-reduce benchmark: tessera's Communicator::allReduce against the
// backend's own all-reduce (Gloo's ring allreduce, MPI_Allreduce) on the same
// buffer and connections, interleaved iteration by iteration so that drift in
// machine load hits both alike.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/launcher/init.h"

namespace tessera::bench {

struct AllreduceBenchConfig {
  std::vector<int64_t> bytes = {1 << 20, 16 << 20, 64 << 20};  // buffer sizes (float32)
  int iterations = 10;   // timed iterations per implementation and size
  int warmup = 2;        // untimed iterations first
  void validate() const;
};

// Collective over ctx.world. Rank 0 prints one JSON object per size:
// {"bench": "allreduce", "backend", "ranks", "bytes", "tessera_median_s",
//  "tessera_algbw_gbps", "tessera_busbw_gbps", "raw_...", "ratio_vs_raw"}.
void runAllreduceBench(DistributedContext& ctx, const AllreduceBenchConfig& config);

}  // namespace tessera::bench
