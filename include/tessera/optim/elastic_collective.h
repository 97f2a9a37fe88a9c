// The collective an elastic job gives its communication-light optimizers
// (streaming DiLoCo, DeMo, MT-DAO) in place of a fixed replica communicator:
// each synchronization runs on the group of the nodes that are members at
// that moment, under the elastic mesh's commit-or-retry rule
// (parallel::ElasticMesh::collectiveAcrossNodes; parallel/elastic.h).
//
// The optimizer's side of the contract:
//   - syncIndex numbers the optimizer's synchronizations over the whole job,
//     strictly increasing, and is derived from step counters in the
//     optimizer's state(), so a node that joins with a peer's state continues
//     the same numbering (the membership decisions are keyed by it).
//   - body(group) is the communication of one synchronization on `group`
//     (group.size() = the members at this sync, which changes over the job).
//     It may run several times (a failed attempt is retried on a re-formed
//     group), so it must be retry-safe: it reads inputs it leaves unchanged
//     and writes only scratch outputs. The optimizer applies those outputs
//     after the runner returned (the commit), never inside the body.
//   - The runner returns once an attempt committed (every member's body
//     succeeded) and throws otherwise (parallel::Evicted, TimeoutError,
//     CommError): then nothing of the synchronization was applied.
// Runs on a single rank too (a group of one): every node takes part in every
// synchronization so that joiners are admitted at them.
#pragma once

#include <cstdint>
#include <functional>

#include "tessera/comm/communicator.h"

namespace tessera::optim {

using ElasticGroupBody = std::function<void(comm::Communicator& group)>;
using ElasticCollective = std::function<void(int64_t syncIndex, const ElasticGroupBody& body)>;

}  // namespace tessera::optim
