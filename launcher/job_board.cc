// JobBoard: cross-node failure and completion flags in the launcher store.
#include "launcher/job_board.h"

#include <exception>

namespace tessera::launcher {
namespace {

const char* const kFailureKey = "tessera-run/failure";
const char* const kDoneKey = "tessera-run/nodes_done";

}  // namespace

JobBoard::JobBoard(comm::StorePtr store, int nodeRank, int nnodes)
    : store_(std::move(store)), nodeRank_(nodeRank), nnodes_(nnodes) {}

void JobBoard::reportFailure(const std::string& message) {
  try {
    // compareSet from "absent" keeps the first report: later ones are usually
    // the other nodes' workers dying of the first failure.
    store_->compareSet(kFailureKey, {}, comm::toBytes("node " + std::to_string(nodeRank_) + ": " + message));
  } catch (const std::exception&) {
    // The store is gone too; the other nodes learn it from failure().
  }
}

std::optional<std::string> JobBoard::failure() {
  try {
    if (!store_->check({kFailureKey})) return std::nullopt;
    return store_->getString(kFailureKey, std::chrono::seconds(5));
  } catch (const std::exception& e) {
    return "lost contact with the launcher store on node 0 (" + store_->describe() +
           "): node 0's tessera-run exited or died (" + e.what() + ")";
  }
}

void JobBoard::markNodeDone() {
  try {
    store_->add(kDoneKey, 1);
  } catch (const std::exception&) {
    // Node 0 gave up waiting or died; nothing left to tell it.
  }
}

bool JobBoard::allNodesDone() { return store_->add(kDoneKey, 0) >= nnodes_; }

}  // namespace tessera::launcher
