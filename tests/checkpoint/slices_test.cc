// N-D slices (core/state.h TensorSlice) and checkpoint format 2: the overlap
// arithmetic against numpy-style indexing, a dim-1 (row-parallel) slice
// stored as one N-D dataset per rank, FSDP's flat ranges of such a slice,
// any saved layout loading into any other (FSDP degree, TP slices, whole),
// and the commit refusing a layout that leaves elements uncovered.
// References come from at::indexing on the full tensor (sliceOf below),
// never from forEachOverlap/copyOverlap, the code under test.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <hdf5.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/error.h"
#include "tests/harness/multiprocess.h"

namespace tessera::checkpoint {
namespace {

namespace fs = std::filesystem;
using at::indexing::Slice;

// The values of slice `s` of `full`, in the slice's element order, by plain
// tensor indexing: the box, flattened, narrowed to the flat range.
at::Tensor sliceOf(const at::Tensor& full, const TensorSlice& s) {
  std::vector<at::indexing::TensorIndex> index;
  for (size_t d = 0; d < s.sizes.size(); ++d) index.emplace_back(Slice(s.offsets[d], s.offsets[d] + s.sizes[d]));
  const at::Tensor box = s.sizes.empty() ? full.reshape({1}) : full.index(index);
  return box.contiguous().reshape({-1}).narrow(0, s.flatOffset, s.numel).contiguous();
}

// Global row-major index of every element of `s`, in its order.
at::Tensor globalIndices(const std::vector<int64_t>& shape, const TensorSlice& s) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return sliceOf(at::arange(n, at::kLong).reshape(shape), s);
}

// A random slice of a tensor of `shape`: a random box, often narrowed.
TensorSlice randomSlice(std::mt19937& rng, const std::vector<int64_t>& shape) {
  std::vector<int64_t> offsets, sizes;
  for (int64_t dim : shape) {
    const int64_t a = std::uniform_int_distribution<int64_t>(0, dim - 1)(rng);
    const int64_t b = std::uniform_int_distribution<int64_t>(a + 1, dim)(rng);
    offsets.push_back(a);
    sizes.push_back(b - a);
  }
  TensorSlice s = TensorSlice::box(offsets, sizes);
  if (rng() % 2) {
    const int64_t first = std::uniform_int_distribution<int64_t>(0, s.numel - 1)(rng);
    const int64_t count = std::uniform_int_distribution<int64_t>(1, s.numel - first)(rng);
    s = s.narrowFlat(first, count);
  }
  return s;
}

TEST(TensorSlice, OverlapsMatchIndexingForRandomBoxesAndFlatRanges) {
  std::mt19937 rng(42);
  const std::vector<std::vector<int64_t>> shapes = {{7}, {5, 6}, {3, 4, 5}, {2, 3, 2, 4}};
  int overlapping = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const std::vector<int64_t>& shape = shapes[trial % shapes.size()];
    const TensorSlice a = randomSlice(rng, shape), b = randomSlice(rng, shape);
    const at::Tensor ia = globalIndices(shape, a), ib = globalIndices(shape, b);
    // Reference: the elements both hold, by global index.
    const at::Tensor common = at::isin(ia, ib);
    const at::Tensor values = at::arange(ia.numel(), at::kFloat) + 1000;  // a's values
    at::Tensor into = at::zeros({b.numel}, at::kFloat);
    const int64_t copied = copyOverlap(a, values, b, into);
    ASSERT_EQ(copied, common.sum().item<int64_t>()) << a.text() << " vs " << b.text();
    overlapping += copied > 0;
    EXPECT_EQ(overlapCount(a, b), copied);
    // Every element b holds that a also holds got a's value for that global index.
    for (int64_t k = 0; k < b.numel; ++k) {
      const at::Tensor where = (ia == ib[k]).nonzero();
      const float expected = where.numel() ? values[where[0][0]].item<float>() : 0.0f;
      ASSERT_EQ(into[k].item<float>(), expected) << a.text() << " -> " << b.text() << " element " << k;
    }
  }
  EXPECT_GT(overlapping, 50) << "too few overlapping pairs to test anything";
}

TEST(TensorSlice, CoverageCountsTheUnionAndNamesTheFirstGap) {
  const std::vector<int64_t> shape = {4, 6};
  const TensorSlice left = TensorSlice::box({0, 0}, {4, 3});
  const TensorSlice right = TensorSlice::box({0, 3}, {4, 3});
  EXPECT_EQ(coverageOf(shape, {left, right}).covered, 24);
  EXPECT_EQ(coverageOf(shape, {left, right}).firstMissing, -1);
  EXPECT_EQ(coverageOf(shape, {left, left, right}).covered, 24) << "a replica counts once";
  const Coverage partial = coverageOf(shape, {left, right.narrowFlat(0, 7)});  // right misses rows 2.1.. and 3
  EXPECT_EQ(partial.covered, 12 + 7);
  EXPECT_EQ(partial.firstMissing, 2 * 6 + 4);
  EXPECT_EQ(positionText(shape, partial.firstMissing), "[2, 4]");
}

// ---- Format 2 on 4 ranks: tp = rank / 2, fsdp = rank % 2 ------------------

const std::vector<int64_t> kShape = {6, 8};

at::Tensor full(const std::string& name) {
  const at::Tensor i = at::arange(48, at::kDouble).reshape(kShape);
  if (name == "model/col") return (i * 0.5 - 3).to(at::kFloat);      // dim-1 slice per tp rank
  if (name == "model/fsdp_of_tp") return (i * -0.25 + 1).to(at::kFloat);  // flat halves of each dim-1 slice
  if (name == "optim/rows") return (i * 3).to(at::kLong);             // dim-0 slice per rank
  throw Error("no formula for " + name);
}

// The slice rank r of 4 holds of each test tensor.
TensorSlice savedSlice(const std::string& name, int rank) {
  const int tp = rank / 2, fsdp = rank % 2;
  const TensorSlice column = TensorSlice::box({0, 4 * tp}, {6, 4});  // [:, 4tp:4tp+4]
  if (name == "model/col") return column;
  if (name == "model/fsdp_of_tp") return column.narrowFlat(12 * fsdp, 12);
  // optim/rows: rows [0, 1) [1, 3) [3, 4) [4, 6), whole rows.
  return TensorSlice::box({rank * 3 / 2, 0}, {(rank + 1) * 3 / 2 - rank * 3 / 2, 8});
}

StateDict savedState(int rank) {
  StateDict state;
  for (const char* name : {"model/col", "model/fsdp_of_tp", "optim/rows"}) {
    const TensorSlice s = savedSlice(name, rank);
    state.putPiece(name, kShape, s, sliceOf(full(name), s));
  }
  state.putMeta("mesh", std::string("tp=2,fsdp=2"));
  return state;
}

TESSERA_WORKER(slices_save_four_ranks) {
  at::set_num_threads(1);
  CheckpointOptions options;
  options.dir = ctx.arg("dir");
  options.compressionThreads = 1;
  const comm::CommPtr world = ctx.world();  // once: each call forms a new group (WorkerContext::world)
  Checkpointer ckpt(options, world);
  TESSERA_CHECK(ckpt.save(4, savedState(world->rank())), "save skipped");
  ckpt.wait();
}

TEST(CheckpointSlices, DimOneSlicesAndFlatRangesOfThemLoadIntoAnyLayout) {
  ASSERT_EQ(savedSlice("optim/rows", 3).offsets[0] + savedSlice("optim/rows", 3).sizes[0], 6);
  const std::string dir = (fs::temp_directory_path() / ("tessera-slices-" + std::to_string(::getpid()))).string();
  fs::remove_all(dir);
  auto saved = testing::runWorkers("slices_save_four_ranks", {.ranks = 4, .args = {{"dir", dir}}});
  ASSERT_TRUE(saved.ok()) << saved.report();

  const std::string step = resolveCheckpoint(dir);
  const CheckpointIndex index = readIndex(step);
  EXPECT_EQ(index.formatVersion, 2);
  // A dim-1 slice is one piece (one dataset) per tp rank, written once per fsdp pair.
  const auto& col = index.tensors.at("model/col").pieces;
  ASSERT_EQ(col.size(), 2u);
  EXPECT_EQ(col[0].slice, TensorSlice::box({0, 0}, {6, 4}));
  EXPECT_EQ(col[1].slice, TensorSlice::box({0, 4}, {6, 4}));
  EXPECT_EQ(col[0].file, "rank-00000.h5");
  EXPECT_EQ(col[1].file, "rank-00002.h5");
  EXPECT_EQ(index.tensors.at("model/fsdp_of_tp").pieces.size(), 4u);
  {  // the dataset has the box's shape: [6, 4], one dataset, not 6 rows
    const hid_t file = H5Fopen((step + "/" + col[1].file).c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    const hid_t dataset = H5Dopen2(file, col[1].dataset.c_str(), H5P_DEFAULT);
    ASSERT_GE(dataset, 0) << col[1].dataset;
    const hid_t space = H5Dget_space(dataset);
    hsize_t dims[2] = {0, 0};
    ASSERT_EQ(H5Sget_simple_extent_ndims(space), 2);
    H5Sget_simple_extent_dims(space, dims, nullptr);
    EXPECT_EQ(dims[0], 6u);
    EXPECT_EQ(dims[1], 4u);
    H5Sclose(space);
    H5Dclose(dataset);
    H5Fclose(file);
  }

  // Target layouts: whole; dim-0 halves; FSDP flat thirds of the whole
  // tensor (another degree); dim-1 quarters; flat ranges of a box that
  // straddles both saved columns.
  const std::vector<std::pair<std::string, std::vector<TensorSlice>>> layouts = {
      {"whole", {TensorSlice::whole(kShape)}},
      {"dim-0 halves", {TensorSlice::box({0, 0}, {3, 8}), TensorSlice::box({3, 0}, {3, 8})}},
      {"fsdp thirds", {TensorSlice::flatRange(kShape, 0, 16), TensorSlice::flatRange(kShape, 16, 16),
                       TensorSlice::flatRange(kShape, 32, 16)}},
      {"dim-1 quarters", {TensorSlice::box({0, 0}, {6, 2}), TensorSlice::box({0, 2}, {6, 2}),
                          TensorSlice::box({0, 4}, {6, 2}), TensorSlice::box({0, 6}, {6, 2})}},
      {"straddling box, flat", {TensorSlice::box({1, 2}, {4, 5}).narrowFlat(3, 11),
                                TensorSlice::box({1, 2}, {4, 5}).narrowFlat(14, 6)}},
  };
  for (const auto& [what, slices] : layouts) {
    for (const TensorSlice& s : slices) {
      for (const char* name : {"model/col", "model/fsdp_of_tp", "optim/rows"}) {
        const at::ScalarType dtype = full(name).scalar_type();
        const StateDict loaded = load(dir, {LoadRequest{name, kShape, dtype, s}}, {});
        EXPECT_EQ(loaded.metaString("mesh"), "tp=2,fsdp=2");
        const StatePiece& piece = loaded.tensors.at(name).pieces.at(0);
        EXPECT_EQ(piece.slice, s);
        EXPECT_EQ(piece.local.sizes().vec(), s.localShape()) << what;
        testing::expectTensorsEqual(piece.local.reshape({-1}), sliceOf(full(name), s),
                                    std::string(name) + " as " + what + " " + s.text());
      }
    }
  }
  fs::remove_all(dir);
}

// A layout that leaves elements to nobody is refused at commit, naming the
// first missing position; the previous checkpoint stays.
TEST(CheckpointSlices, CommitRefusesAnUncoveredBox) {
  const std::string dir = (fs::temp_directory_path() / ("tessera-gap-" + std::to_string(::getpid()))).string();
  fs::remove_all(dir);
  CheckpointOptions options;
  options.dir = dir;
  Checkpointer ckpt(options, comm::makeSingleRankCommunicator());
  StateDict state;
  const TensorSlice left = TensorSlice::box({0, 0}, {6, 4});
  const TensorSlice right = TensorSlice::box({0, 4}, {6, 4}).narrowFlat(0, 10);  // misses [2, 6] onwards
  state.putPiece("model/col", kShape, left, sliceOf(full("model/col"), left));
  state.putPiece("model/col", kShape, right, sliceOf(full("model/col"), right));
  ASSERT_TRUE(ckpt.save(1, state));
  try {
    ckpt.wait();
    FAIL() << "an uncovered tensor was committed";
  } catch (const CheckpointError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("tensor model/col [6, 8]: 14 of 48 elements, the first at [2, 6], are held by no rank"),
              std::string::npos)
        << message;
  }
  EXPECT_FALSE(fs::exists(dir + "/step-00000001"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tessera::checkpoint
