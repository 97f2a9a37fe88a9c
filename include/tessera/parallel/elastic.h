// ElasticMesh: training that keeps going while nodes leave and join
// (REFERENCE §5; PRIME's ElasticDeviceMesh, torchft's quorum).
//
// Two levels:
//   - the local group: the processes of one node (fixed membership for the
//     node's lifetime; a failed process restarts the whole node). It carries
//     whatever runs inside a node (FSDP/DDP over dp_shard).
//   - the elastic global group, one per local rank index l: process l of
//     every member node (the dp_replicate axis; DiLoCo averages its
//     pseudo-gradients here). Gloo over the store, re-formed under the store
//     prefix "elastic/e<epoch>/l<l>" whenever membership changes.
//
// Membership lives in the store (the job's single authority, which is what
// rules out split brain: a partitioned minority cannot reach it, so it can
// neither decide nor be part of a decision; it waits and later rejoins):
//   - each node (local rank 0) heartbeats every heartbeat_interval by
//     incrementing "elastic/hb/<member>"; a node whose counter has not moved
//     for heartbeat_timeout (as seen by the observer's own clock: no clock
//     sync needed) is dead. SIGTERM/leave() writes "elastic/left/<member>",
//     which counts as dead at once.
//   - at each outer step k (attempt a), every member process marks itself
//     arrived; the leader -- the lowest-slot member alive in its view --
//     waits until every live member arrived, then publishes the decision
//     "elastic/round/<k>/<a>" with compareSet (so exactly one decision
//     exists even if two nodes believe they lead): epoch, members, joiners
//     admitted with their sources. Others take over only when the leader is
//     dead in their view.
//   - joiners register ("elastic/join/<n>"), are admitted at the next outer
//     step's decision, receive the state the source snapshots right after
//     that outer step (live recovery), train the following round and become
//     members at the next decision. Joiners count towards min_nodes.
//   - below min_nodes the survivors wait up to wait_timeout for nodes, then
//     stop with an error naming who is missing.
//   - generations (restarting a job that lost every node): the records
//     above belong to generation G, kept in "elastic/generation" (absent:
//     0); generation 0's records are unprefixed, generation G > 0's live
//     under "g<G>/" (heartbeats, "elastic/left/" and "elastic/dead/" stay
//     unprefixed: member ids are unique over the job's life). A joiner that
//     sees no candidate of its generation's last decision ("elastic/membership",
//     else the start decision) alive -- dead in its heartbeat view, left or
//     marked dead -- founds generation G + 1 with compareSet(G -> G + 1):
//     of two nodes racing, one write wins and both read back the same G + 1
//     (a node that sees a newer generation just moves there). It registers
//     again under the new prefix and the start protocol runs afresh there;
//     the founders load the job's latest checkpoint (launcher/elastic_train.h).
//     A node's processes follow its local rank 0's choice
//     ("elastic/nodegen/<member>").
//   - a failed attempt (group formation or all-reduce threw) is voted:
//     every member writes its result; the step commits only if every live
//     member succeeded, else all retry the same step (attempt a + 1) with the
//     same pseudo-gradients after dead members are dropped. At most
//     max_retries attempts.
//
// Launcher contract (tessera-run --nnodes MIN:MAX, one launcher per node):
// workers get TESSERA_ELASTIC=1, the job's store (comm/rendezvous.h) as
// TESSERA_RDZV_BACKEND (tessera|etcd), TESSERA_RDZV_ENDPOINT (comma list of
// host:port), TESSERA_RDZV_ID (the run id, may be empty), for the tessera
// backend also TESSERA_STORE_ADDR=host:port (comm/store_server.h), for etcd
// with auth TESSERA_ETCD_USER and TESSERA_ETCD_PASSWORD_FILE; and
// TESSERA_NODE_SLOT, TESSERA_NODE_INCARNATION, TESSERA_NNODES=MIN:MAX,
// TESSERA_ADVERTISE_HOST, LOCAL_RANK, LOCAL_WORLD_SIZE, RANK =
// slot*LOCAL_WORLD_SIZE + LOCAL_RANK, GROUP_RANK = slot, and
// TESSERA_JOIN_TOKEN_FILE passed through (the join secret still guards live
// recovery with etcd). The rendezvous variables, where set and non-empty,
// win over [elastic] rdzv_backend / rdzv_endpoint / rdzv_id: the workers
// must use the store their launcher uses. The launcher keeps a liveness
// record per slot ("elastic/launcher/..."), refuses a second launcher for a
// live slot and one beyond MAX live nodes, and writes "elastic/dead/<member>"
// (value: the reason) the moment it sees its worker exit abnormally, which
// the others treat as dead at once. A worker that finds it
// was dropped from the job (e.g. after a partition healed) exits with
// kExitEvicted; the launcher restarts the node (within --max-restarts), which
// rejoins through live recovery. The leader also writes the latest decision to
// "elastic/membership" (JSON: {"epoch","outer_step","members":[...],
// "joiners":[...],"dropped":[...]}) for launchers and tools to report.
//
// Events: rank 0 of each node appends JSON lines to its metrics file:
//   {"event":"membership","epoch":E,"outer_step":K,"members":[...],"joined":[...],"dropped":[...],"time_s":T}
//   {"event":"outer_step","step":S,"outer_step":K,"epoch":E,"attempts":A,"param_hash":"<xxh64 hex>","time_s":T}
//   {"event":"recovered","from":"<member>","bytes":B,"seconds":X,"outer_step":K,"time_s":T}
//   {"event":"served","to":"<member>","bytes":B,"seconds":X,"outer_step":K,"time_s":T}
//   {"event":"retry","outer_step":K,"attempt":A,"error":"...","time_s":T}
//   {"event":"checkpoint","step":S,"outer_step":K,"dir":"...","time_s":T}   (the leader node; launcher/elastic_train.h)
//   {"event":"resumed","checkpoint":"...","step":S,"outer_step":K,"generation":G,"time_s":T}   (founders)
//   {"event":"decision","outer_step":K,"attempt":A,"epoch":E,"leader":"<member>","members":[...],"joined":[...],
//    "dropped":[...],"dead":[{"member","cause","seen_s"}],"waited_s":W,"time_s":T}   (the leader, when something changed)
//   {"event":"group","epoch":E,"outer_step":K,"attempt":A,"members":N,"ok":B,"seconds":X,["error":"..."],"time_s":T}
// Liveness keys besides the heartbeat counters: "elastic/alive/<member>" (bound
// to a lease of ttl heartbeat_timeout where the store has leases: etcd),
// "elastic/dead/<member>" (a launcher saw the worker die: dead at once),
// "elastic/suspicions" (a collective failed: suspects must beat within about
// two intervals), "elastic/e<E>/abandon" (a formation lost a member).
// (time_s: seconds since the Unix epoch, so nodes' lines can be merged.)
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/comm/compression.h"
#include "tessera/comm/store.h"
#include "tessera/core/error.h"

namespace tessera::parallel {

// Exit code of a worker that was dropped from the job and must rejoin.
constexpr int kExitEvicted = 75;

// The [elastic] section. Plain struct; validate() before use.
struct ElasticConfig {
  double heartbeat_interval_s = 2.0;
  double heartbeat_timeout_s = 10.0;
  int min_nodes = 1;                  // below this the survivors wait, then stop
  int max_nodes = 0;                  // 0: no limit; joiners beyond it are refused
  double wait_timeout_s = 60.0;       // how long survivors wait below min_nodes
  double collective_timeout_s = 30.0; // one attempt's group formation + all-reduce
  int max_retries = 3;                // attempts per outer step
  double join_timeout_s = 300.0;      // joiner: admission + receiving the state
  double start_grace_s = 1.0;         // founders: after min_nodes registered, wait for more this long
  // The store (comm/rendezvous.h). tessera-run's TESSERA_RDZV_* variables win
  // over these (ElasticIdentity::resolved); they matter for a tessera-train
  // started without tessera-run.
  std::string rdzv_backend = "tessera";  // "tessera" | "etcd"
  std::string rdzv_endpoint;             // "host:port" (tessera), "h1:2379,h2:2379,h3:2379" (etcd)
  std::string rdzv_id;                   // the run id: keys every record ("" : none)
  // How long the job rides out an unreachable store (a tessera store
  // restarting, etcd without quorum) before stopping with an error: the
  // store client's connect and reconnect bound.
  double store_outage_timeout_s = 60.0;

  // Throws ConfigError naming the field (prefix + "heartbeat_timeout_s").
  void validate(const std::string& prefix = "elastic.") const;
};

// Who this process is (from the launcher's environment, see above).
struct ElasticIdentity {
  int slot = 0;
  int incarnation = 0;
  int localRank = 0;
  int localSize = 1;
  int minNodes = 1;
  int maxNodes = 0;
  std::string storeAddress;          // host:port of the tessera store; etcd: the endpoint list (messages)
  std::string advertiseHost = "127.0.0.1";
  // The store (comm/rendezvous.h), from TESSERA_RDZV_*; empty: from the
  // [elastic] config (resolved()).
  std::string backend;               // "tessera" | "etcd"
  std::vector<std::string> endpoints;  // host:port each (tessera: one)
  std::string runId;                 // keys every record of the job
  std::string etcdUser;              // etcd auth (TESSERA_ETCD_USER); "" : none
  std::string etcdPasswordFile;      // etcd auth (TESSERA_ETCD_PASSWORD_FILE)
  // "<slot>.<incarnation>": unique over the job's life.
  std::string memberId() const;
  // Reads the variables above; throws InvalidArgument naming a bad one.
  // The store may come from the config instead (resolved()).
  static ElasticIdentity fromEnv();
  // This identity with the store's backend, endpoints and run id that the
  // environment left empty taken from `config` (the environment wins).
  // Throws ConfigError when no endpoint is known, or the backend is unknown.
  ElasticIdentity resolved(const ElasticConfig& config) const;
};

// A decision, as published.
struct Membership {
  int64_t epoch = 0;       // the elastic groups' generation: bumped when members change or an attempt failed
  int64_t outerStep = 0;   // -1: the start of the job
  int attempt = 0;
  std::vector<std::string> members;                         // take part in this outer step, ascending slot
  std::vector<std::pair<std::string, std::string>> joiners;  // (joiner, source member) admitted here
  std::vector<std::string> pending;   // joiners admitted earlier, still receiving state or catching up
  std::vector<std::string> dropped;   // candidates of the previous decision left out (dead, left, too slow)
  int64_t joinCursor = 0;             // registrations ("elastic/join/<n>", n < joinCursor) already handled
  std::string stop;                   // non-empty: the job stops; the reason (e.g. below min_nodes)

  std::string toJson() const;
  static Membership fromJson(const std::string& text);  // throws InvalidArgument
  int indexOf(const std::string& member) const;          // -1 when absent
};

// Slot of a member id "<slot>.<incarnation>" (throws InvalidArgument).
int slotOf(const std::string& member);

// Thrown when this node finds itself dropped from the job (it was partitioned
// or too slow): the worker exits with kExitEvicted and rejoins as a new node.
class Evicted : public Error {
 public:
  using Error::Error;
};

// Thrown when this node left the job on request (SIGTERM -> leave()): the
// worker stops training and exits 0.
class LeftJob : public Error {
 public:
  using Error::Error;
};

// Where a joiner gets its state from.
struct RecoveryTicket {
  std::string source;        // member id of the source
  std::string address;       // host:port of its StateSender for this local rank
  int64_t outerStep = 0;     // the state is the one right after this outer step
  Membership decision;       // the committed decision that admitted this node
};

// One node's view of the elastic job. Owned by the worker; every local rank
// of a node has one. Not thread-safe (one training thread calls it), apart
// from leave().
class ElasticMesh {
 public:
  // Connects to the store (two clients: one for the heartbeat thread),
  // forms the local group (Gloo over the store under
  // "elastic/node/<member>"), registers the node and, on local rank 0,
  // starts the heartbeat thread. Collective over the node's processes.
  // Throws StoreError/AuthError when the store refuses or cannot be reached,
  // ConfigError for a bad config.
  ElasticMesh(ElasticIdentity identity, ElasticConfig config, comm::Compression compression = comm::Compression::kNone);
  ~ElasticMesh();
  ElasticMesh(const ElasticMesh&) = delete;
  ElasticMesh& operator=(const ElasticMesh&) = delete;

  const ElasticIdentity& identity() const { return identity_; }
  const ElasticConfig& config() const { return config_; }
  const comm::CommPtr& local() const { return local_; }
  const comm::StorePtr& store() const { return store_; }
  const std::string& secret() const { return secret_; }

  // Blocks until this node is part of the job. Returns nullopt for a founder
  // (the job starts with it; every founder initialises identically from the
  // config's seed), or where to receive the state from for a joiner (admitted
  // at an outer step). Throws TimeoutError after join_timeout, Error when the
  // job refuses the node (max_nodes reached, stopped).
  // A joiner that finds every member of the running generation dead
  // re-founds the job in a new generation (see the file comment); it may
  // then return nullopt as a founder of that generation. Collective over the
  // node's processes (they agree on the generation through the store).
  std::optional<RecoveryTicket> join();
  // The generation this node belongs to (0: the first; set by join()).
  int64_t generation() const { return generation_; }
  // Whether the job moved on to a newer generation than this node's (it
  // was taken for dead: its records and decisions no longer count). Reads
  // the store: throws StoreError when it is unreachable.
  bool generationSuperseded();
  // Joiner: call after the received state was restored, before training on.
  void recovered(const RecoveryTicket& ticket);
  // After the last training step (local rank 0 writes; others no-op): records
  // that the job (this generation) finished, so a node that joins later exits
  // 0 (join() throws LeftJob) instead of re-founding it. Does not throw.
  void finished(int64_t step);

  // Collective over the members at outer step `outerStep`: `flat` (this
  // process's fp32 pseudo-gradient) becomes the mean over the member nodes'
  // values. Decides membership first (see the file comment), re-forms the
  // elastic group when needed and retries failed attempts with the same
  // input. Returns the committed decision. Throws Evicted, TimeoutError
  // (no decision, naming the leader), Error (below min_nodes too long, or
  // every attempt failed).
  Membership averageAcrossNodes(at::Tensor flat, int64_t outerStep);

  // The general form (collective.cc; averageAcrossNodes is built on it): one
  // synchronization of the members, numbered `syncIndex` -- strictly
  // increasing over the job (decisions are keyed by it: "elastic/round/<k>/..."
  // and a joiner is recovered "after sync k"), the same on every member.
  // Decides membership, (re)forms the elastic group when the epoch changed,
  // runs body(group) on it (group.size() = the members at this sync), votes,
  // and on a failed attempt runs body again on the next attempt's group. So
  // body must be retry-safe: read inputs it leaves unchanged, write only
  // scratch that the caller applies after this returns (the commit). Runs on
  // a group of one too. Returns the committed decision; throws as
  // averageAcrossNodes (Evicted, TimeoutError, Error, CommError after
  // max_retries failed attempts), and then nothing must be applied.
  // optim/elastic_collective.h is the optimizers' side of this contract.
  Membership collectiveAcrossNodes(int64_t syncIndex, const std::function<void(comm::Communicator& group)>& body);

  // The last committed decision, and this process's current elastic group
  // (null before the first outer step and after a failure).
  const Membership& committed() const { return committed_; }
  const comm::CommPtr& group() const { return group_; }
  // Joiners this process must serve after the committed outer step (the
  // decision named it as their source).
  std::vector<std::string> joinersToServe() const;
  // Publishes where joiner `member` finds this process's StateSender.
  void publishRecoverySource(const std::string& member, const std::string& address);

  // Announces a graceful leave ("elastic/left/<member>"), so nobody waits for
  // this node's heartbeat to time out. Idempotent. Not for signal handlers.
  void leave();
  // Async-signal-safe: only sets a flag. The training thread sees it at the
  // next step (leaveIfRequested) or inside a wait of this class, announces
  // the leave and throws LeftJob.
  void requestLeave() { leaveRequested_.store(true); }
  bool leaveRequested() const { return leaveRequested_.load(); }
  // Throws LeftJob (after leave()) when a leave was requested.
  void leaveIfRequested();

  // Called with each event line (see the file comment) on local rank 0;
  // tessera-train appends them to the metrics file.
  std::function<void(const std::string& jsonLine)> onEvent;
  // Applied to every elastic group formed (fault injection wraps it here).
  std::function<comm::CommPtr(comm::CommPtr)> wrapGroup;
  // Bytes this process sent on its elastic groups (every epoch's), cumulative.
  uint64_t bytesSent() const;
  // Seconds this process spent in operations on its elastic groups (every
  // epoch's), cumulative. The outer all-reduce blocks the training loop, so
  // all of it is exposed time.
  double secondsInGroups() const;
  // Attempts the last committed outer step took (1 = no retry).
  int lastAttempts() const { return lastAttempts_; }

 private:
  struct Monitor;
  Membership decide(int64_t outerStep, int attempt);
  Membership decideStart();
  std::optional<Membership> tryDecide(const std::string& base, int64_t outerStep, int attempt);
  void formGroup(const Membership& decision);
  void dropGroup();  // counts its bytes first
  bool vote(const Membership& decision, bool ok);
  void emit(const std::string& jsonLine);
  // join.cc: generations (see the file comment).
  int64_t agreedGeneration();            // local rank 0 reads and publishes it; the others follow
  std::optional<int64_t> newerGeneration();  // a generation to move to, re-founding when ours is dead
  bool generationAbandoned();            // local rank 0: no candidate of the last decision alive
  void enterGeneration(int64_t generation);
  std::optional<RecoveryTicket> waitForAdmission();
  void throwIfSourceDied();  // joiner, local rank 0: throws Evicted (after a leave) when its source died  // nullopt: moved to a newer generation

  ElasticIdentity identity_;
  ElasticConfig config_;
  comm::Compression compression_;
  std::string secret_;
  std::string me_;
  comm::StorePtr store_;     // this generation's view of jobStore_
  comm::StorePtr jobStore_;  // the job's store itself (set by join())
  int64_t generation_ = 0;
  comm::CommPtr local_;
  comm::CommPtr group_;
  int64_t groupEpoch_ = -1;
  Membership committed_;
  std::unique_ptr<Monitor> monitor_;
  std::atomic<bool> leaveRequested_{false};
  std::atomic<bool> announcedLeave_{false};
  std::chrono::steady_clock::time_point roundStart_;
  std::optional<std::chrono::steady_clock::time_point> belowMinSince_;
  int lastAttempts_ = 1;
  uint64_t retiredBytes_ = 0;  // sent on groups already dropped
  double retiredSeconds_ = 0;  // spent on groups already dropped
};

}  // namespace tessera::parallel
