// The rendezvous store of a job, chosen by backend: what tessera-run's
// --rdzv-backend / --rdzv-endpoint / --rdzv-id and the [elastic] section name
// (torchrun's flag names). Two backends:
//   "tessera"  the tessera store (comm/store_server.h): one process, the
//              embedded default; one endpoint; HMAC join secret.
//   "etcd"     an etcd v3 cluster (comm/etcd_store.h): several endpoints with
//              failover, leases for liveness; etcd's own user/password.
// Every record of the job lives under "<runId>/" when runId is set, so a job
// restarted on the same store under a new id never meets the previous run's
// rounds and joins.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "tessera/comm/store.h"

namespace tessera::comm {

struct RendezvousOptions {
  std::string backend = "tessera";     // "tessera" | "etcd"
  std::vector<std::string> endpoints;  // host:port, at least one
  std::string runId;                   // keys every record ("" : none)
  std::string secret;                  // tessera backend: the join secret (HMAC)
  std::string user;                    // etcd backend: etcd's user ("" : no auth)
  std::string password;                // etcd backend: its password
  // How long connecting keeps retrying, and the default for get/wait.
  // etcd backend: also the outage bound (EtcdStoreOptions::outageTimeout):
  // how long any call keeps failing over while the cluster has no quorum or
  // no endpoint answers, before StoreError naming the lost quorum. The job
  // pauses that long when a majority of etcd members is down.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // The deadline of one request (etcd: per endpoint before failing over).
  std::chrono::milliseconds requestTimeout = std::chrono::seconds(10);
};

// Connects. Throws ConfigError for an unknown backend or a bad endpoint list
// (naming the flag and the fix), StoreError when no endpoint answers within
// options.timeout (naming them), AuthError when the store refuses the
// credentials.
StorePtr connectRendezvousStore(const RendezvousOptions& options);

// "h1:2379,h2:2379" -> {"h1:2379", "h2:2379"}; throws ConfigError naming
// `what` (e.g. "--rdzv-endpoint") for an empty list or an entry that is not host:port.
std::vector<std::string> parseEndpointList(const std::string& list, const std::string& what);

}  // namespace tessera::comm
