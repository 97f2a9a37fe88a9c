// Group formation of the elastic mesh (private): the node's local group here;
// the elastic global groups are ElasticMesh::formGroup/dropGroup (groups.cc).
// Both go through comm::makeStoreGroup, never a backend directly.
#pragma once

#include "tessera/comm/communicator.h"
#include "tessera/comm/store.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel::elastic {

// The local group: the node's processes, under the store prefix
// "elastic/node/<member>" (the member id is fresh per incarnation, so a
// restarted node never meets its predecessor's keys), named "node<slot>" in
// errors. Collective over the node's processes. Throws TimeoutError naming the
// local ranks that did not arrive, StoreError when the store is unreachable.
comm::CommPtr makeLocalGroup(const comm::StorePtr& store, const ElasticIdentity& identity,
                             const ElasticConfig& config);

}  // namespace tessera::parallel::elastic
