// Private to the elastic mesh: helpers over member ids ("<slot>.<incarnation>")
// and membership records, shared by the decision protocol, the join path and
// the mesh. The records themselves (Membership, ElasticIdentity,
// ElasticConfig) are declared in include/tessera/parallel/elastic.h and
// defined in membership.cc.
#pragma once

#include <string>
#include <vector>

#include "tessera/parallel/elastic.h"

namespace tessera::parallel::elastic {

// Members ordered by (slot, incarnation): the leader is the first alive one.
// Throws InvalidArgument for an id that is not "<slot>.<incarnation>".
bool memberLess(const std::string& a, const std::string& b);
void sortMembers(std::vector<std::string>& members);

bool contains(const std::vector<std::string>& list, const std::string& item);
// "[a, b, c]", for logs and errors.
std::string joinList(const std::vector<std::string>& list);

// The "membership" event line of a committed decision (see elastic.h).
std::string membershipEvent(const Membership& decision);

}  // namespace tessera::parallel::elastic
