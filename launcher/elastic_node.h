// ElasticNode: tessera-run's elastic mode (`--nnodes MIN:MAX`), one node of a
// job whose nodes may leave and join (parallel/elastic.h is the protocol the
// workers run; this is the launcher's side of its contract). Private to the
// launcher.
//
// What one node's tessera-run does:
//   - connects to the job's store (comm/rendezvous.h): a tessera store
//     (comm/store_server.h) at --rdzv-endpoint, proving the join secret
//     (--join-token-file, else TESSERA_JOIN_TOKEN_FILE / TESSERA_JOIN_TOKEN;
//     with --host-store it first hosts that store itself, for as long as it
//     lives -- a standalone `tessera-store --port P` outlives every node and
//     is the better choice), or an etcd cluster (--rdzv-backend etcd,
//     --rdzv-endpoint listing its members, etcd's user/password from
//     --rdzv-conf or TESSERA_ETCD_USER / TESSERA_ETCD_PASSWORD_FILE); every
//     record under the run id (--rdzv-id);
//   - takes a slot (node_slot.h): --node-rank, else the lowest slot that no
//     live launcher holds; refused at once when that slot's launcher is alive,
//     or when MAX live launchers hold every slot; keeps a liveness record for
//     it while it runs;
//   - before each start of its workers takes a new incarnation
//     ("elastic/incarnation/<slot>"), so each start is a new member
//     "<slot>.<incarnation>" to the others;
//   - when a worker fails (exits non-zero, other than kExitEvicted, or dies of
//     a signal it did not send) writes "elastic/dead/<member>" at once, so the
//     others drop the member without waiting for its heartbeat to age;
//   - restarts all its workers when one fails or when one exits with
//     kExitEvicted (dropped from the job), --max-restarts times in all;
//     SIGINT/SIGTERM are forwarded (the workers leave gracefully);
//   - prints one line per membership change it reads from
//     "elastic/membership".
// It does not stop when other nodes fail: surviving them is the point.
#pragma once

#include <string>

#include "launcher/run_options.h"

namespace tessera::launcher {

// Runs this node until its workers finish. Returns tessera-run's exit code
// (0 all workers exited 0; 1 failure beyond --max-restarts or a startup
// error, printed; 128+N after signal N). Throws Error for startup problems
// (store unreachable, wrong join secret or etcd credentials, slot taken, MAX
// live nodes reached) with the fix named.
int runElasticNode(const RunOptions& options);

// The report line for a membership JSON as elastic.h publishes it:
// "membership epoch E at outer step K: nodes [..]; joined [..]; dropped [..]"
// (plus "; the job stops: <reason>" when the decision stops the job).
// Throws InvalidArgument when `json` is not such a document.
std::string describeMembership(const std::string& json);

}  // namespace tessera::launcher
