// The all-reduce benchmark: tessera's Communicator::allReduce against the
// backend's own all-reduce (Gloo's ring allreduce, MPI_Allreduce) on the same
// buffer and connections, interleaved iteration by iteration so that drift in
// machine load hits both alike.
//
// With --compression int8 (or fp8) it compares instead the int8 (or FP8 E4M3,
// tessera/comm/fp8_allreduce.h) ring all-reduce (tessera/comm/compression.h)
// with the float32 comm.allReduce, side by side.
// With --link RATE (e.g. 100mbit; needs root) the bench runs its two ranks in
// two network namespaces joined by a rate-limited veth pair
// (scripts/netns-link.sh), which it creates and always removes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/compression.h"
#include "tessera/launcher/init.h"

namespace tessera::bench {

struct AllreduceBenchConfig {
  std::vector<int64_t> bytes = {1 << 20, 16 << 20, 64 << 20};  // buffer sizes (float32)
  int iterations = 10;   // timed iterations per implementation and size
  int warmup = 2;        // untimed iterations first
  // kNone: tessera vs the raw backend (the JSON below). kInt8 / kFp8: that vs fp32.
  comm::Compression compression = comm::Compression::kNone;
  // "" (not given), "loopback", or a tc rate ("100mbit", "1gbit"): printed in
  // the JSON; a rate means the ranks run across a simulated link.
  std::string link;
  void validate() const;
};

// Collective over ctx.world. Rank 0 prints one JSON object per size:
// {"bench": "allreduce", "backend", "ranks", "bytes", "tessera_median_s",
//  "tessera_algbw_gbps", "tessera_busbw_gbps", "raw_...", "ratio_vs_raw"};
// with compression int8:
// {"bench": "allreduce", "compression": "int8", "link", "backend", "ranks",
//  "bytes", "int8_median_s", "int8_algbw_gbps", "int8_sent_bytes_per_rank",
//  "fp32_median_s", "fp32_algbw_gbps", "fp32_sent_bytes_per_rank",
//  "speedup_vs_fp32" (fp32 time / int8 time = effective bandwidth ratio),
//  "int8_rel_rms_error" (vs the fp32 result of the same inputs)};
// with compression fp8 the same fields with "fp8_" for "int8_".
void runAllreduceBench(DistributedContext& ctx, const AllreduceBenchConfig& config);

// Whether `link` is a rate, i.e. the bench must build a simulated link.
bool linkIsRate(const std::string& link);

// Runs this program (argv) as 2 ranks across a simulated link of `rate`:
// creates the namespaces with scripts/netns-link.sh, starts rank 0 and rank 1
// in them, waits, and always removes the namespaces (also on error, SIGINT,
// SIGTERM). Throws NotSupported when not root or when the script is missing.
// Returns the first non-zero exit code of the ranks, or 0.
int runAcrossSimulatedLink(const std::string& rate, const std::vector<std::string>& argv);

}  // namespace tessera::bench
