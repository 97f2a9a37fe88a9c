// An elastic node's slot claim and its launcher's liveness record. See node_slot.h.
#include "launcher/node_slot.h"

#include <unistd.h>

#include <random>
#include <sstream>
#include <vector>

#include "launcher/supervisor.h"
#include "tessera/core/error.h"

namespace tessera::launcher {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr const char* kNnodesKey = "elastic/launcher/nnodes";
std::string ownerKey(int slot) { return "elastic/launcher/slot/" + std::to_string(slot) + "/owner"; }
std::string aliveKey(const std::string& id) { return "elastic/launcher/alive/" + id; }

// A key's value, or nullopt when absent; a key that vanishes between the
// check and the read (an expiring lease) reads as absent.
std::optional<std::string> peek(comm::Store& store, const std::string& key) {
  if (!store.check({key})) return std::nullopt;
  try {
    return store.getString(key, milliseconds(300));
  } catch (const TimeoutError&) {
    return std::nullopt;
  }
}

// "<host>-<pid>-<random>": unique among every launcher of every job.
std::string newLauncherId() {
  char host[256] = "host";
  gethostname(host, sizeof(host) - 1);
  std::random_device random;
  std::ostringstream id;
  id << host << "-" << getpid() << "-" << std::hex << random() << random();
  std::string text = id.str();
  for (char& c : text) {
    if (c == '/' || c == ' ') c = '_';
  }
  return text;
}

std::string seconds(milliseconds duration) {
  std::ostringstream out;
  out << duration.count() / 1000.0 << " s";
  return out.str();
}

}  // namespace

NodeSlot::NodeSlot(comm::StorePtr store, std::function<comm::StorePtr()> connect, Options options)
    : store_(std::move(store)), connect_(std::move(connect)), options_(std::move(options)), id_(newLauncherId()) {
  checkNnodes();
  if (store_->supportsLeases()) lease_ = store_->grantLease(kLeaseTtl);
  writeAlive(*store_);  // before the claim: a claim is never seen without its record
  try {
    if (options_.wantedSlot >= 0) {
      claimWanted();
    } else {
      claimFree();
    }
  } catch (...) {
    try {
      store_->deleteKey(aliveKey(id_));
      if (lease_ != 0) store_->revokeLease(lease_);
    } catch (const Error&) {  // refused anyway; the record goes stale on its own
    }
    throw;
  }
  thread_ = std::thread([this] { beatLoop(); });
}

NodeSlot::~NodeSlot() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  try {
    if (peek(*store_, ownerKey(slot_)) == id_) store_->deleteKey(ownerKey(slot_));
    store_->deleteKey(aliveKey(id_));
    if (lease_ != 0) store_->revokeLease(lease_);
  } catch (const Error&) {  // the store is gone: the record goes stale on its own
  }
}

std::optional<std::string> NodeSlot::lost() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return lost_;
}

void NodeSlot::checkNnodes() {
  const std::string mine = std::to_string(options_.minNodes) + ":" + std::to_string(options_.maxNodes);
  const std::string job = comm::toString(store_->compareSet(kNnodesKey, {}, comm::toBytes(mine)));
  if (job != mine) {
    throw InvalidArgument("refused: --nnodes " + mine + " differs from the job's " + job +
                          " (set by its first node in the store " + options_.storeName +
                          "); every node of a job must give the same MIN:MAX (or start a new run with another "
                          "--rdzv-id)");
  }
}

void NodeSlot::writeAlive(comm::Store& store) {
  const comm::Bytes value = comm::toBytes(std::to_string(++beats_));
  if (lease_ != 0) {
    store.setWithLease(aliveKey(id_), value, lease_);
  } else {
    store.set(aliveKey(id_), value);
  }
}

std::vector<bool> NodeSlot::liveness(const std::vector<std::string>& owners) {
  std::vector<std::optional<std::string>> first(owners.size());
  std::vector<bool> alive(owners.size(), false), settled(owners.size(), false);
  for (size_t i = 0; i < owners.size(); ++i) {
    first[i] = peek(*store_, aliveKey(owners[i]));
    settled[i] = !first[i].has_value();  // no record: dead at once
  }
  const auto until = Clock::now() + kWatch;
  while (true) {
    bool open = false;
    for (size_t i = 0; i < owners.size(); ++i) {
      if (settled[i]) continue;
      const std::optional<std::string> now = peek(*store_, aliveKey(owners[i]));
      if (!now) {
        settled[i] = true;  // its lease ran out while we watched
      } else if (*now != *first[i]) {
        settled[i] = alive[i] = true;
      } else {
        open = true;
      }
    }
    if (!open || Clock::now() >= until) return alive;
    std::this_thread::sleep_for(milliseconds(100));
  }
}

void NodeSlot::claimWanted() {
  const int slot = options_.wantedSlot;
  const std::string key = ownerKey(slot);
  // Bounded: each round either claims, refuses, or saw the slot change hands
  // to a newcomer, which the next round judges.
  for (int round = 0; round < 5; ++round) {
    std::string owner = comm::toString(store_->compareSet(key, {}, comm::toBytes(id_)));
    if (owner == id_) {
      slot_ = slot;
      return;
    }
    if (liveness({owner}).front()) {
      throw InvalidArgument("refused: --node-rank " + std::to_string(slot) +
                            " is taken: the tessera-run of node " + std::to_string(slot) + " is alive (launcher " +
                            owner + ", its liveness record in " + options_.storeName + " moves); stop that "
                            "tessera-run first, give another --node-rank, or leave --node-rank out to take a free "
                            "slot");
    }
    // Its launcher is dead: take the slot over, unless another newcomer just did.
    if (comm::toString(store_->compareSet(key, comm::toBytes(owner), comm::toBytes(id_))) == id_) {
      say("node " + std::to_string(slot) + ": took over the slot from launcher " + owner + ", which is gone");
      slot_ = slot;
      return;
    }
  }
  throw StoreError("--node-rank " + std::to_string(options_.wantedSlot) +
                   ": the slot kept changing hands between launchers; is another tessera-run starting with the "
                   "same --node-rank?");
}

void NodeSlot::claimFree() {
  for (int round = 0; round < 5; ++round) {
    std::vector<std::string> owners;
    std::vector<int> owned;
    int firstUnclaimed = -1;
    for (int slot = 0; slot < options_.maxNodes; ++slot) {
      if (std::optional<std::string> owner = peek(*store_, ownerKey(slot))) {
        owners.push_back(*owner);
        owned.push_back(slot);
      } else if (firstUnclaimed < 0) {
        firstUnclaimed = slot;
      }
    }
    if (firstUnclaimed >= 0) {
      if (comm::toString(store_->compareSet(ownerKey(firstUnclaimed), {}, comm::toBytes(id_))) == id_) {
        slot_ = firstUnclaimed;
        return;
      }
      continue;  // another newcomer was faster: look again
    }
    const std::vector<bool> alive = liveness(owners);
    int live = 0;
    std::string liveSlots;
    for (size_t i = 0; i < owners.size(); ++i) {
      if (!alive[i]) {
        if (comm::toString(store_->compareSet(ownerKey(owned[i]), comm::toBytes(owners[i]), comm::toBytes(id_))) ==
            id_) {
          say("node " + std::to_string(owned[i]) + ": took over the slot from launcher " + owners[i] +
              ", which is gone");
          slot_ = owned[i];
          return;
        }
        continue;
      }
      ++live;
      liveSlots += (liveSlots.empty() ? "" : ", ") + std::to_string(owned[i]);
    }
    if (live >= options_.maxNodes) {
      throw InvalidArgument("refused: the job already has " + std::to_string(live) +
                            " live nodes, its maximum (--nnodes " + std::to_string(options_.minNodes) + ":" +
                            std::to_string(options_.maxNodes) + "; slots " + liveSlots +
                            " are held by live tessera-runs in " + options_.storeName +
                            "); stop a node first, or start the job again with a larger MAX");
    }
  }
  throw StoreError("no slot could be claimed: the free slots kept being taken by other launchers starting at "
                   "the same time; start this node again");
}

void NodeSlot::beatLoop() {
  comm::StorePtr store;
  bool unreachable = false;
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, kBeat, [this] { return stopping_; });
    if (stopping_) return;
    lock.unlock();
    std::optional<std::string> lostWhy;
    try {
      if (!store) store = connect_();
      if (lease_ != 0) {
        try {
          store->keepAlive(lease_);
        } catch (const StoreError&) {
          // The lease ran out (an outage longer than its ttl): a new one, and
          // the claim below says whether the slot is still ours.
          lease_ = store->grantLease(kLeaseTtl);
        }
      }
      writeAlive(*store);
      const std::optional<std::string> owner = peek(*store, ownerKey(slot_));
      if (owner != id_) {
        lostWhy = "node " + std::to_string(slot_) + " lost its slot: " +
                  (owner ? "launcher " + *owner + " took it over" : std::string("its claim vanished")) +
                  " while this tessera-run could not reach the store " + options_.storeName +
                  " for over " + seconds(kWatch) + "; stopping this node (start it again to rejoin)";
      }
      if (unreachable) say("liveness record resumed: the store is reachable again");
      unreachable = false;
    } catch (const std::exception& e) {
      store.reset();
      if (!unreachable) say(std::string("liveness record paused: ") + e.what() + "; retrying every beat");
      unreachable = true;
    }
    lock.lock();
    if (lostWhy && !lost_) lost_ = lostWhy;
  }
}

}  // namespace tessera::launcher
