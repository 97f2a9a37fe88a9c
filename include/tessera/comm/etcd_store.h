// A Store (store.h) backed by an etcd v3 cluster: the rendezvous store of an
// elastic job without a single point of failure (rendezvous.h selects it with
// --rdzv-backend etcd). etcd replicates every record over its members (Raft),
// so the job survives the loss of any minority of them.
//
// Why etcd's HTTP/JSON gateway and not its gRPC API: the gateway needs only
// libcurl (already a dependency of the machines tessera runs on) and
// nlohmann-json (already used); gRPC would bring protoc, grpc++ and generated
// code into the build. The cost is JSON + base64 on every request, which is
// nothing for a control-plane store (a few requests per outer step). The
// gateway serves the same KV, txn, watch, lease and auth services.
//
// How each call maps onto etcd (every key and value is opaque bytes):
//   set          put
//   get/wait     range; when a key is absent, a watch from the range's
//                revision + 1 until it is put (woken at once, no polling),
//                re-checked every few seconds in case the watched member is
//                silently cut off from the others
//   add          compare-and-swap transaction loop on the key's mod_revision
//                (etcd has no atomic add); the winning transaction also writes
//                "<key>\0add" with a unique nonce, so an add whose answer was
//                lost in a failover is neither lost nor applied twice
//   compareSet   one transaction: value == expected (expected empty: the key
//                is absent), else return what is there
//   deleteKey    deleterange (after a failover retry it may say false for a
//                key this call deleted)
//   check        one range per key (count only)
//   leases       lease grant / keepalive / revoke, put with a lease id
//
// Failover and deadlines (comm/store/etcd_http.h): each request goes to one
// endpoint with a deadline of requestTimeout; on a connection failure, a
// timeout or an "unavailable" answer (no leader) the next endpoint is tried,
// round the list, for at most outageTimeout. Then StoreError names every
// endpoint with its last error and, when a majority is unreachable or no
// member has a leader, says the cluster lost quorum. A blocking get/wait
// waits up to its own timeout for the key, and up to outageTimeout for the
// cluster to come back. Nothing waits forever.
//
// Authentication: with user set, the store authenticates (etcd's simple or
// JWT tokens) and sends the token with every request; a token that expired is
// replaced transparently. AuthError when etcd refuses the user/password.
//
// Thread-safety: all methods may be called concurrently from any thread
// (blocking waits do not serialize other calls).
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "tessera/comm/store.h"

namespace tessera::comm {

struct EtcdStoreOptions {
  std::vector<std::string> endpoints;  // "host:port" client URLs (plain http), at least one
  std::string user;                    // etcd user; "" : the cluster has no auth enabled
  std::string password;                // its password
  // Deadline of one request to one endpoint before failing over to the next
  // (and the time a watch has to start).
  std::chrono::milliseconds requestTimeout = std::chrono::seconds(10);
  // How long a call keeps failing over while no endpoint can serve it (the
  // cluster is down or lost quorum) before StoreError. The elastic job pauses
  // for this long when a majority of etcd members is lost, and goes on if they
  // return within it. The constructor waits this long for the cluster too.
  std::chrono::milliseconds outageTimeout = std::chrono::seconds(60);
};

// Connects: checks that the cluster answers (and authenticates) within
// options.outageTimeout. Throws InvalidArgument for an empty endpoint list,
// StoreError when no endpoint answers (naming them), AuthError when etcd
// refuses the credentials. describe() is "etcd://h1:p1,h2:p2".
StorePtr makeEtcdStore(const EtcdStoreOptions& options);

}  // namespace tessera::comm
