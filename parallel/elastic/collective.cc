// The elastic mesh's synchronizations: one collective across the member
// nodes under the commit-or-retry rule (elastic.h's file comment), and the
// outer all-reduce of plain DiLoCo built on it.
//
//   collectiveAcrossNodes(k, body): for attempt a = 0, 1, ...
//     decide(k, a)      membership at sync k (joiners admitted, dead dropped)
//     form the group    when the decision's epoch differs from the group's
//     body(group)       the optimizer's communication; writes scratch only
//     vote              commit only if every live member's body succeeded
//   commit: the decision becomes committed_ and the caller applies the
//   scratch; retry: the group is dropped and the body runs again on the next
//   attempt's group (a new epoch without the dead).
#include <nlohmann/json.hpp>

#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/comm/compression.h"
#include "tessera/core/logging.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel {

using elastic::joinList;

Membership ElasticMesh::collectiveAcrossNodes(int64_t syncIndex,
                                              const std::function<void(comm::Communicator& group)>& body) {
  std::string lastError;
  for (int attempt = 0; attempt < config_.max_retries; ++attempt) {
    const Membership d = decide(syncIndex, attempt);
    bool ok = true;
    try {
      if (!group_ || groupEpoch_ != d.epoch) formGroup(d);
      body(*group_);
    } catch (const std::exception& e) {  // tessera's errors and libtorch's alike: every failure must vote
      ok = false;
      lastError = e.what();
      // Dropping the group closes its sockets, so peers blocked on this
      // process fail now instead of at their timeout.
      dropGroup();
      TESSERA_LOG(kWarn) << "outer step " << syncIndex << " attempt " << attempt + 1 << " failed: " << lastError;
    }
    const bool commit = vote(d, ok);
    if (commit && !ok) {
      throw Evicted("outer step " + std::to_string(syncIndex) + " committed without this node's result (" + lastError +
                    "); rejoining with fresh state");
    }
    if (commit) {
      const bool changed = d.epoch != committed_.epoch || !d.joiners.empty() || !d.dropped.empty();
      committed_ = d;
      if (changed && identity_.localRank == 0) {
        std::vector<std::string> joined;
        for (const auto& [joiner, source] : d.joiners) joined.push_back(joiner);
        if (d.members.front() == me_) {
          try {
            store_->setString("elastic/membership", d.toJson());
          } catch (const Error&) {  // reporting only
          }
        }
        emit(elastic::membershipEvent(d));
        TESSERA_LOG(kInfo) << "outer step " << syncIndex << ": epoch " << d.epoch << ", nodes " << joinList(d.members)
                           << (joined.empty() ? "" : ", admitted " + joinList(joined))
                           << (d.dropped.empty() ? "" : ", dropped " + joinList(d.dropped));
      }
      lastAttempts_ = attempt + 1;
      return d;
    }
    dropGroup();
    emit(nlohmann::json{{"event", "retry"}, {"outer_step", syncIndex}, {"attempt", attempt + 1},
                        {"error", ok ? "another node failed" : lastError}, {"time_s", elastic::unixSeconds()}}
             .dump());
  }
  throw CommError("outer step " + std::to_string(syncIndex) + " failed in all " + std::to_string(config_.max_retries) +
                  " attempts (elastic.max_retries); last error: " + lastError);
}

Membership ElasticMesh::averageAcrossNodes(at::Tensor flat, int64_t outerStep) {
  // The body's input is a copy, so every attempt starts from the same
  // pseudo-gradient; `flat` itself is the scratch that ends up holding the mean.
  const at::Tensor original = flat.clone();
  return collectiveAcrossNodes(outerStep, [&](comm::Communicator& group) {
    flat.copy_(original);
    if (flat.numel() > 0) comm::allReduceCompressed(group, flat, comm::ReduceOp::kAvg, compression_);
  });
}

}  // namespace tessera::parallel
