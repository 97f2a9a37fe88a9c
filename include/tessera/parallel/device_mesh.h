// DeviceMesh: the world's ranks arranged as a 5-axis grid, with one
// communicator per axis (and per flattened group of axes, e.g. "dp").
//
// A MeshShape (torchtitan's ParallelDims) says how many ways each kind of
// parallelism splits the world; pure functions map ranks to coordinates and
// back, so the layout is testable without processes; DeviceMesh turns the
// shape into communicators. It deliberately does not decide *what* runs on an
// axis (FSDP, TP, ... live in their own files and take a mesh by reference)
// and keeps no global state: there is no "current mesh" getter.
//
// Rank order (Megatron's RankGenerator, with the order fixed). Axes from
// outermost (slowest-varying) to innermost (fastest-varying):
//
//     dp_replicate, pp, dp_shard, ep, tp
//
//   rank = ((((r * PP + p) * DS + s) * EP + e) * TP + t)
//
// where (r, p, s, e, t) are the coordinates along dp_replicate, pp, dp_shard,
// ep, tp and (DR, PP, DS, EP, TP) the degrees; equivalently
// stride(tp) = 1, stride(ep) = TP, stride(dp_shard) = EP*TP,
// stride(pp) = DS*EP*TP, stride(dp_replicate) = PP*DS*EP*TP.
// Why this order:
// - tp innermost: tensor parallelism talks on every layer, so its ranks are
//   adjacent, i.e. on the same node and its fastest links (NVLink).
// - dp_replicate outermost: each replica is a contiguous block of ranks, so a
//   replica can be exactly one node's (or one island's) local group; DiLoCo
//   and the elastic mesh rely on that (a replica leaves or joins as a block).
//
// Worked example: 16 ranks, dp_replicate=2, pp=2, dp_shard=2, ep=1, tp=2
// (strides: dp_replicate 8, pp 4, dp_shard 2, ep 2, tp 1).
//
//   rank | dp_replicate pp dp_shard tp      rank | dp_replicate pp dp_shard tp
//   -----+---------------------------      -----+---------------------------
//     0  |      0        0     0     0        8  |      1        0     0     0
//     1  |      0        0     0     1        9  |      1        0     0     1
//     2  |      0        0     1     0       10  |      1        0     1     0
//     3  |      0        0     1     1       11  |      1        0     1     1
//     4  |      0        1     0     0       12  |      1        1     0     0
//     5  |      0        1     0     1       13  |      1        1     0     1
//     6  |      0        1     1     0       14  |      1        1     1     0
//     7  |      0        1     1     1       15  |      1        1     1     1
//
//   tp groups:           [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
//   dp_shard groups:     [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
//   pp groups:           [0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]
//   dp_replicate groups: [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
//   "dp" = dp_replicate x dp_shard: [0,2,8,10] [1,3,9,11] [4,6,12,14] [5,7,13,15]
//   replica 0 = ranks 0-7 (one 8-GPU node), replica 1 = ranks 8-15.
//
// Within a group, members are ordered by global rank, so a rank's index in an
// axis group equals its coordinate along that axis, and its index in a
// flattened group is its coordinates along those axes read as one number in
// mesh order (outermost first).
#pragma once

#include <array>
#include <map>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"

namespace tessera::parallel {

// The mesh axes, in rank order: outermost first, tp innermost.
enum class MeshAxis : int { kDpReplicate = 0, kPp, kDpShard, kEp, kTp };
constexpr int kNumMeshAxes = 5;
// Every axis in rank order (outermost first).
constexpr std::array<MeshAxis, kNumMeshAxes> kMeshAxes = {MeshAxis::kDpReplicate, MeshAxis::kPp,
                                                          MeshAxis::kDpShard, MeshAxis::kEp, MeshAxis::kTp};

// "dp_replicate", "pp", "dp_shard", "ep", "tp".
const char* toString(MeshAxis axis);
// Inverse of toString; throws InvalidArgument naming the valid axis names.
MeshAxis parseMeshAxis(const std::string& name);

// How many ways each kind of parallelism splits the world. Field names are
// the axis names (and the config keys, "mesh.tp"), hence snake_case.
struct MeshShape {
  int dp_replicate = 1;  // data-parallel replicas holding full copies (DDP / DiLoCo islands); outermost
  int dp_shard = 1;      // data-parallel ranks sharding params/grads/optimizer state (FSDP, ZeRO-3)
  int pp = 1;            // pipeline stages
  int ep = 1;            // expert-parallel ranks (MoE experts split across them)
  int tp = 1;            // tensor-parallel ranks (Megatron column/row splits); innermost

  int degree(MeshAxis axis) const;
  // The product of every degree: the world size this shape needs.
  int numRanks() const;
  // "dp_replicate(2) x dp_shard(2) x pp(1) x ep(1) x tp(3)".
  std::string describe() const;
  // Throws ConfigError unless every degree is >= 1 and their product equals
  // worldSize. Fields are named prefix + axis ("parallel.tp"); a bad degree
  // names its axis and value, a product that misses names every factor and
  // the world size (field: the prefix without its dot, "mesh" or "parallel").
  void validate(int worldSize, const std::string& prefix = "mesh.") const;
};

// A rank's position along every axis; index with a MeshAxis.
struct MeshCoordinates {
  std::array<int, kNumMeshAxes> index{};

  int operator[](MeshAxis axis) const { return index[static_cast<int>(axis)]; }
  int& operator[](MeshAxis axis) { return index[static_cast<int>(axis)]; }
  bool operator==(const MeshCoordinates& other) const { return index == other.index; }
  bool operator!=(const MeshCoordinates& other) const { return index != other.index; }
  // "dp_replicate=0 pp=1 dp_shard=0 ep=0 tp=1".
  std::string describe() const;
};

// --- Pure layout functions (no communication). Each throws InvalidArgument
// when a rank or coordinate is outside the shape; the shape itself must be
// valid (degrees >= 1).

// Distance in ranks between neighbours along `axis` (see the header comment).
int axisStride(const MeshShape& shape, MeshAxis axis);
MeshCoordinates coordinatesOf(const MeshShape& shape, int rank);
int rankOf(const MeshShape& shape, const MeshCoordinates& coordinates);
// The ranks that differ from `rank` only along `axis`, in coordinate order
// (rank itself included).
std::vector<int> axisGroup(const MeshShape& shape, MeshAxis axis, int rank);
// The ranks that differ from `rank` only along the given axes, in ascending
// rank order. The order in which `axes` are listed does not matter; an axis
// listed twice is an InvalidArgument; empty `axes` gives {rank}.
std::vector<int> flattenedGroup(const MeshShape& shape, const std::vector<MeshAxis>& axes, int rank);
// Every group flattenedGroup() forms over the world, ordered by first member.
// The groups partition the ranks 0 .. numRanks()-1.
std::vector<std::vector<int>> allGroups(const MeshShape& shape, const std::vector<MeshAxis>& axes);

// The communicators of one rank's mesh. Not copyable; pass it by reference.
// Thread-compatible: flatten() must not race with other calls.
class DeviceMesh {
 public:
  // Collective over `world`: every rank calls it with the same shape. Checks
  // the shape first (shape.validate(world->size()), so a bad shape fails on
  // every rank before any communication), then creates one communicator per
  // axis, in rank order, by world->split(): axes of degree 1 get a
  // single-rank communicator instead (no collective; every rank decides the
  // same because the shape is the same everywhere). Each child is named
  // world->name() + "/" + axis name. Throws ConfigError for a bad shape and
  // whatever split() throws (TimeoutError, CommError) when peers misbehave.
  DeviceMesh(comm::CommPtr world, MeshShape shape);
  DeviceMesh(const DeviceMesh&) = delete;
  DeviceMesh& operator=(const DeviceMesh&) = delete;
  DeviceMesh(DeviceMesh&&) = default;
  DeviceMesh& operator=(DeviceMesh&&) = default;

  const MeshShape& shape() const { return shape_; }
  const comm::CommPtr& world() const { return world_; }
  // This process's rank in the world.
  int rank() const { return world_->rank(); }
  const MeshCoordinates& coordinates() const { return coordinates_; }

  int coordinate(MeshAxis axis) const { return coordinates_[axis]; }
  int coordinate(const std::string& axis) const { return coordinate(parseMeshAxis(axis)); }
  int degree(MeshAxis axis) const { return shape_.degree(axis); }
  int degree(const std::string& axis) const { return degree(parseMeshAxis(axis)); }

  // This rank's group along `axis`; its rank() is coordinate(axis).
  const comm::CommPtr& comm(MeshAxis axis) const { return axisComms_[static_cast<int>(axis)]; }
  // An axis name ("tp") or a name given to flatten() ("dp"); throws
  // InvalidArgument listing the known names otherwise.
  const comm::CommPtr& comm(const std::string& name) const;

  // Collective over the world: every rank calls it with the same axes and
  // name, in the same order relative to other world collectives. Creates the
  // group of ranks that differ only along `axes` (see flattenedGroup), named
  // world->name() + "/" + name, reachable afterwards as comm(name). Throws
  // InvalidArgument when name is empty, an axis name, or already used, or
  // when `axes` is empty or repeats an axis.
  const comm::CommPtr& flatten(const std::vector<MeshAxis>& axes, const std::string& name);
  bool hasGroup(const std::string& name) const;

  // "rank 5 of 16 at dp_replicate=0 pp=1 dp_shard=0 ep=0 tp=1 in dp_replicate(2) x ...".
  std::string describe() const;

 private:
  comm::CommPtr makeGroup(const std::vector<MeshAxis>& axes, const std::string& name);

  comm::CommPtr world_;
  MeshShape shape_;
  MeshCoordinates coordinates_;
  std::array<comm::CommPtr, kNumMeshAxes> axisComms_;
  std::map<std::string, comm::CommPtr> flattened_;
};

}  // namespace tessera::parallel
