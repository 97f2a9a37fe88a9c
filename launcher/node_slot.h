// NodeSlot: an elastic node's claim on its slot, backed by a liveness record
// that its tessera-run keeps fresh while it lives. Private to the launcher
// (elastic_node.cc). It is how tessera-run refuses, at once:
//   - a second launcher for a slot (--node-rank) whose launcher is alive, and
//   - a launcher that would make the job exceed MAX live nodes,
// and how a node restarted from scratch takes over its old slot without
// waiting (a dead launcher's record is stale within a few seconds).
//
// Store records (under the run id's prefix, like every record of the job):
//   elastic/launcher/nnodes            "MIN:MAX" of the job (the first launcher writes it)
//   elastic/launcher/slot/<s>/owner    the launcher id holding slot s (claimed with compareSet)
//   elastic/launcher/alive/<id>        launcher <id>'s beat counter, rewritten every beat; bound
//                                      to a lease kept alive by the launcher where the store
//                                      supportsLeases() (it vanishes when the launcher dies)
// Liveness of a launcher, as another launcher judges it: its alive record is
// absent -> dead at once; the record moves within kWatch -> alive; it does not
// move -> dead (a launcher killed before its lease ran out, or a store without
// leases). A launcher writes its alive record before claiming a slot, so a
// claim is never seen without one. Claims change hands only by compareSet
// from the owner judged dead, so two newcomers cannot both take a slot.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tessera/comm/store.h"

namespace tessera::launcher {

class NodeSlot {
 public:
  // The launcher's beat, and how long a newcomer watches a record for a beat.
  static constexpr std::chrono::milliseconds kBeat{1000};
  static constexpr std::chrono::milliseconds kWatch{2500};
  // The lease's ttl where the store has leases (etcd rounds it to seconds).
  static constexpr std::chrono::milliseconds kLeaseTtl{5000};

  struct Options {
    int minNodes = 1;
    int maxNodes = 1;
    int wantedSlot = -1;         // --node-rank; -1: the lowest free slot
    std::string storeName;       // for messages ("tcp://h:p", "etcd h1:2379,...")
  };

  // Claims a slot through `store`; the beat thread uses its own client from
  // `connect` (so a slow call of the supervisor's never delays a beat).
  // Throws InvalidArgument, naming the rank or MAX and the fix, when refused;
  // StoreError when the store fails.
  NodeSlot(comm::StorePtr store, std::function<comm::StorePtr()> connect, Options options);
  // Stops beating and releases the slot (the claim and the record, when still
  // this launcher's), so a restart takes it without waiting.
  ~NodeSlot();
  NodeSlot(const NodeSlot&) = delete;
  NodeSlot& operator=(const NodeSlot&) = delete;

  int slot() const { return slot_; }
  const std::string& launcherId() const { return id_; }
  // Set when another launcher took the slot over (this one's record was seen
  // stale, e.g. it could not reach the store for a while): the node must stop.
  std::optional<std::string> lost() const;

 private:
  void checkNnodes();
  void writeAlive(comm::Store& store);
  void claimWanted();
  void claimFree();
  // Of `owners` (launcher ids), those alive (see the file comment); watches
  // them all at once for at most kWatch.
  std::vector<bool> liveness(const std::vector<std::string>& owners);
  void beatLoop();

  comm::StorePtr store_;
  std::function<comm::StorePtr()> connect_;
  Options options_;
  std::string id_;
  int slot_ = -1;
  int64_t lease_ = 0;  // 0: the store has no leases
  int64_t beats_ = 0;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::optional<std::string> lost_;
  std::thread thread_;
};

}  // namespace tessera::launcher
