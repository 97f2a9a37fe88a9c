// DeviceMesh tests: the rank layout through the pure functions (the 16-rank
// worked example of device_mesh.h checked element by element, round trips and
// partitions for several shapes, validation messages), then real Gloo groups
// in 4- and 8-process runs, where an allGather of the global rank over each
// axis (and a flattened group) must return exactly the members the layout
// functions predict, in order.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "tessera/core/config.h"
#include "tessera/parallel/device_mesh.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

using Groups = std::vector<std::vector<int>>;

MeshShape shapeOf(int dpReplicate, int dpShard, int pp, int ep, int tp) {
  MeshShape shape;
  shape.dp_replicate = dpReplicate;
  shape.dp_shard = dpShard;
  shape.pp = pp;
  shape.ep = ep;
  shape.tp = tp;
  return shape;
}

// The worked example of device_mesh.h.
MeshShape workedExample() { return shapeOf(/*dp_replicate=*/2, /*dp_shard=*/2, /*pp=*/2, /*ep=*/1, /*tp=*/2); }

TEST(MeshLayout, WorkedExampleCoordinates) {
  // Rows of the header's table: rank -> (dp_replicate, pp, dp_shard, tp).
  const int table[16][4] = {{0, 0, 0, 0}, {0, 0, 0, 1}, {0, 0, 1, 0}, {0, 0, 1, 1}, {0, 1, 0, 0}, {0, 1, 0, 1},
                            {0, 1, 1, 0}, {0, 1, 1, 1}, {1, 0, 0, 0}, {1, 0, 0, 1}, {1, 0, 1, 0}, {1, 0, 1, 1},
                            {1, 1, 0, 0}, {1, 1, 0, 1}, {1, 1, 1, 0}, {1, 1, 1, 1}};
  const MeshShape shape = workedExample();
  ASSERT_EQ(shape.numRanks(), 16);
  for (int rank = 0; rank < 16; ++rank) {
    const MeshCoordinates c = coordinatesOf(shape, rank);
    EXPECT_EQ(c[MeshAxis::kDpReplicate], table[rank][0]) << "rank " << rank;
    EXPECT_EQ(c[MeshAxis::kPp], table[rank][1]) << "rank " << rank;
    EXPECT_EQ(c[MeshAxis::kDpShard], table[rank][2]) << "rank " << rank;
    EXPECT_EQ(c[MeshAxis::kEp], 0) << "rank " << rank;
    EXPECT_EQ(c[MeshAxis::kTp], table[rank][3]) << "rank " << rank;
    EXPECT_EQ(rankOf(shape, c), rank);
  }
  EXPECT_EQ(axisStride(shape, MeshAxis::kTp), 1);
  EXPECT_EQ(axisStride(shape, MeshAxis::kEp), 2);
  EXPECT_EQ(axisStride(shape, MeshAxis::kDpShard), 2);
  EXPECT_EQ(axisStride(shape, MeshAxis::kPp), 4);
  EXPECT_EQ(axisStride(shape, MeshAxis::kDpReplicate), 8);
}

TEST(MeshLayout, WorkedExampleGroups) {
  const MeshShape shape = workedExample();
  EXPECT_EQ(allGroups(shape, {MeshAxis::kTp}),
            (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(allGroups(shape, {MeshAxis::kDpShard}),
            (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(allGroups(shape, {MeshAxis::kPp}),
            (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(allGroups(shape, {MeshAxis::kDpReplicate}),
            (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  EXPECT_EQ(allGroups(shape, {MeshAxis::kEp}).size(), 16u);  // degree 1: every rank alone
  EXPECT_EQ(allGroups(shape, {MeshAxis::kDpReplicate, MeshAxis::kDpShard}),
            (Groups{{0, 2, 8, 10}, {1, 3, 9, 11}, {4, 6, 12, 14}, {5, 7, 13, 15}}));
  // A replica is a contiguous block of ranks (one node's local group).
  std::vector<int> replica0(8), replica1(8);
  std::iota(replica0.begin(), replica0.end(), 0);
  std::iota(replica1.begin(), replica1.end(), 8);
  EXPECT_EQ(allGroups(shape, {MeshAxis::kPp, MeshAxis::kDpShard, MeshAxis::kEp, MeshAxis::kTp}),
            (Groups{replica0, replica1}));
}

// Shapes of 1 to 32 ranks using every axis at least once.
std::vector<MeshShape> someShapes() {
  return {shapeOf(1, 1, 1, 1, 1), shapeOf(4, 1, 1, 1, 1), shapeOf(1, 1, 1, 1, 4), shapeOf(2, 1, 1, 1, 2),
          shapeOf(1, 2, 2, 1, 1), shapeOf(1, 1, 2, 2, 1), shapeOf(2, 2, 1, 1, 2), shapeOf(3, 1, 2, 1, 1),
          shapeOf(1, 3, 1, 2, 2), shapeOf(2, 2, 2, 2, 2), workedExample()};
}

TEST(MeshLayout, CoordinatesRoundTripForSeveralShapes) {
  for (const MeshShape& shape : someShapes()) {
    std::vector<MeshCoordinates> seen;
    for (int rank = 0; rank < shape.numRanks(); ++rank) {
      const MeshCoordinates c = coordinatesOf(shape, rank);
      for (MeshAxis axis : kMeshAxes) {
        ASSERT_GE(c[axis], 0) << shape.describe();
        ASSERT_LT(c[axis], shape.degree(axis)) << shape.describe();
      }
      ASSERT_EQ(rankOf(shape, c), rank) << shape.describe() << " at " << c.describe();
      ASSERT_TRUE(std::find(seen.begin(), seen.end(), c) == seen.end()) << "duplicate " << c.describe();
      seen.push_back(c);
    }
  }
}

TEST(MeshLayout, GroupsPartitionTheWorld) {
  const std::vector<std::vector<MeshAxis>> axisSets = {
      {MeshAxis::kDpReplicate}, {MeshAxis::kPp}, {MeshAxis::kDpShard}, {MeshAxis::kEp}, {MeshAxis::kTp},
      {MeshAxis::kDpReplicate, MeshAxis::kDpShard}, {MeshAxis::kDpShard, MeshAxis::kEp},
      {MeshAxis::kPp, MeshAxis::kTp}, {kMeshAxes.begin(), kMeshAxes.end()}};
  for (const MeshShape& shape : someShapes()) {
    for (const auto& axes : axisSets) {
      int groupSize = 1;
      for (MeshAxis axis : axes) groupSize *= shape.degree(axis);
      std::vector<int> owner(shape.numRanks(), -1);
      const Groups groups = allGroups(shape, axes);
      ASSERT_EQ(static_cast<int>(groups.size()) * groupSize, shape.numRanks()) << shape.describe();
      for (size_t g = 0; g < groups.size(); ++g) {
        ASSERT_EQ(static_cast<int>(groups[g].size()), groupSize);
        ASSERT_TRUE(std::is_sorted(groups[g].begin(), groups[g].end()));
        for (int member : groups[g]) {
          ASSERT_EQ(owner[member], -1) << "rank " << member << " is in two groups of " << shape.describe();
          owner[member] = static_cast<int>(g);
          // Every member computes the same group.
          ASSERT_EQ(flattenedGroup(shape, axes, member), groups[g]);
        }
      }
    }
  }
}

TEST(MeshLayout, IndexInAxisGroupIsTheCoordinate) {
  for (const MeshShape& shape : someShapes()) {
    for (int rank = 0; rank < shape.numRanks(); ++rank) {
      for (MeshAxis axis : kMeshAxes) {
        const std::vector<int> group = axisGroup(shape, axis, rank);
        ASSERT_EQ(static_cast<int>(group.size()), shape.degree(axis));
        ASSERT_EQ(group[coordinatesOf(shape, rank)[axis]], rank) << shape.describe() << " axis " << toString(axis);
      }
    }
  }
}

TEST(MeshLayout, FlattenedGroupIgnoresAxisOrderAndRejectsRepeats) {
  const MeshShape shape = workedExample();
  EXPECT_EQ(flattenedGroup(shape, {MeshAxis::kDpShard, MeshAxis::kDpReplicate}, 5),
            flattenedGroup(shape, {MeshAxis::kDpReplicate, MeshAxis::kDpShard}, 5));
  EXPECT_EQ(flattenedGroup(shape, {}, 5), std::vector<int>{5});
  EXPECT_THROW(flattenedGroup(shape, {MeshAxis::kTp, MeshAxis::kTp}, 0), InvalidArgument);
  EXPECT_THROW(coordinatesOf(shape, 16), InvalidArgument);
  MeshCoordinates outside;
  outside[MeshAxis::kTp] = 2;
  EXPECT_THROW(rankOf(shape, outside), InvalidArgument);
}

TEST(MeshShapeValidate, ProductMismatchListsEveryFactor) {
  const MeshShape shape = shapeOf(2, 2, 1, 1, 3);
  try {
    shape.validate(16);
    FAIL() << "validate accepted a 12-rank shape for 16 ranks";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "mesh");
    EXPECT_NE(std::string(e.what()).find("dp_replicate(2) x dp_shard(2) x pp(1) x ep(1) x tp(3) = 12 but the world "
                                         "has 16 ranks"),
              std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(shape.validate(12));
}

TEST(MeshShapeValidate, NonPositiveDegreeNamesTheField) {
  MeshShape shape;
  shape.tp = 0;
  try {
    shape.validate(1);
    FAIL() << "validate accepted tp = 0";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "mesh.tp");
    EXPECT_NE(std::string(e.what()).find("got 0"), std::string::npos) << e.what();
  }
}

TEST(MeshAxisNames, ParseRoundTripsAndUnknownListsValidNames) {
  for (MeshAxis axis : kMeshAxes) EXPECT_EQ(parseMeshAxis(toString(axis)), axis);
  try {
    parseMeshAxis("cp");
    FAIL() << "parsed an unknown axis";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    for (MeshAxis axis : kMeshAxes) EXPECT_NE(what.find(toString(axis)), std::string::npos) << what;
  }
}

TEST(DeviceMeshSingleRank, EveryAxisIsAGroupOfOne) {
  DeviceMesh mesh(comm::makeSingleRankCommunicator("world"), MeshShape{});
  for (MeshAxis axis : kMeshAxes) {
    ASSERT_NE(mesh.comm(axis), nullptr);
    EXPECT_EQ(mesh.comm(axis)->size(), 1);
    EXPECT_EQ(mesh.comm(axis)->name(), std::string("world/") + toString(axis));
    EXPECT_EQ(mesh.coordinate(axis), 0);
    EXPECT_EQ(mesh.degree(toString(axis)), 1);
  }
  const auto& dp = mesh.flatten({MeshAxis::kDpReplicate, MeshAxis::kDpShard}, "dp");
  EXPECT_EQ(dp->name(), "world/dp");
  EXPECT_EQ(mesh.comm("dp"), dp);
  EXPECT_EQ(mesh.comm("tp"), mesh.comm(MeshAxis::kTp));
  auto t = at::ones({3});
  mesh.comm("dp")->allReduce(t);
  EXPECT_TRUE(t.equal(at::ones({3})));
}

TEST(DeviceMeshSingleRank, BadNamesAndShapesFailWithClearErrors) {
  EXPECT_THROW(DeviceMesh(comm::makeSingleRankCommunicator("world"), shapeOf(1, 1, 1, 1, 2)), ConfigError);
  DeviceMesh mesh(comm::makeSingleRankCommunicator("world"), MeshShape{});
  mesh.flatten({MeshAxis::kDpReplicate, MeshAxis::kDpShard}, "dp");
  EXPECT_THROW(mesh.flatten({MeshAxis::kPp}, "dp"), InvalidArgument);   // name taken
  EXPECT_THROW(mesh.flatten({MeshAxis::kPp}, "tp"), InvalidArgument);   // an axis name
  EXPECT_THROW(mesh.flatten({}, "none"), InvalidArgument);
  EXPECT_THROW(mesh.flatten({MeshAxis::kTp, MeshAxis::kTp}, "tptp"), InvalidArgument);
  try {
    mesh.comm("cp");
    FAIL() << "comm(\"cp\") did not throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("dp_shard"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("dp"), std::string::npos) << e.what();
  }
  EXPECT_THROW(mesh.coordinate("cp"), InvalidArgument);
}

// ---- Multi-process: real Gloo groups --------------------------------------

// Checks that an allGather of the global rank over `group` returns `expected`.
void expectMembers(const comm::CommPtr& group, const std::vector<int>& expected, int globalRank,
                   const std::string& what) {
  TESSERA_CHECK(group->size() == static_cast<int>(expected.size()),
                what << ": group '" << group->name() << "' has " << group->size() << " ranks, expected "
                     << expected.size());
  auto mine = at::full({1}, globalRank, at::kLong);
  auto all = at::empty({group->size()}, at::kLong);
  group->allGather(mine, all);
  auto want = at::tensor(std::vector<int64_t>(expected.begin(), expected.end()), at::kLong);
  testing::expectTensorsEqual(all, want, what + " members of '" + group->name() + "'");
}

std::vector<MeshAxis> parseAxisList(const std::string& text) {
  std::vector<MeshAxis> axes;
  size_t start = 0;
  while (start < text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    axes.push_back(parseMeshAxis(text.substr(start, comma - start)));
    start = comma + 1;
  }
  return axes;
}

TESSERA_WORKER(mesh_groups) {
  const MeshShape shape = shapeOf(std::stoi(ctx.arg("dp_replicate", "1")), std::stoi(ctx.arg("dp_shard", "1")),
                                  std::stoi(ctx.arg("pp", "1")), std::stoi(ctx.arg("ep", "1")),
                                  std::stoi(ctx.arg("tp", "1")));
  DeviceMesh mesh(ctx.world(), shape);
  for (MeshAxis axis : kMeshAxes) {
    const auto& group = mesh.comm(axis);
    TESSERA_CHECK(group->rank() == mesh.coordinate(axis),
                  toString(axis) << " group rank " << group->rank() << " != coordinate " << mesh.coordinate(axis));
    TESSERA_CHECK(group->name() == std::string("world/") + toString(axis), "unexpected name " << group->name());
    expectMembers(group, axisGroup(shape, axis, ctx.rank), ctx.rank, toString(axis));
  }
  const std::vector<MeshAxis> axes = parseAxisList(ctx.arg("flatten"));
  const auto& flat = mesh.flatten(axes, "flat");
  expectMembers(flat, flattenedGroup(shape, axes, ctx.rank), ctx.rank, "flattened");
  TESSERA_CHECK(mesh.comm("flat") == flat, "comm(\"flat\") is not the flattened group");
  // The groups are independent: a sum over tp after the flattened gather
  // still sees exactly the tp members.
  auto ones = at::ones({2}, at::kFloat);
  mesh.comm(MeshAxis::kTp)->allReduce(ones);
  testing::expectTensorsEqual(ones, at::full({2}, static_cast<float>(shape.tp)), "tp all-reduce of ones");
}

testing::RunResult runMesh(int ranks, std::map<std::string, std::string> args) {
  testing::RunOptions options;
  options.ranks = ranks;
  options.backend = "gloo";
  options.deadline = std::chrono::seconds(120);
  options.args = std::move(args);
  return testing::runWorkers("mesh_groups", options);
}

TEST(DeviceMeshGloo, FourRanksReplicateByTensor) {
  auto result = runMesh(4, {{"dp_replicate", "2"}, {"tp", "2"}, {"flatten", "dp_replicate,dp_shard"}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(DeviceMeshGloo, FourRanksPipelineByExpert) {
  auto result = runMesh(4, {{"pp", "2"}, {"ep", "2"}, {"flatten", "ep,pp"}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(DeviceMeshGloo, EightRanksReplicateShardTensor) {
  auto result = runMesh(8, {{"dp_replicate", "2"}, {"dp_shard", "2"}, {"tp", "2"},
                            {"flatten", "dp_replicate,dp_shard"}});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
