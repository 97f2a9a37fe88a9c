// Joining the elastic job: a founder is part of the start decision; a joiner
// waits to be admitted at an outer step and for its source to publish the
// recovery record "elastic/recovery/<joiner>/l<l>" (JSON: source, address of
// the source's StateSender, outer step, the admitting decision), which
// publishRecoverySource writes on the source's side.
#include <nlohmann/json.hpp>

#include <thread>

#include "parallel/elastic/membership.h"
#include "parallel/elastic/timing.h"
#include "tessera/core/logging.h"
#include "tessera/parallel/elastic.h"

namespace tessera::parallel {
namespace {

using Json = nlohmann::json;

std::string recoveryKey(const std::string& joiner, int localRank) {
  return "elastic/recovery/" + joiner + "/l" + std::to_string(localRank);
}

}  // namespace

std::optional<RecoveryTicket> ElasticMesh::join() {
  const Membership start = decideStart();
  if (!start.stop.empty()) throw Error("the elastic job stopped: " + start.stop);
  if (elastic::contains(start.members, me_)) {
    committed_ = start;
    if (identity_.localRank == 0) {
      store_->compareSet("elastic/membership", {}, comm::toBytes(start.toJson()));
      emit(elastic::membershipEvent(start));
      TESSERA_LOG(kInfo) << "elastic job started with nodes " << elastic::joinList(start.members);
    }
    return std::nullopt;
  }
  // A joiner: wait to be admitted and for the source to publish its sender.
  const std::string key = recoveryKey(me_, identity_.localRank);
  TESSERA_LOG(kInfo) << "node " << me_ << " joins a running job: waiting for the next outer step";
  const auto begin = elastic::Clock::now();
  while (true) {
    leaveIfRequested();
    try {
      if (store_->check({key})) {
        const Json j = Json::parse(store_->getString(key));
        RecoveryTicket ticket;
        ticket.source = j.at("source").get<std::string>();
        ticket.address = j.at("address").get<std::string>();
        ticket.outerStep = j.at("outer_step").get<int64_t>();
        ticket.decision = Membership::fromJson(j.at("decision").get<std::string>());
        return ticket;
      }
    } catch (const StoreError& e) {
      TESSERA_LOG(kWarn) << "waiting for admission: store error, retrying: " << e.what();
    } catch (const Json::exception& e) {
      throw Error(std::string("bad recovery record in the store: ") + e.what());
    }
    if (elastic::secondsSince(begin) > config_.join_timeout_s) {
      throw TimeoutError("node " + me_ + " was not admitted with a state source within join_timeout_s = " +
                         std::to_string(config_.join_timeout_s) + " s (is the job past its last outer step, or at max_nodes?)");
    }
    std::this_thread::sleep_for(elastic::kPoll * 5);
  }
}

void ElasticMesh::recovered(const RecoveryTicket& ticket) {
  committed_ = ticket.decision;
  dropGroup();
}

std::vector<std::string> ElasticMesh::joinersToServe() const {
  std::vector<std::string> out;
  for (const auto& [joiner, source] : committed_.joiners) {
    if (source == me_) out.push_back(joiner);
  }
  return out;
}

void ElasticMesh::publishRecoverySource(const std::string& member, const std::string& address) {
  Json j{{"source", me_},
         {"address", address},
         {"outer_step", committed_.outerStep},
         {"decision", committed_.toJson()}};
  store_->setString(recoveryKey(member, identity_.localRank), j.dump());
}

}  // namespace tessera::parallel
