// DeviceMesh: the rank-order arithmetic and the per-axis communicators.
// The layout (which ranks share a group) is computed by the pure functions
// below and nowhere else; the constructor and flatten() only turn those
// groups into split() calls and check that the result agrees.
#include "tessera/parallel/device_mesh.h"

#include <algorithm>
#include <cstdint>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::parallel {
namespace {

constexpr const char* kAxisNames[kNumMeshAxes] = {"dp_replicate", "pp", "dp_shard", "ep", "tp"};

void checkRank(const MeshShape& shape, int rank) {
  TESSERA_CHECK_ARG(rank >= 0 && rank < shape.numRanks(),
                    "rank " << rank << " is outside the mesh " << shape.describe() << " of "
                            << shape.numRanks() << " ranks");
}

// Sorts axes into rank order and rejects repeats.
std::vector<MeshAxis> normalizedAxes(std::vector<MeshAxis> axes) {
  std::sort(axes.begin(), axes.end());
  const auto repeat = std::adjacent_find(axes.begin(), axes.end());
  TESSERA_CHECK_ARG(repeat == axes.end(), "mesh axis '" << toString(*repeat) << "' is listed twice");
  return axes;
}

std::string joinedAxisNames(const std::vector<MeshAxis>& axes, const char* separator) {
  std::string out;
  for (MeshAxis axis : axes) out += (out.empty() ? "" : separator) + std::string(toString(axis));
  return out;
}

}  // namespace

const char* toString(MeshAxis axis) {
  const int i = static_cast<int>(axis);
  return i >= 0 && i < kNumMeshAxes ? kAxisNames[i] : "?";
}

MeshAxis parseMeshAxis(const std::string& name) {
  for (MeshAxis axis : kMeshAxes) {
    if (name == toString(axis)) return axis;
  }
  throw InvalidArgument("unknown mesh axis '" + name + "': use one of dp_replicate, pp, dp_shard, ep, tp");
}

int MeshShape::degree(MeshAxis axis) const {
  switch (axis) {
    case MeshAxis::kDpReplicate: return dp_replicate;
    case MeshAxis::kPp: return pp;
    case MeshAxis::kDpShard: return dp_shard;
    case MeshAxis::kEp: return ep;
    case MeshAxis::kTp: return tp;
  }
  throw InvalidArgument("invalid MeshAxis value " + std::to_string(static_cast<int>(axis)));
}

int MeshShape::numRanks() const {
  int64_t product = 1;
  for (MeshAxis axis : kMeshAxes) product *= degree(axis);
  TESSERA_CHECK_ARG(product <= INT32_MAX, "mesh " << describe() << " has more than 2^31 ranks");
  return static_cast<int>(product);
}

std::string MeshShape::describe() const {
  // Field order (the order a config lists them in), not rank order.
  std::ostringstream out;
  out << "dp_replicate(" << dp_replicate << ") x dp_shard(" << dp_shard << ") x pp(" << pp << ") x ep(" << ep
      << ") x tp(" << tp << ")";
  return out.str();
}

void MeshShape::validate(int worldSize, const std::string& prefix) const {
  for (MeshAxis axis : kMeshAxes) {
    const int d = degree(axis);
    TESSERA_CHECK_CONFIG(d >= 1, prefix + toString(axis),
                         "degree of axis " << toString(axis) << " must be >= 1, got " << d
                                           << " (use 1 to leave the axis unused)");
  }
  const int64_t product = int64_t{dp_replicate} * dp_shard * pp * ep * tp;
  // The product is the section's problem, not one axis's: the field is the prefix itself ("parallel").
  const std::string section = !prefix.empty() && prefix.back() == '.' ? prefix.substr(0, prefix.size() - 1) : prefix;
  TESSERA_CHECK_CONFIG(product == worldSize, section,
                       describe() << " = " << product << " but the world has " << worldSize
                                  << " ranks; choose degrees whose product is " << worldSize);
}

std::string MeshCoordinates::describe() const {
  std::ostringstream out;
  for (MeshAxis axis : kMeshAxes) {
    out << (axis == kMeshAxes.front() ? "" : " ") << toString(axis) << "=" << (*this)[axis];
  }
  return out.str();
}

int axisStride(const MeshShape& shape, MeshAxis axis) {
  int stride = 1;
  for (int i = kNumMeshAxes - 1; i > static_cast<int>(axis); --i) stride *= shape.degree(kMeshAxes[i]);
  return stride;
}

MeshCoordinates coordinatesOf(const MeshShape& shape, int rank) {
  checkRank(shape, rank);
  MeshCoordinates c;
  for (MeshAxis axis : kMeshAxes) c[axis] = (rank / axisStride(shape, axis)) % shape.degree(axis);
  return c;
}

int rankOf(const MeshShape& shape, const MeshCoordinates& coordinates) {
  int rank = 0;
  for (MeshAxis axis : kMeshAxes) {
    const int c = coordinates[axis];
    TESSERA_CHECK_ARG(c >= 0 && c < shape.degree(axis), "coordinate " << toString(axis) << "=" << c
                                                                       << " is outside the mesh "
                                                                       << shape.describe());
    rank += c * axisStride(shape, axis);
  }
  return rank;
}

std::vector<int> axisGroup(const MeshShape& shape, MeshAxis axis, int rank) {
  return flattenedGroup(shape, {axis}, rank);
}

std::vector<int> flattenedGroup(const MeshShape& shape, const std::vector<MeshAxis>& axes, int rank) {
  const std::vector<MeshAxis> sorted = normalizedAxes(axes);
  MeshCoordinates c = coordinatesOf(shape, rank);
  for (MeshAxis axis : sorted) c[axis] = 0;
  // Enumerate the group's coordinates like an odometer, innermost axis
  // fastest: with axes in rank order this yields ascending ranks.
  std::vector<int> members;
  for (;;) {
    members.push_back(rankOf(shape, c));
    int i = static_cast<int>(sorted.size()) - 1;
    for (; i >= 0; --i) {
      if (++c[sorted[i]] < shape.degree(sorted[i])) break;
      c[sorted[i]] = 0;
    }
    if (i < 0) break;
  }
  return members;
}

std::vector<std::vector<int>> allGroups(const MeshShape& shape, const std::vector<MeshAxis>& axes) {
  std::vector<std::vector<int>> groups;
  std::vector<bool> seen(shape.numRanks(), false);
  for (int rank = 0; rank < shape.numRanks(); ++rank) {
    if (seen[rank]) continue;
    groups.push_back(flattenedGroup(shape, axes, rank));
    for (int member : groups.back()) seen[member] = true;
  }
  return groups;
}

// ---- DeviceMesh ------------------------------------------------------------

DeviceMesh::DeviceMesh(comm::CommPtr world, MeshShape shape) : world_(std::move(world)), shape_(shape) {
  TESSERA_CHECK_ARG(world_ != nullptr, "DeviceMesh needs a world communicator");
  shape_.validate(world_->size());
  coordinates_ = coordinatesOf(shape_, world_->rank());
  // Fixed order (rank order) on every rank: split() is collective.
  for (MeshAxis axis : kMeshAxes) {
    axisComms_[static_cast<int>(axis)] = makeGroup({axis}, toString(axis));
  }
}

comm::CommPtr DeviceMesh::makeGroup(const std::vector<MeshAxis>& axes, const std::string& name) {
  const std::vector<int> members = flattenedGroup(shape_, axes, rank());
  if (members.size() == 1) return comm::makeSingleRankCommunicator(world_->name() + "/" + name);
  // The group's first member names it (color); the position in the group,
  // which is ascending in rank, orders it (key).
  const int index = static_cast<int>(std::find(members.begin(), members.end(), rank()) - members.begin());
  comm::CommPtr group = world_->split(members.front(), index, name);
  TESSERA_CHECK_T(CommError, group != nullptr && group->size() == static_cast<int>(members.size()) &&
                                 group->rank() == index,
                  "split of group '" << name << "' on '" << world_->name() << "' returned "
                                     << (group ? std::to_string(group->size()) : std::string("no")) << " ranks (rank "
                                     << (group ? group->rank() : -1) << ") but the mesh expects "
                                     << members.size() << " (rank " << index << "); the world's split() is broken");
  return group;
}

const comm::CommPtr& DeviceMesh::comm(const std::string& name) const {
  auto it = flattened_.find(name);
  if (it != flattened_.end()) return it->second;
  for (MeshAxis axis : kMeshAxes) {
    if (name == toString(axis)) return comm(axis);
  }
  std::string known = "dp_replicate, pp, dp_shard, ep, tp";
  for (const auto& [groupName, group] : flattened_) known += ", " + groupName;
  throw InvalidArgument("the mesh has no group '" + name + "': known groups are " + known +
                        " (create flattened groups with DeviceMesh::flatten)");
}

bool DeviceMesh::hasGroup(const std::string& name) const {
  if (flattened_.count(name) != 0) return true;
  return std::find(std::begin(kAxisNames), std::end(kAxisNames), name) != std::end(kAxisNames);
}

const comm::CommPtr& DeviceMesh::flatten(const std::vector<MeshAxis>& axes, const std::string& name) {
  TESSERA_CHECK_ARG(!name.empty(), "a flattened mesh group needs a name (e.g. \"dp\")");
  TESSERA_CHECK_ARG(!hasGroup(name), "the mesh already has a group '" << name << "'; pick another name for the "
                                                                      << joinedAxisNames(axes, " x ") << " group");
  TESSERA_CHECK_ARG(!axes.empty(), "flatten('" << name << "') needs at least one axis");
  normalizedAxes(axes);  // rejects repeats before any communication
  comm::CommPtr group = makeGroup(axes, name);
  return flattened_.emplace(name, std::move(group)).first->second;
}

std::string DeviceMesh::describe() const {
  std::ostringstream out;
  out << "rank " << rank() << " of " << world_->size() << " at " << coordinates_.describe() << " in "
      << shape_.describe();
  return out.str();
}

}  // namespace tessera::parallel
