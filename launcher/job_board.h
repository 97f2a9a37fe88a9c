// JobBoard: what the tessera-run launchers of a multi-node job tell each
// other, through the TCP store node 0 hosts. Private to the launcher.
//
// Two facts travel: "the job failed, and why" (first report wins; every
// other node stops its workers on seeing it) and "node N's workers are done"
// (node 0 keeps the store up until every node is done, so a node that
// finishes first cannot pull the store from under the others).
// Keys live under "tessera-run/"; workers use "attempt<k>/", so they never meet.
#pragma once

#include <optional>
#include <string>

#include "tessera/comm/store.h"

namespace tessera::launcher {

class JobBoard {
 public:
  // `store` is node 0's store (hosted by node 0's launcher, a client elsewhere).
  JobBoard(comm::StorePtr store, int nodeRank, int nnodes);

  // Publishes why this node failed, unless another node was first. Best
  // effort: never throws, since it runs while the job is already failing.
  void reportFailure(const std::string& message);
  // The failure another node reported, or a description of why the store can
  // no longer be reached (node 0's launcher is gone); nullopt while all is well.
  std::optional<std::string> failure();
  // Records that this node's workers all exited 0. Never throws.
  void markNodeDone();
  // Whether every node called markNodeDone(). Throws StoreError if the store is gone.
  bool allNodesDone();

  int nodeRank() const { return nodeRank_; }
  int nnodes() const { return nnodes_; }

 private:
  comm::StorePtr store_;
  int nodeRank_;
  int nnodes_;
};

}  // namespace tessera::launcher
