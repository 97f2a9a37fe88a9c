// Checkpoint storage layer: every dtype round-trips bit for bit, pieces
// written by several ranks (replicated, duplicated, sliced) load on another
// world size, saves are asynchronous snapshots, commits are atomic under a
// killed writer and a full disk, and corrupt or mismatched checkpoints fail
// with errors that name the file, the tensor and what is wrong. References
// are formulas written out here (valuesOf), never the code under test; the
// h5py check reads the files with another HDF5 reader (read_with_h5py.py).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <hdf5.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/error.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"

namespace tessera::checkpoint {
namespace {

namespace fs = std::filesystem;

// The value of every element of the test tensors, by name (read_with_h5py.py
// has the same table in numpy).
at::Tensor valuesOf(const std::string& name, const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const at::Tensor i = at::arange(n, at::kDouble);
  const at::Tensor il = at::arange(n, at::kLong);
  at::Tensor v;
  if (name == "model/f32") v = (i * 0.25 - 1.5).to(at::kFloat);
  else if (name == "model/f64") v = i / 3.0;
  else if (name == "model/bf16") v = ((i - 8) * 0.5).to(at::kBFloat16);
  else if (name == "model/f16") v = (i * 0.125 - 1).to(at::kHalf);
  else if (name == "optim/i64") v = il * 1000000007 - 5;
  else if (name == "optim/i32") v = (il * -3).to(at::kInt);
  else if (name == "optim/u8") v = ((il * 7) % 256).to(at::kByte);
  else if (name == "model/big") v = ((il % 1000).to(at::kDouble) * 0.5 - 7).to(at::kFloat);
  else if (name == "optim/i8") v = ((il * 5) % 256 - 128).to(at::kChar);
  else if (name == "optim/i16") v = (il * 301 - 20000).to(at::kShort);
  else if (name == "optim/mask") v = (il % 3) == 0;
  else if (name == "optim/scalar") v = at::full({}, 42.5, at::kDouble).reshape({n});
  else if (name == "optim/empty") v = at::empty({0}, at::kFloat);
  // Sharded-save tensors.
  else if (name == "model/w") v = (i * 0.5 + 1).to(at::kFloat);
  else if (name == "model/bias") v = (i - 3).to(at::kFloat);
  else if (name == "optim/m") v = (i * -0.25).to(at::kBFloat16);
  else if (name == "optim/split") v = il * 11;
  // Format-2 slices for the h5py check.
  else if (name == "model/w2d") v = (i * 0.75 - 9).to(at::kFloat);
  else if (name == "optim/cube") v = (il * 7 - 100).to(at::kInt);
  else if (name == "model/wide") v = ((il % 1000).to(at::kDouble) * 0.5 - 7).to(at::kFloat);
  else throw Error("valuesOf: no formula for " + name);
  return v.reshape(shape).contiguous();
}

const std::map<std::string, std::vector<int64_t>>& everyDtypeShapes() {
  static const std::map<std::string, std::vector<int64_t>> shapes = {
      {"model/f32", {3, 5}},    {"model/f64", {7}},        {"model/bf16", {4, 4}},   {"model/f16", {9}},
      {"optim/i64", {2, 3}},    {"optim/i32", {5}},        {"optim/u8", {300}},      {"model/big", {1100000}},
      {"optim/i8", {17}},       {"optim/i16", {6}},        {"optim/mask", {10}},     {"optim/scalar", {}},
      {"optim/empty", {0, 4}}};
  return shapes;
}

StateDict everyDtypeState() {
  StateDict state;
  for (const auto& [name, shape] : everyDtypeShapes()) state.putReplicated(name, valuesOf(name, shape));
  state.putMeta("step", int64_t{12});
  state.putMeta("config", std::string("[model]\nlayers = 2\n"));
  state.putMeta("lr", 0.1);
  return state;
}

std::vector<LoadRequest> wholeRequests(const StateDict& state) {
  std::vector<LoadRequest> requests;
  for (const auto& [name, t] : state.tensors) {
    requests.push_back(LoadRequest{name, t.globalShape, t.pieces.at(0).local.scalar_type()});
  }
  return requests;
}

std::string scratchDir(const std::string& what) {
  const std::string dir = (fs::temp_directory_path() / ("tessera-ckpt-" + what + "-" + std::to_string(::getpid()))).string();
  fs::remove_all(dir);
  return dir;
}

std::string readText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void writeText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

// The message of the CheckpointError `fn` throws; fails the test if none.
template <typename Fn>
std::string checkpointErrorOf(Fn&& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a CheckpointError";
  return "";
}

CheckpointOptions optionsFor(const std::string& dir, int level = 3) {
  CheckpointOptions o;
  o.dir = dir;
  o.zstdLevel = level;
  o.compressionThreads = 2;
  return o;
}

TEST(CheckpointFormat, EveryDtypeAndSubRangesRoundTripExactly) {
  for (int level : {0, 3}) {
    const std::string dir = scratchDir("dtypes" + std::to_string(level));
    const StateDict state = everyDtypeState();
    {
      Checkpointer ckpt(optionsFor(dir, level), comm::makeSingleRankCommunicator());
      ASSERT_TRUE(ckpt.save(12, state));
      ckpt.wait();
      EXPECT_EQ(ckpt.lastCommitted(), dir + "/step-00000012");
      EXPECT_GT(ckpt.lastStats().fileBytes, 0);
    }
    const CheckpointIndex index = readIndex(dir + "/step-00000012");
    EXPECT_EQ(index.formatVersion, kCheckpointFormatVersion);
    EXPECT_EQ(index.step, 12);
    EXPECT_EQ(index.worldSize, 1);
    EXPECT_EQ(index.tensors.at("model/bf16").dtype, "bfloat16");
    EXPECT_EQ(index.tensors.at("optim/u8").dtype, "uint8");
    EXPECT_EQ(index.tensors.at("model/big").pieces.size(), 1u);
    EXPECT_EQ(index.tensors.at("optim/empty").pieces.size(), 0u);

    const StateDict loaded = load(dir, wholeRequests(state));
    EXPECT_EQ(loaded.meta, state.meta);
    for (const auto& [name, shape] : everyDtypeShapes()) {
      testing::expectTensorsEqual(loaded.whole(name), valuesOf(name, shape), name + " (zstd level " + std::to_string(level) + ")");
    }
    // A range across the boundary of model/big's two chunks.
    const TensorSlice across = TensorSlice::flatRange({1100000}, 549990, 20);
    const StateDict part = load(dir, {LoadRequest{"model/big", {1100000}, at::kFloat, across}}, {});
    ASSERT_EQ(part.tensors.at("model/big").pieces.size(), 1u);
    EXPECT_EQ(part.tensors.at("model/big").pieces[0].slice, across);
    EXPECT_FALSE(part.tensors.at("model/big").replicated);
    testing::expectTensorsEqual(part.tensors.at("model/big").pieces[0].local,
                                valuesOf("model/big", {1100000}).narrow(0, 549990, 20), "range across two chunks");
    fs::remove_all(dir);
  }
}

// ---- Several ranks: slices, replicated and duplicated pieces -------------

// global shapes of the sharded-save tensors
const std::map<std::string, std::vector<int64_t>> kShardedShapes = {
    {"model/w", {8, 10}}, {"model/bias", {10}}, {"optim/m", {12}}, {"optim/split", {24}}};

// Rank r of 4: model/w as 4 flat slices of 20; model/bias replicated;
// optim/m held in halves by ranks {0,1} and again by {2,3} (hybrid FSDP);
// optim/split as two pieces per rank, [6r, 6r+2) and [6r+2, 6r+6).
StateDict shardedState(int rank) {
  StateDict state;
  auto flat = [](const std::string& name) { return valuesOf(name, kShardedShapes.at(name)).reshape({-1}); };
  StateTensor w{{8, 10}, {StatePiece{flat("model/w").narrow(0, 20 * rank, 20).clone(),
                                     TensorSlice::flatRange({8, 10}, 20 * rank, 20)}}, false};
  state.tensors["model/w"] = w;
  state.putReplicated("model/bias", valuesOf("model/bias", {10}));
  const int half = rank % 2;
  state.tensors["optim/m"] = StateTensor{
      {12}, {StatePiece{flat("optim/m").narrow(0, 6 * half, 6).clone(), TensorSlice::flatRange({12}, 6 * half, 6)}}, false};
  state.tensors["optim/split"] = StateTensor{
      {24},
      {StatePiece{flat("optim/split").narrow(0, 6 * rank, 2).clone(), TensorSlice::flatRange({24}, 6 * rank, 2)},
       StatePiece{flat("optim/split").narrow(0, 6 * rank + 2, 4).clone(), TensorSlice::flatRange({24}, 6 * rank + 2, 4)}},
      false};
  state.putMeta("mesh", std::string("dp=2,fsdp=2"));
  return state;
}

// This rank's share (part of parts) of every sharded tensor, checked against the formula.
void loadShareAndCheck(const std::string& path, int part, int parts) {
  std::vector<LoadRequest> requests;
  for (const auto& [name, shape] : kShardedShapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    requests.push_back(LoadRequest{name, shape, valuesOf(name, shape).scalar_type(),
                                   TensorSlice::flatRange(shape, n / parts * part, n / parts)});
  }
  const StateDict loaded = load(path, requests);
  TESSERA_CHECK(loaded.metaString("mesh") == "dp=2,fsdp=2", "meta lost");
  for (const LoadRequest& r : requests) {
    const StatePiece& piece = loaded.tensors.at(r.name).pieces.at(0);
    TESSERA_CHECK(piece.slice == *r.slice, "slice " << piece.slice.text() << " for " << r.slice->text());
    testing::expectTensorsEqual(piece.local.reshape({-1}),
                                valuesOf(r.name, r.globalShape).reshape({-1}).narrow(0, r.slice->flatOffset, r.slice->numel),
                                r.name + " part " + std::to_string(part) + "/" + std::to_string(parts));
  }
}

TESSERA_WORKER(ckpt_save_four_ranks) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  CheckpointOptions options = optionsFor(ctx.arg("dir"));
  options.compressionThreads = 1;
  Checkpointer ckpt(options, world);
  TESSERA_CHECK(ckpt.save(10, shardedState(world->rank())), "save skipped");
  ckpt.wait();
  if (world->rank() == 0) {
    const CheckpointIndex index = readIndex(ckpt.lastCommitted());
    TESSERA_CHECK_EQ(index.worldSize, 4);
    TESSERA_CHECK_EQ(index.tensors.at("model/w").pieces.size(), 4u);
    const auto& bias = index.tensors.at("model/bias").pieces;
    TESSERA_CHECK(bias.size() == 1 && bias[0].file == "rank-00000.h5", "replicated bias written by rank 0 only");
    const auto& m = index.tensors.at("optim/m").pieces;
    TESSERA_CHECK(m.size() == 2 && m[0].file == "rank-00000.h5" && m[1].file == "rank-00001.h5",
                  "duplicated halves of optim/m written once each, by ranks 0 and 1");
    TESSERA_CHECK_EQ(index.tensors.at("optim/split").pieces.size(), 8u);
  }
  loadShareAndCheck(ctx.arg("dir"), world->rank(), 4);  // the same layout back
  loadShareAndCheck(ctx.arg("dir"), world->rank() % 2, 2);  // as two ranks' halves
}

// Two ranks load halves of the 4-rank checkpoint and save them as 2 pieces.
TESSERA_WORKER(ckpt_reshard_to_two) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  const int rank = world->rank();
  loadShareAndCheck(ctx.arg("from"), rank, 2);
  StateDict state;
  for (const auto& [name, shape] : kShardedShapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const StateDict half = load(ctx.arg("from"), {LoadRequest{name, shape, valuesOf(name, shape).scalar_type(),
                                                              TensorSlice::flatRange(shape, n / 2 * rank, n / 2)}},
                                {});
    StateTensor t = half.tensors.at(name);
    t.replicated = false;
    state.tensors[name] = t;
  }
  state.meta = load(ctx.arg("from"), {}, {}).meta;
  CheckpointOptions options = optionsFor(ctx.arg("to"));
  options.compressionThreads = 1;
  Checkpointer ckpt(options, world);
  ckpt.save(20, state);
  ckpt.wait();
}

TEST(CheckpointFormat, ReshardsFourToTwoToOne) {
  const std::string four = scratchDir("four"), two = scratchDir("two");
  auto saved = testing::runWorkers("ckpt_save_four_ranks", {.ranks = 4, .args = {{"dir", four}}});
  ASSERT_TRUE(saved.ok()) << saved.report();
  auto resharded = testing::runWorkers("ckpt_reshard_to_two", {.ranks = 2, .args = {{"from", four}, {"to", two}}});
  ASSERT_TRUE(resharded.ok()) << resharded.report();
  EXPECT_EQ(readIndex(resolveCheckpoint(two)).tensors.at("model/w").pieces.size(), 2u);
  for (const std::string& dir : {four, two}) loadShareAndCheck(dir, 0, 1);
  fs::remove_all(four);
  fs::remove_all(two);
}

// ---- Asynchronous saves -----------------------------------------------

TEST(CheckpointAsync, SnapshotIsTakenAtSaveTime) {
  const std::string dir = scratchDir("async");
  at::Tensor weights = valuesOf("model/big", {1100000});
  StateDict state;
  state.putReplicated("model/big", weights);  // aliases `weights`
  ::setenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS", "300", 1);
  Checkpointer ckpt(optionsFor(dir), comm::makeSingleRankCommunicator());
  ASSERT_TRUE(ckpt.save(5, state));
  ::unsetenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS");
  EXPECT_EQ(ckpt.lastCommitted(), "") << "save() returned only after the commit: not asynchronous";
  weights.fill_(-1);  // training goes on while the writer runs
  ckpt.wait();
  testing::expectTensorsEqual(load(dir, {LoadRequest{"model/big", {1100000}, at::kFloat}}).whole("model/big"),
                              valuesOf("model/big", {1100000}), "values at save() time");
  fs::remove_all(dir);
}

// Rank 1 writes slowly; the second save() comes while the first is in
// flight: every rank skips it, the same way.
TESSERA_WORKER(ckpt_skip_when_busy) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  CheckpointOptions options = optionsFor(ctx.arg("dir"));
  options.skipWhenBusy = true;
  Checkpointer ckpt(options, world);
  // Each rank writes its half of model/big (one chunk each) and the replicated f32.
  StateDict state;
  state.putReplicated("model/f32", valuesOf("model/f32", {3, 5}));
  const int64_t half = 550000;
  state.tensors["model/big"] = StateTensor{
      {1100000},
      {StatePiece{valuesOf("model/big", {1100000}).narrow(0, half * world->rank(), half),
                  TensorSlice::flatRange({1100000}, half * world->rank(), half)}},
      false};
  if (world->rank() == 1) ::setenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS", "400", 1);
  const bool first = ckpt.save(1, state);
  ::unsetenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS");
  const bool second = ckpt.save(2, state);
  at::Tensor results = at::tensor({first ? 1L : 0L, second ? 1L : 0L}, at::kLong);
  at::Tensor all = at::empty({2 * world->size()}, at::kLong);
  world->allGather(results, all);
  for (int r = 0; r < world->size(); ++r) {
    TESSERA_CHECK(all[2 * r].item<int64_t>() == 1, "rank " << r << " did not take the first save");
    TESSERA_CHECK(all[2 * r + 1].item<int64_t>() == 0, "rank " << r << " did not skip the busy save");
  }
  ckpt.wait();
  TESSERA_CHECK(ckpt.save(3, state), "save after wait() skipped");
  ckpt.wait();
  TESSERA_CHECK(resolveCheckpoint(ctx.arg("dir")) == ctx.arg("dir") + "/step-00000003", "latest");
  TESSERA_CHECK(!std::filesystem::exists(ctx.arg("dir") + "/step-00000002"), "the skipped step was written");
}

TEST(CheckpointAsync, SkipWhenBusyIsTheSameOnEveryRank) {
  const std::string dir = scratchDir("skip");
  auto result = testing::runWorkers("ckpt_skip_when_busy", {.ranks = 2, .args = {{"dir", dir}}});
  ASSERT_TRUE(result.ok()) << result.report();
  fs::remove_all(dir);
}

// ---- Atomic commits ------------------------------------------------------

TEST(CheckpointCommit, KeepsTheLastKAndUpdatesLatest) {
  const std::string dir = scratchDir("keep");
  fs::create_directories(dir + "/.tmp-step-00000099");
  writeText(dir + "/.tmp-step-00000099/rank-00000.h5", "half a file");
  CheckpointOptions options = optionsFor(dir);
  options.keep = 2;
  Checkpointer ckpt(options, comm::makeSingleRankCommunicator());
  EXPECT_FALSE(fs::exists(dir + "/.tmp-step-00000099")) << "stale temp dir of a crashed save not removed";
  StateDict state;
  for (int64_t step : {100, 200, 300, 400}) {
    state.putReplicated("model/f32", valuesOf("model/f32", {3, 5}) + static_cast<double>(step));
    state.putMeta("step", step);
    ckpt.save(step, state);
    ckpt.wait();
    EXPECT_EQ(readText(dir + "/latest"), "step-" + std::string(step < 1000 ? "00000" : "") + std::to_string(step) + "\n");
  }
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-00000300", "step-00000400"}));
  const StateDict loaded = load(dir, {LoadRequest{"model/f32", {3, 5}, at::kFloat}});
  EXPECT_EQ(loaded.metaInt("step"), 400);
  testing::expectTensorsEqual(loaded.whole("model/f32"), valuesOf("model/f32", {3, 5}) + 400.0, "latest values");
  fs::remove_all(dir);
}

// Commits step 1, then dies (SIGKILL) in the middle of writing step 2.
TESSERA_WORKER(ckpt_killed_while_writing) {
  at::set_num_threads(1);
  const std::string dir = ctx.arg("dir");
  Checkpointer ckpt(optionsFor(dir), comm::makeSingleRankCommunicator());
  StateDict state;
  state.putReplicated("model/f32", valuesOf("model/f32", {3, 5}));
  ckpt.save(1, state);
  ckpt.wait();
  state.putReplicated("model/big", valuesOf("model/big", {1100000}));
  ::setenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS", "2000", 1);
  ckpt.save(2, state);
  const std::string partial = dir + "/.tmp-step-00000002/rank-00000.h5";
  for (int i = 0; i < 1000 && !std::filesystem::exists(partial); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  TESSERA_CHECK(std::filesystem::exists(partial), "the writer never started");
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::raise(SIGKILL);
}

TEST(CheckpointCommit, KilledWriterLeavesThePreviousCheckpoint) {
  const std::string dir = scratchDir("crash");
  auto result = testing::runWorkers("ckpt_killed_while_writing", {.ranks = 1, .args = {{"dir", dir}}});
  ASSERT_EQ(result.exitCodes.size(), 1u);
  ASSERT_EQ(result.exitCodes[0], 128 + SIGKILL) << result.report();
  EXPECT_TRUE(fs::exists(dir + "/.tmp-step-00000002")) << "killed before its write began";
  EXPECT_FALSE(fs::exists(dir + "/step-00000002"));
  EXPECT_EQ(readText(dir + "/latest"), "step-00000001\n");
  const StateDict loaded = load(dir, {LoadRequest{"model/f32", {3, 5}, at::kFloat}});
  testing::expectTensorsEqual(loaded.whole("model/f32"), valuesOf("model/f32", {3, 5}), "step 1 after the crash");
  {
    Checkpointer again(optionsFor(dir), comm::makeSingleRankCommunicator());  // a restarted job
    EXPECT_FALSE(fs::exists(dir + "/.tmp-step-00000002"));
  }
  fs::remove_all(dir);
}

// Rank 1's disk "fills up" (fault injection) while writing step 2.
TESSERA_WORKER(ckpt_disk_full) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  const std::string dir = ctx.arg("dir");
  Checkpointer ckpt(optionsFor(dir, 0), world);
  StateDict state = shardedState(world->rank());
  ckpt.save(1, state);
  ckpt.wait();
  auto expectDiskFull = [&](const std::string& message, const std::string& when) {
    TESSERA_CHECK(message.find("disk full: free space or lower checkpoint.keep") != std::string::npos &&
                      message.find("rank 1") != std::string::npos && message.find("rank-00001.h5") != std::string::npos &&
                      message.find("No space left on device") != std::string::npos,
                  when << ": error does not say that rank 1's disk is full: " << message);
  };
  if (world->rank() == 1) ::setenv("TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES", "40", 1);
  ckpt.save(2, state);
  ::unsetenv("TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES");
  const std::string message = checkpointErrorOf([&] { ckpt.wait(); });
  std::cout << "error: " << message << "\n";
  expectDiskFull(message, "wait()");
  TESSERA_CHECK(resolveCheckpoint(dir) == dir + "/step-00000001", "latest moved");
  TESSERA_CHECK(!std::filesystem::exists(dir + "/step-00000002") && !std::filesystem::exists(dir + "/.tmp-step-00000002"),
                "failed save left files");
  loadShareAndCheck(dir, world->rank(), 4);
  // The error of a failed save also surfaces at the next save(), on every rank.
  if (world->rank() == 1) ::setenv("TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES", "40", 1);
  ckpt.save(3, state);
  ::unsetenv("TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES");
  expectDiskFull(checkpointErrorOf([&] { ckpt.save(4, state); }), "next save()");
  TESSERA_CHECK(ckpt.save(5, state), "save after the error");  // space freed: works again
  ckpt.wait();
  TESSERA_CHECK(resolveCheckpoint(dir) == dir + "/step-00000005", "latest after recovery");
}

TEST(CheckpointCommit, FullDiskErrorOnEveryRankKeepsThePreviousCheckpoint) {
  const std::string dir = scratchDir("full");
  auto result = testing::runWorkers("ckpt_disk_full", {.ranks = 4, .args = {{"dir", dir}}});
  ASSERT_TRUE(result.ok()) << result.report();
  fs::remove_all(dir);
}

// A real full file system: a 1 MiB tmpfs (needs root and mount(2)).
TEST(CheckpointCommit, RealFullTmpfs) {
  if (::geteuid() != 0) GTEST_SKIP() << "not root: cannot mount a small tmpfs (the fault-injection test covers ENOSPC)";
  const std::string dir = scratchDir("tmpfs");
  fs::create_directories(dir);
  if (::mount("tmpfs", dir.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "mount -t tmpfs failed (" << std::strerror(errno) << "): the fault-injection test covers ENOSPC";
  }
  struct Unmount {  // also when an assertion or an exception leaves early
    std::string dir;
    ~Unmount() {
      ::umount(dir.c_str());
      fs::remove_all(dir);
    }
  } unmount{dir};
  {
    Checkpointer ckpt(optionsFor(dir + "/ckpt", 0), comm::makeSingleRankCommunicator());
    StateDict state;
    state.putReplicated("model/f32", valuesOf("model/f32", {3, 5}));
    ckpt.save(1, state);
    ckpt.wait();
    state.putReplicated("model/big", valuesOf("model/big", {1100000}));  // 4.4 MB: does not fit
    ckpt.save(2, state);
    const std::string message = checkpointErrorOf([&] { ckpt.wait(); });
    std::cout << "error: " << message << "\n";
    EXPECT_NE(message.find("disk full: free space or lower checkpoint.keep"), std::string::npos) << message;
    EXPECT_EQ(readText(dir + "/ckpt/latest"), "step-00000001\n");
    testing::expectTensorsEqual(load(dir + "/ckpt", {LoadRequest{"model/f32", {3, 5}, at::kFloat}}).whole("model/f32"),
                                valuesOf("model/f32", {3, 5}), "step 1 on the full disk");
  }
}

// ---- Corrupt and mismatched checkpoints -------------------------------

// Each kind of damage on a fresh checkpoint (one test: process start-up
// dominates a case's time).
class CheckpointCorruption : public ::testing::Test {
 public:
  void prepare(int level) {
    level_ = level;
    dir_ = scratchDir("corrupt");
    state_ = everyDtypeState();
    Checkpointer ckpt(optionsFor(dir_, level_), comm::makeSingleRankCommunicator());
    ckpt.save(7, state_);
    ckpt.wait();
    step_ = dir_ + "/step-00000007";
    shard_ = step_ + "/rank-00000.h5";
  }
  void cleanup() { fs::remove_all(dir_); }
  std::string loadError() {
    const std::string message = checkpointErrorOf([&] { load(dir_, wholeRequests(state_)); });
    std::cout << "error: " << message << "\n";
    return message;
  }

  int level_ = 3;
  std::string dir_, step_, shard_;
  StateDict state_;

  void flippedByteInCompressedData() {
    // Where HDF5 put the compressed first chunk of model/big.
    haddr_t address = HADDR_UNDEF;
    hsize_t bytes = 0;
    {
      const hid_t file = H5Fopen(shard_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
      const hid_t dataset = H5Dopen2(file, "model/big@0", H5P_DEFAULT);
      unsigned mask = 0;
      const hsize_t first = 0;
      ASSERT_GE(H5Dget_chunk_info_by_coord(dataset, &first, &mask, &address, &bytes), 0);
      H5Dclose(dataset);
      H5Fclose(file);
    }
    ASSERT_GT(bytes, 100u);
    std::fstream file(shard_, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(static_cast<std::streamoff>(address + bytes / 2));
    char c;
    file.get(c);
    file.seekp(static_cast<std::streamoff>(address + bytes / 2));
    file.put(static_cast<char>(c ^ 0x10));
    file.close();
    const std::string message = loadError();
    EXPECT_NE(message.find("rank-00000.h5"), std::string::npos) << message;
    EXPECT_NE(message.find("tensor model/big"), std::string::npos) << message;
  }

  void flippedByteInRawDataFailsTheChecksum() {
    // Find element 5000 of model/big in the uncompressed file and change it.
    const float needle[4] = {(5000 % 1000) * 0.5f - 7, (5001 % 1000) * 0.5f - 7, (5002 % 1000) * 0.5f - 7,
                             (5003 % 1000) * 0.5f - 7};
    std::string bytes = readText(shard_);
    const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(needle), sizeof needle));
    ASSERT_NE(at, std::string::npos);
    bytes[at + 1] ^= 0x01;
    std::ofstream(shard_, std::ios::binary | std::ios::trunc) << bytes;
    const std::string message = loadError();
    EXPECT_NE(message.find("checksum"), std::string::npos) << message;
    EXPECT_NE(message.find("rank-00000.h5"), std::string::npos) << message;
    EXPECT_NE(message.find("tensor model/big"), std::string::npos) << message;
  }

  void truncatedFile() {
    fs::resize_file(shard_, fs::file_size(shard_) / 2);
    const std::string message = loadError();
    EXPECT_NE(message.find(shard_), std::string::npos) << message;
    EXPECT_NE(message.find("tensor "), std::string::npos) << message;
  }

  void missingShardFile() {
    fs::remove(shard_);
    const std::string message = loadError();
    EXPECT_NE(message.find(shard_), std::string::npos) << message;
    EXPECT_NE(message.find("No such file"), std::string::npos) << message;
  }

  void futureFormatVersion() {
    std::string index = readText(step_ + "/index.json");
    const size_t at = index.find("\"format_version\": 2");
    ASSERT_NE(at, std::string::npos) << index.substr(0, 300);
    index.replace(at, std::strlen("\"format_version\": 2"), "\"format_version\": 3");
    writeText(step_ + "/index.json", index);
    const std::string message = loadError();
    EXPECT_NE(message.find(step_ + "/index.json"), std::string::npos) << message;
    EXPECT_NE(message.find("format version 3"), std::string::npos) << message;
    EXPECT_NE(message.find("reads versions 1 to 2"), std::string::npos) << message;
    EXPECT_NE(message.find("newer tessera"), std::string::npos) << message;
  }

  void anotherModelListsEveryMismatch() {
    std::vector<LoadRequest> requests = {
        LoadRequest{"model/a", {2}, at::kFloat}, LoadRequest{"model/b", {2}, at::kFloat},
        LoadRequest{"model/f32", {5, 3}, at::kFloat},   // shape
        LoadRequest{"model/f64", {7}, at::kFloat}};     // dtype
    const std::string message = checkpointErrorOf([&] { load(dir_, requests); });
    std::cout << "error: " << message << "\n";
    EXPECT_NE(message.find("checkpoint " + step_ + " does not fit this model: missing model/a, model/b; unexpected "
                           "model/bf16, model/big, model/f16"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("shape mismatch model/f32: checkpoint [3, 5] vs model [5, 3]"), std::string::npos) << message;
    EXPECT_NE(message.find("dtype mismatch model/f64: checkpoint float64 vs model float32"), std::string::npos) << message;
    EXPECT_EQ(message.find("optim/"), std::string::npos) << "optim/ is not strict: " << message;
  }
};

TEST_F(CheckpointCorruption, EveryKindOfDamageIsNamed) {
  const std::vector<std::tuple<const char*, void (CheckpointCorruption::*)(), int>> cases = {
      {"FlippedByteInCompressedData", &CheckpointCorruption::flippedByteInCompressedData, 3},
      {"FlippedByteInRawDataFailsTheChecksum", &CheckpointCorruption::flippedByteInRawDataFailsTheChecksum, 0},
      {"TruncatedFile", &CheckpointCorruption::truncatedFile, 3},
      {"MissingShardFile", &CheckpointCorruption::missingShardFile, 3},
      {"FutureFormatVersion", &CheckpointCorruption::futureFormatVersion, 3},
      {"AnotherModelListsEveryMismatch", &CheckpointCorruption::anotherModelListsEveryMismatch, 3},
  };
  for (const auto& [name, method, level] : cases) {
    SCOPED_TRACE(name);
    prepare(level);
    (this->*method)();
    cleanup();
  }
  const std::string message = checkpointErrorOf([&] { resolveCheckpoint("/nonexistent/ckpt"); });
  EXPECT_NE(message.find("no checkpoint at /nonexistent/ckpt"), std::string::npos) << message;
}

// ---- Another reader: h5py (+ hdf5plugin) ------------------------------

// Format 2 pieces of every kind in one rank's file: a dim-1 slice (an N-D
// dataset of the box's shape), flat ranges of a box (1-D datasets), and a
// 3-D box split along its last dim (rows not contiguous in the tensor).
void addSlicedTensors(StateDict& state) {
  const auto piece = [&](const std::string& name, const std::vector<int64_t>& shape, const TensorSlice& s) {
    std::vector<at::indexing::TensorIndex> index;
    for (size_t d = 0; d < shape.size(); ++d) index.emplace_back(at::indexing::Slice(s.offsets[d], s.offsets[d] + s.sizes[d]));
    const at::Tensor box = valuesOf(name, shape).index(index).contiguous().reshape({-1});
    state.putPiece(name, shape, s, box.narrow(0, s.flatOffset, s.numel));
  };
  piece("model/w2d", {6, 8}, TensorSlice::box({0, 0}, {6, 4}));
  piece("model/w2d", {6, 8}, TensorSlice::box({0, 4}, {6, 4}).narrowFlat(0, 10));
  piece("model/w2d", {6, 8}, TensorSlice::box({0, 4}, {6, 4}).narrowFlat(10, 14));
  piece("optim/cube", {3, 4, 5}, TensorSlice::box({0, 0, 0}, {3, 4, 2}));
  piece("optim/cube", {3, 4, 5}, TensorSlice::box({0, 0, 2}, {3, 4, 3}));
  // Rows of 4.4 MB: chunks [1, 550000] at coordinates (r, 0) and (r, 550000).
  state.putReplicated("model/wide", valuesOf("model/wide", {2, 1100000}));
}

TEST(CheckpointFormat, H5pyReadsTheFiles) {
  const std::string dir = scratchDir("h5py");
  StateDict state = everyDtypeState();
  addSlicedTensors(state);
  {
    Checkpointer ckpt(optionsFor(dir), comm::makeSingleRankCommunicator());
    ckpt.save(3, state);
    ckpt.wait();
  }
  // tessera reads the slices back too.
  for (const auto& [name, shape] : std::map<std::string, std::vector<int64_t>>{{"model/w2d", {6, 8}},
                                                                               {"optim/cube", {3, 4, 5}}}) {
    testing::expectTensorsEqual(load(dir, {LoadRequest{name, shape, valuesOf(name, shape).scalar_type()}}, {}).whole(name),
                                valuesOf(name, shape), name);
  }
  const TensorSlice straddle = TensorSlice::box({1, 549990}, {1, 20});  // across row 1's two chunks
  testing::expectTensorsEqual(
      load(dir, {LoadRequest{"model/wide", {2, 1100000}, at::kFloat, straddle}}, {}).tensors.at("model/wide").pieces[0].local,
      valuesOf("model/wide", {2, 1100000}).narrow(0, 1, 1).narrow(1, 549990, 20), "model/wide across chunks");
  std::string python;
  for (const char* candidate : {"/usr/bin/python3", "/usr/local/bin/python3"}) {
    if (::access(candidate, X_OK) == 0) {
      python = candidate;
      break;
    }
  }
  if (python.empty()) GTEST_SKIP() << "no python3: install python3 python3-h5py python3-numpy python3-hdf5plugin";
  const std::string command = python + " " + TESSERA_CHECKPOINT_H5PY_SCRIPT + " " + dir + "/step-00000003 " +
                              TESSERA_H5ZSTD_PLUGIN_DIR + " 11 2>&1";  // 8 dtypes + 3 format-2 tensors
  const testing::ShellResult run = testing::runShell(command);
  const std::string& output = run.output;
  fs::remove_all(dir);
  if (run.exitedWith(77)) GTEST_SKIP() << output;
  ASSERT_TRUE(run.exitedWith(0)) << command << "\n" << output;
  std::cout << output;
}

}  // namespace
}  // namespace tessera::checkpoint
