// Checkpointer: snapshot in save(), write + agree + commit on a background
// thread. The order of one save (docs/checkpoint-format.md, "Commit"):
//   save():      allReduce(max){busy, layout changed, bad state} on the training
//                comm -> wait or skip, rethrow the last error (the same on every
//                rank) -> [layout changed: allGather piece descriptors, pick the
//                lowest holder of each piece as its writer] -> parallel copy of
//                this rank's pieces into one reused host buffer -> hand off.
//   background:  rank 0 makes ROOT/.tmp-step-N -> barrier -> write + fsync own
//                file -> allGather of every rank's outcome and pieces (private
//                comm) -> rank 0: index.json, fsync, rename to ROOT/step-N, fsync
//                ROOT, `latest` via temp + rename, prune -> broadcast of the
//                result, so every rank reports the same success or error.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <tuple>
#include <unistd.h>

#include "checkpoint/file_ops.h"
#include "checkpoint/hdf5_shard.h"
#include "checkpoint/index_json.h"
#include "checkpoint/shard_write.h"
#include "tessera/core/config.h"
#include "tessera/core/logging.h"

namespace tessera::checkpoint {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

void CheckpointOptions::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(!dir.empty(), prefix + "dir", "must name the checkpoint root directory");
  TESSERA_CHECK_CONFIG(keep >= 1, prefix + "keep", "must be >= 1, got " << keep);
  TESSERA_CHECK_CONFIG(zstdLevel >= 0 && zstdLevel <= 19, prefix + "zstd_level",
                       "must be 0 (no compression) to 19, got " << zstdLevel);
  TESSERA_CHECK_CONFIG(compressionThreads >= 0, prefix + "compression_threads",
                       "must be >= 0 (0: hardware threads), got " << compressionThreads);
}

namespace {

double secondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Every rank's bytes, concatenated in rank order (two allGathers).
std::vector<std::string> allGatherStrings(comm::Communicator& comm, const std::string& mine) {
  at::Tensor length = at::full({1}, static_cast<int64_t>(mine.size()) + 1, at::kLong);
  at::Tensor lengths = at::empty({comm.size()}, at::kLong);
  comm.allGather(length, lengths);
  std::vector<int64_t> counts(comm.size());
  int64_t total = 0;
  for (int r = 0; r < comm.size(); ++r) total += counts[r] = lengths[r].item<int64_t>();
  at::Tensor input = at::empty({length.item<int64_t>()}, at::kByte);
  std::memcpy(input.data_ptr(), mine.data(), mine.size());
  input.data_ptr<uint8_t>()[mine.size()] = '\n';  // never empty: some backends dislike 0-byte sends
  at::Tensor output = at::empty({total}, at::kByte);
  comm.allGather(input, output, counts);
  std::vector<std::string> out;
  const char* base = reinterpret_cast<const char*>(output.data_ptr<uint8_t>());
  for (int r = 0, at = 0; r < comm.size(); at += static_cast<int>(counts[r]), ++r) {
    out.emplace_back(base + at, static_cast<size_t>(counts[r] - 1));
  }
  return out;
}

// root's string on every rank.
std::string broadcastString(comm::Communicator& comm, const std::string& mine, int root) {
  at::Tensor length = at::full({1}, static_cast<int64_t>(mine.size()) + 1, at::kLong);
  comm.broadcast(length, root);
  at::Tensor bytes = at::zeros({length.item<int64_t>()}, at::kByte);
  if (comm.rank() == root) std::memcpy(bytes.data_ptr(), mine.data(), mine.size());
  comm.broadcast(bytes, root);
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), bytes.numel() - 1);
}

// "name\t[0:4, 2:6] flat 3+5": identical on every rank holding the same slice.
std::string pieceKey(const std::string& name, const TensorSlice& slice) { return name + '\t' + slice.text(); }

// Copies many (dst, src, bytes) ranges on `threads` threads, split into
// segments so one big tensor still uses every thread.
void parallelCopy(std::vector<std::tuple<uint8_t*, const uint8_t*, size_t>> ranges, int threads) {
  constexpr size_t kSegment = 8 << 20;
  std::vector<std::tuple<uint8_t*, const uint8_t*, size_t>> segments;
  for (auto [dst, src, bytes] : ranges) {
    for (size_t at = 0; at < bytes; at += kSegment) segments.emplace_back(dst + at, src + at, std::min(kSegment, bytes - at));
  }
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next++; i < segments.size(); i = next++) {
      auto [dst, src, bytes] = segments[i];
      std::memcpy(dst, src, bytes);
    }
  };
  const int extra = std::min<int>(threads, static_cast<int>(segments.size())) - 1;
  std::vector<std::thread> helpers;
  for (int t = 0; t < extra; ++t) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
}

// What the background thread writes for one save.
struct SaveJob {
  int64_t step = 0;
  std::vector<SnapshotPiece> pieces;                   // this rank writes these
  std::map<std::string, std::pair<std::vector<int64_t>, std::string>> tensors;  // every local name: shape, dtype
  std::map<std::string, std::string> meta;
  WriteFaults faults;
  double blockedSeconds = 0;
};

struct SaveOutcome {
  std::string error;           // empty: committed
  std::string committedDir;
  SaveStats stats;
};

}  // namespace

struct Checkpointer::Impl {
  CheckpointOptions options;
  comm::CommPtr comm;          // training thread only
  comm::CommPtr writerComm;    // background thread only
  int threads = 1;

  // The snapshot: one host buffer reused by every save (its pages stay
  // mapped, so the copy runs at memcpy speed after the first save).
  std::unique_ptr<uint8_t[]> buffer;
  size_t bufferBytes = 0;

  // Writer choice per local piece, recomputed when the layout changes.
  size_t layoutHash = 0;
  bool haveLayout = false;
  std::set<std::string> piecesIWrite;

  std::mutex mutex;
  std::condition_variable changed;
  std::optional<SaveJob> job;        // handed to the background thread
  bool busy = false;                 // a save is in flight (queued or running)
  bool stopping = false;
  int64_t inFlightStep = -1;
  std::optional<std::string> pendingError;  // of the last completed save; thrown once
  std::string lastCommitted;
  SaveStats lastStats;
  std::thread worker;

  void waitIdle() {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return !busy; });
  }
  void throwPendingError() {
    std::optional<std::string> error;
    {
      std::lock_guard<std::mutex> lock(mutex);
      error.swap(pendingError);
    }
    if (error) throw CheckpointError(*error);
  }

  void run();
  SaveOutcome execute(SaveJob& job);
  std::string commit(const SaveJob& job, const std::vector<std::string>& reports, const std::string& tmpDir);
  void prune(const std::string& keepDir);
};

void Checkpointer::Impl::run() {
  while (true) {
    SaveJob current;
    {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return job.has_value() || stopping; });
      if (!job) return;
      current = std::move(*job);
      job.reset();
    }
    SaveOutcome outcome = execute(current);
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (outcome.error.empty()) {
        lastCommitted = outcome.committedDir;
      } else {
        pendingError = outcome.error;
      }
      lastStats = outcome.stats;
      busy = false;
    }
    changed.notify_all();
  }
}

SaveOutcome Checkpointer::Impl::execute(SaveJob& current) {
  SaveOutcome outcome;
  outcome.stats.step = current.step;
  outcome.stats.blockedSeconds = current.blockedSeconds;
  comm::Communicator& c = *writerComm;
  const std::string stepName = stepDirectoryName(current.step);
  const std::string tmpDir = options.dir + "/" + kTempPrefix + stepName;
  try {
    std::string localError;
    if (c.rank() == 0) {
      try {
        removeTree(tmpDir);
        makeDirectories(tmpDir);
      } catch (const std::exception& e) {
        localError = e.what();
      }
    }
    c.barrier();  // the directory exists before anyone writes into it

    const auto writeStart = Clock::now();
    json report = {{"error", ""}, {"pieces", json::array()}, {"tensors", json::object()}};
    for (const auto& [name, info] : current.tensors) report["tensors"][name] = {{"shape", info.first}, {"dtype", info.second}};
    if (localError.empty() && !current.pieces.empty()) {
      try {
        ShardWriteOptions writeOptions;
        writeOptions.zstdLevel = options.zstdLevel;
        writeOptions.threads = threads;
        writeOptions.faults = current.faults;
        const std::string fileName = shardFileName(c.rank());
        const ShardWriteResult written = writeShard(tmpDir + "/" + fileName, fileName, current.step, c.rank(), c.size(),
                                                    current.pieces, writeOptions);
        outcome.stats.bytes = written.bytes;
        outcome.stats.fileBytes = written.fileBytes;
        for (size_t i = 0; i < written.pieces.size(); ++i) {
          json piece = pieceToJson(written.pieces[i]);
          piece["tensor"] = current.pieces[i].tensor;
          report["pieces"].push_back(std::move(piece));
        }
      } catch (const std::exception& e) {
        localError = e.what();
      }
    }
    report["error"] = localError;
    outcome.stats.writeSeconds = secondsSince(writeStart);

    const auto commitStart = Clock::now();
    const std::vector<std::string> reports = allGatherStrings(c, report.dump());
    std::string result;
    if (c.rank() == 0) result = commit(current, reports, tmpDir);
    result = broadcastString(c, result, 0);
    outcome.stats.commitSeconds = secondsSince(commitStart);
    if (result.rfind("ok\n", 0) == 0) {
      outcome.committedDir = result.substr(3);
    } else {
      outcome.error = result.substr(result.find('\n') + 1);
    }
  } catch (const std::exception& e) {
    outcome.error = "checkpoint of step " + std::to_string(current.step) +
                    " failed: the ranks could not agree on it: " + e.what();
  }
  return outcome;
}

// Rank 0: everyone's outcome -> index + atomic rename, or the joint error.
// Returns "ok\n<dir>" or "error\n<message>".
std::string Checkpointer::Impl::commit(const SaveJob& current, const std::vector<std::string>& reports,
                                       const std::string& tmpDir) {
  const std::string stepName = stepDirectoryName(current.step);
  const std::string finalDir = options.dir + "/" + stepName;
  std::string errors;
  CheckpointIndex index;
  index.formatVersion = kCheckpointFormatVersion;
  index.step = current.step;
  index.worldSize = static_cast<int>(reports.size());
  index.meta = current.meta;
  try {
    for (size_t r = 0; r < reports.size(); ++r) {
      const json report = json::parse(reports[r]);
      const std::string error = report.at("error").get<std::string>();
      if (!error.empty()) errors += (errors.empty() ? "" : "; ") + ("rank " + std::to_string(r) + ": " + error);
      for (const auto& [name, info] : report.at("tensors").items()) {
        StoredTensor& t = index.tensors[name];
        const auto shape = info.at("shape").get<std::vector<int64_t>>();
        const auto dtype = info.at("dtype").get<std::string>();
        if (t.dtype.empty()) {
          t.globalShape = shape;
          t.dtype = dtype;
        } else if (shape != t.globalShape || (dtype != t.dtype && dtype != "?" && t.dtype != "?")) {
          errors += (errors.empty() ? "" : "; ") + ("tensor " + name + ": rank " + std::to_string(r) +
                                                    " has another shape or dtype (" + dtype + ") than a lower rank (" +
                                                    t.dtype + ")");
        } else if (t.dtype == "?") {
          t.dtype = dtype;
        }
      }
      for (const json& p : report.at("pieces")) {
        StoredTensor& t = index.tensors[p.at("tensor").get<std::string>()];
        t.pieces.push_back(pieceFromJson(p, kCheckpointFormatVersion, t.globalShape));
      }
    }
    if (errors.empty()) {
      // Every element of every tensor must be in some written piece: the
      // union of the pieces' slices covers it (each slice was written once,
      // by its lowest holder, so the pieces do not overlap; the union counts
      // an overlap once anyway).
      for (auto& [name, t] : index.tensors) {
        std::sort(t.pieces.begin(), t.pieces.end(), [](const StoredPiece& a, const StoredPiece& b) {
          return std::tie(a.slice.offsets, a.slice.flatOffset) < std::tie(b.slice.offsets, b.slice.flatOffset);
        });
        std::vector<TensorSlice> slices;
        for (const StoredPiece& p : t.pieces) slices.push_back(p.slice);
        int64_t numel = 1;
        for (int64_t d : t.globalShape) numel *= d;
        const Coverage coverage = coverageOf(t.globalShape, slices);
        if (coverage.covered < numel) {
          errors += (errors.empty() ? "" : "; ") +
                    ("tensor " + name + " " + shapeText(t.globalShape) + ": " + std::to_string(numel - coverage.covered) +
                     " of " + std::to_string(numel) + " elements, the first at " +
                     positionText(t.globalShape, coverage.firstMissing) + ", are held by no rank");
        }
        if (t.dtype == "?") errors += (errors.empty() ? "" : "; ") + ("tensor " + name + ": no rank knows its dtype");
      }
    }
    if (errors.empty()) {
      writeFileDurably(tmpDir + "/" + kIndexFileName, indexToJson(index));
      fsyncPath(tmpDir);
      // The same step saved again (after a resume): the old directory steps
      // aside under a name the constructor restores (not a .tmp- name, which
      // it deletes), and comes back if the new one cannot take its place.
      const std::string replaced = options.dir + "/" + kReplacedPrefix + stepName;
      bool movedOld = false;
      if (pathExists(finalDir)) {
        removeTree(replaced);
        renamePath(finalDir, replaced);
        movedOld = true;
      }
      try {
        renamePath(tmpDir, finalDir);
        fsyncPath(options.dir);
      } catch (...) {
        if (movedOld) renamePath(replaced, finalDir);
        throw;
      }
      removeTree(replaced);
      try {
        const std::string latestTmp = options.dir + "/" + kTempPrefix + kLatestFileName;
        writeFileDurably(latestTmp, stepName + "\n");
        renamePath(latestTmp, options.dir + "/" + kLatestFileName);
        fsyncPath(options.dir);
      } catch (const std::exception& e) {
        return "error\ncheckpoint of step " + std::to_string(current.step) + " is complete in " + finalDir +
               ", but " + options.dir + "/" + kLatestFileName + " could not be updated (" + e.what() +
               "); --resume " + finalDir + " loads it";
      }
      prune(finalDir);
      return "ok\n" + finalDir;
    }
  } catch (const std::exception& e) {
    errors += (errors.empty() ? "" : "; ") + std::string("rank 0 committing: ") + e.what();
  }
  removeTree(tmpDir);  // frees the space a failed save took (disk full)
  return "error\ncheckpoint of step " + std::to_string(current.step) + " was not saved (" + errors +
         "); the previous checkpoint and " + options.dir + "/" + kLatestFileName + " are unchanged";
}

// Removes step-* directories beyond the newest `keep` (by step), never keepDir.
void Checkpointer::Impl::prune(const std::string& keepDir) {
  std::vector<std::pair<int64_t, std::string>> steps;
  for (const std::string& name : listDirectory(options.dir)) {
    int64_t step;
    if (parseStepDirectoryName(name, &step) && isDirectory(options.dir + "/" + name)) steps.emplace_back(step, name);
  }
  std::sort(steps.rbegin(), steps.rend());
  for (size_t i = static_cast<size_t>(options.keep); i < steps.size(); ++i) {
    const std::string dir = options.dir + "/" + steps[i].second;
    if (dir == keepDir) continue;
    std::string error;
    if (!removeTree(dir, &error)) {
      TESSERA_LOG(kWarn) << "checkpoint: cannot remove old checkpoint " << error;
    }
  }
}

Checkpointer::Checkpointer(CheckpointOptions options, comm::CommPtr comm) : impl_(std::make_unique<Impl>()) {
  options.validate();
  TESSERA_CHECK_ARG(comm != nullptr, "Checkpointer needs a communicator (makeSingleRankCommunicator() for one process)");
  while (options.dir.size() > 1 && options.dir.back() == '/') options.dir.pop_back();
  impl_->options = options;
  impl_->comm = comm;
  impl_->threads = options.compressionThreads > 0 ? options.compressionThreads
                                                  : std::max(1u, std::thread::hardware_concurrency());
  std::string localError;
  try {
    makeDirectories(options.dir);
    if (::access(options.dir.c_str(), W_OK) != 0) throwFileError("cannot write into", options.dir, errno);
    if (comm->rank() == 0) {  // leftovers of saves that crashed
      for (const std::string& name : listDirectory(options.dir)) {
        if (name.rfind(kTempPrefix, 0) == 0) removeTree(options.dir + "/" + name);
        if (name.rfind(kReplacedPrefix, 0) == 0) {  // a re-save of this step crashed mid-commit
          const std::string original = options.dir + "/" + name.substr(std::string(kReplacedPrefix).size());
          if (pathExists(original)) {
            removeTree(options.dir + "/" + name);
          } else {
            renamePath(options.dir + "/" + name, original);
          }
        }
      }
    }
  } catch (const std::exception& e) {
    localError = e.what();
  }
  at::Tensor failed = at::full({1}, localError.empty() ? 0 : 1, at::kLong);
  comm->allReduce(failed, comm::ReduceOp::kMax);
  if (failed.item<int64_t>() != 0) {
    throw CheckpointError(localError.empty() ? "another rank cannot create or write " + options.dir + " (see its log)"
                                             : localError);
  }
  impl_->writerComm = comm->split(0, comm->rank(), "ckpt");
  // A rank's write may take long; the others wait for it in the agreement.
  impl_->writerComm->setTimeout(std::max<comm::Timeout>(comm->timeout(), std::chrono::hours(1)));
  impl_->worker = std::thread([impl = impl_.get()] { impl->run(); });
}

Checkpointer::~Checkpointer() {
  impl_->waitIdle();
  if (impl_->pendingError) {
    TESSERA_LOG(kError) << "checkpoint: " << *impl_->pendingError;
  }
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->changed.notify_all();
  impl_->worker.join();
}

bool Checkpointer::save(int64_t step, const StateDict& state) {
  Impl& s = *impl_;
  const auto start = Clock::now();
  // Local checks and the layout of this rank's pieces.
  std::string problem;
  std::string layout;
  try {
    for (const auto& [name, t] : state.tensors) {
      t.checkPieces(name);
      for (const StatePiece& p : t.pieces) {
        dtypeName(p.local.scalar_type(), name);
        if (p.slice.numel > 0) layout += pieceKey(name, p.slice) + "\n";
      }
    }
  } catch (const std::exception& e) {
    problem = e.what();
  }
  const size_t hash = std::hash<std::string>{}(layout);
  bool busy;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    busy = s.busy;
  }
  at::Tensor flags = at::tensor({busy ? 1L : 0L, (!s.haveLayout || hash != s.layoutHash) ? 1L : 0L,
                                 problem.empty() ? 0L : 1L}, at::kLong);
  s.comm->allReduce(flags, comm::ReduceOp::kMax);
  const auto flag = flags.accessor<int64_t, 1>();
  if (flag[2] != 0) {
    throw CheckpointError("cannot save step " + std::to_string(step) + ": " +
                          (problem.empty() ? "another rank's state is invalid (see its log)" : problem));
  }
  if (flag[0] != 0) {
    if (s.options.skipWhenBusy) {
      if (s.comm->rank() == 0) {
        TESSERA_LOG(kInfo) << "checkpoint: skipping step " << step << ": the save of step " << s.inFlightStep
                           << " is still being written (checkpoint.skip_when_busy)";
      }
      return false;
    }
    s.waitIdle();
  }
  s.throwPendingError();

  if (flag[1] != 0) {  // who writes what: the lowest rank holding each range
    const std::vector<std::string> layouts = allGatherStrings(*s.comm, layout);
    std::set<std::string> seen;
    s.piecesIWrite.clear();
    for (int r = 0; r < static_cast<int>(layouts.size()); ++r) {
      size_t begin = 0;
      while (begin < layouts[r].size()) {
        const size_t end = layouts[r].find('\n', begin);
        const std::string key = layouts[r].substr(begin, end - begin);
        if (seen.insert(key).second && r == s.comm->rank()) s.piecesIWrite.insert(key);
        begin = end + 1;
      }
    }
    s.layoutHash = hash;
    s.haveLayout = true;
  }

  // The snapshot: this rank's pieces, copied into the reused buffer.
  SaveJob job;
  job.step = step;
  job.meta = state.meta;
  job.faults = WriteFaults::fromEnvironment();
  size_t total = 0;
  std::vector<std::pair<const at::Tensor*, size_t>> sources;  // tensor, buffer offset
  for (const auto& [name, t] : state.tensors) {
    std::string dtype = "?";
    for (const StatePiece& p : t.pieces) {
      dtype = dtypeName(p.local.scalar_type(), name);
      if (p.slice.numel == 0 || !s.piecesIWrite.count(pieceKey(name, p.slice))) continue;
      job.pieces.push_back(SnapshotPiece{name, t.globalShape, p.local.scalar_type(), p.slice, nullptr});
      sources.emplace_back(&p.local, total);
      total += (p.local.numel() * p.local.element_size() + 63) / 64 * 64;
    }
    job.tensors[name] = {t.globalShape, dtype};
  }
  if (total > s.bufferBytes) {
    s.buffer.reset();
    s.buffer.reset(new uint8_t[total]);
    s.bufferBytes = total;
  }
  std::vector<std::tuple<uint8_t*, const uint8_t*, size_t>> ranges;
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& src = *sources[i].first;
    uint8_t* dst = s.buffer.get() + sources[i].second;
    job.pieces[i].data = dst;
    if (src.device().is_cpu() && src.is_contiguous()) {
      ranges.emplace_back(dst, static_cast<const uint8_t*>(src.data_ptr()), src.numel() * src.element_size());
    } else {  // device memory or strided: through ATen
      at::from_blob(dst, src.sizes(), at::TensorOptions().dtype(src.scalar_type())).copy_(src);
    }
  }
  parallelCopy(std::move(ranges), s.threads);
  job.blockedSeconds = secondsSince(start);
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.job = std::move(job);
    s.busy = true;
    s.inFlightStep = step;
  }
  s.changed.notify_all();
  return true;
}

void Checkpointer::wait() {
  impl_->waitIdle();
  impl_->throwPendingError();
}

std::string Checkpointer::lastCommitted() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->lastCommitted;
}

SaveStats Checkpointer::lastStats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->lastStats;
}

}  // namespace tessera::checkpoint
