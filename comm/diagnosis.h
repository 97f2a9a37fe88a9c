// Private to comm/: explains a failed collective. When an operation fails or
// times out, each rank that noticed publishes what it was doing (an OpInfo)
// and collects the others' for a short grace period. The summary names the
// ranks that never reported (dead, or stuck elsewhere: "did not arrive") and
// the ranks whose operation, dtype or size disagrees with this rank's. It runs
// only after a failure, so successful operations pay nothing for it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/store.h"
#include "tessera/comm/types.h"

namespace tessera::comm::detail {

struct OpInfo {
  OpKind kind = OpKind::kBarrier;
  uint64_t seq = 0;           // index of this collective in the group's sequence
  std::string dtype;          // "float32", ...; empty for barrier
  int64_t numel = 0;          // elements this rank contributes
  int peer = -1;              // root (broadcast) or peer (send/recv)
  uint64_t countsDigest = 0;  // hash of the per-rank counts of uneven ops (0: equal split)

  // "allreduce #12 float32[1000]"
  std::string describe() const;
  std::string encode() const;
  static std::optional<OpInfo> decode(const std::string& text);
  bool matches(const OpInfo& other) const;
};

// A digest of a counts vector, for OpInfo::countsDigest (0 for empty counts).
uint64_t digestCounts(const std::vector<int64_t>& counts);

// reports[r]: what rank r said it was doing (nullopt: no report in time).
std::string summarizeReports(int myRank, const OpInfo& mine,
                             const std::vector<std::optional<OpInfo>>& reports, Timeout waited);

// Publishes `mine` under "diag/<rank>" and waits up to grace for the other
// ranks' reports. Never throws: a dead store yields a sentence saying so.
std::string diagnoseViaStore(Store& store, int rank, int size, const OpInfo& mine, Timeout grace);

// How long a failing rank waits for its peers' reports: a quarter of the
// operation's timeout, clamped to [1 s, 5 s].
Timeout diagnosisGrace(Timeout opTimeout);

}  // namespace tessera::comm::detail
