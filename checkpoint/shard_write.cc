#include "checkpoint/shard_write.h"

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <mutex>
#include <set>
#include <thread>

#include "checkpoint/file_ops.h"
#include "checkpoint/hdf5_shard.h"
#include "checkpoint/zstd_filter.h"

namespace tessera::checkpoint {

WriteFaults WriteFaults::fromEnvironment() {
  WriteFaults faults;
  if (const char* v = std::getenv("TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES")) faults.enospcAfterBytes = std::atoll(v);
  if (const char* v = std::getenv("TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS")) faults.delayMsPerChunk = std::atoi(v);
  return faults;
}

std::string pieceDatasetPath(const std::string& tensor, const TensorSlice& slice) {
  std::string path = tensor;
  while (!path.empty() && path.front() == '/') path.erase(path.begin());
  path += "@";
  if (slice.offsets.empty()) path += "0";
  for (size_t d = 0; d < slice.offsets.size(); ++d) path += (d ? "," : "") + std::to_string(slice.offsets[d]);
  if (!slice.isWholeBox()) path += "+" + std::to_string(slice.flatOffset);
  return path;
}

std::string xxh64Hex(uint64_t value) {
  char text[20];
  std::snprintf(text, sizeof text, "%016" PRIx64, value);
  return text;
}

namespace {

// One chunk of one piece: raw bytes [data, data + rawBytes), padded with
// zeros to paddedBytes (HDF5 stores edge chunks full-size).
struct ChunkTask {
  size_t piece = 0;
  size_t element = 1;      // bytes per element: > 1 is byte-shuffled before zstd
  int64_t index = 0;
  const uint8_t* data = nullptr;
  size_t rawBytes = 0;
  size_t paddedBytes = 0;
};

// Every chunk of every piece, in write order. Each chunk is a contiguous run
// of the piece's row-major bytes (ChunkGrid), padded to the chunk size.
std::vector<ChunkTask> planChunks(const std::vector<SnapshotPiece>& pieces, int64_t chunkBytes,
                                  std::vector<ChunkGrid>& grids) {
  std::vector<ChunkTask> tasks;
  grids.clear();
  for (size_t p = 0; p < pieces.size(); ++p) {
    const size_t element = c10::elementSize(pieces[p].dtype);
    grids.push_back(
        ChunkGrid::plan(pieceDatasetDims(pieces[p].slice, kCheckpointFormatVersion), element, chunkBytes));
    const ChunkGrid& grid = grids.back();
    const size_t padded = static_cast<size_t>(grid.chunkNumel()) * element;
    for (int64_t i = 0; i < grid.count(); ++i) {
      const ChunkGrid::Chunk c = grid.chunk(i);
      tasks.push_back({p, element, i, pieces[p].data + c.first * static_cast<int64_t>(element),
                       static_cast<size_t>(c.numel) * element, padded});
    }
  }
  return tasks;
}

// HDF5's shuffle filter (H5Z_FILTER_SHUFFLE): byte b of element i goes to
// b * elements + i. Groups the exponent bytes of floats, which zstd then
// compresses far better.
void byteShuffle(const uint8_t* src, size_t bytes, size_t element, std::vector<uint8_t>& out) {
  out.resize(bytes);
  const size_t elements = bytes / element;
  if (element == 4) {  // the common case (fp32), in a form the compiler vectorizes
    uint8_t* p0 = out.data();
    uint8_t *p1 = p0 + elements, *p2 = p1 + elements, *p3 = p2 + elements;
    for (size_t i = 0; i < elements; ++i) {
      uint32_t v;
      std::memcpy(&v, src + 4 * i, 4);
      p0[i] = static_cast<uint8_t>(v);
      p1[i] = static_cast<uint8_t>(v >> 8);
      p2[i] = static_cast<uint8_t>(v >> 16);
      p3[i] = static_cast<uint8_t>(v >> 24);
    }
    return;
  }
  for (size_t b = 0; b < element; ++b) {
    uint8_t* plane = out.data() + b * elements;
    for (size_t i = 0; i < elements; ++i) plane[i] = src[i * element + b];
  }
}

// Compresses chunks on worker threads at most `window` ahead of the writer,
// which takes them in order.
class CompressionPipeline {
 public:
  CompressionPipeline(const std::vector<ChunkTask>& tasks, int level, int threads)
      : tasks_(tasks), level_(level), window_(static_cast<size_t>(std::max(2, 2 * threads))), slots_(window_),
        sizes_(window_), ready_(window_, false) {
    for (int t = 0; t < threads; ++t) workers_.emplace_back([this] { work(); });
  }
  ~CompressionPipeline() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    for (auto& w : workers_) w.join();
  }

  // Blocks until chunk i (taken in order 0, 1, ...) is compressed.
  std::pair<const uint8_t*, size_t> take(size_t i) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return ready_[i % window_] || !error_.empty(); });
    if (!error_.empty()) throw CheckpointError("compressing a chunk: " + error_);
    return {slots_[i % window_].data(), sizes_[i % window_]};
  }
  // The writer is done with chunk i: its slot may be reused.
  void release(size_t i) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ready_[i % window_] = false;
      released_ = i + 1;
    }
    changed_.notify_all();
  }

 private:
  void work() {
    void* context = zstdNewContext();
    std::vector<uint8_t> padded, shuffled;
    while (true) {
      size_t i;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stop_ || (next_ < tasks_.size() && next_ < released_ + window_); });
        if (stop_) break;
        i = next_++;
      }
      const ChunkTask& task = tasks_[i];
      const uint8_t* src = task.data;
      if (task.rawBytes < task.paddedBytes) {
        padded.assign(task.paddedBytes, 0);
        std::memcpy(padded.data(), task.data, task.rawBytes);
        src = padded.data();
      }
      if (task.element > 1) {  // HDF5's shuffle filter, applied before zstd
        byteShuffle(src, task.paddedBytes, task.element, shuffled);
        src = shuffled.data();
      }
      std::vector<uint8_t> out;
      std::string error;
      size_t size = 0;
      {
        // Take the slot's old buffer to reuse its allocation.
        std::lock_guard<std::mutex> lock(mutex_);
        out.swap(slots_[i % window_]);
      }
      try {
        size = zstdCompressChunk(context, src, task.paddedBytes, level_, out);
      } catch (const std::exception& e) {
        error = e.what();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        slots_[i % window_].swap(out);
        sizes_[i % window_] = size;
        ready_[i % window_] = true;
        if (!error.empty()) error_ = error;
      }
      changed_.notify_all();
    }
    zstdFreeContext(context);
  }

  const std::vector<ChunkTask>& tasks_;
  const int level_;
  const size_t window_;
  std::vector<std::vector<uint8_t>> slots_;
  std::vector<size_t> sizes_;
  std::vector<bool> ready_;
  std::mutex mutex_;
  std::condition_variable changed_;
  size_t next_ = 0;
  size_t released_ = 0;
  bool stop_ = false;
  std::string error_;
  std::vector<std::thread> workers_;
};

}  // namespace

ShardWriteResult writeShard(const std::string& path, const std::string& fileName, int64_t step, int rank,
                            int worldSize, const std::vector<SnapshotPiece>& pieces, const ShardWriteOptions& options) {
  ShardWriteResult result;
  std::vector<ChunkGrid> grids;
  const std::vector<ChunkTask> tasks = planChunks(pieces, options.chunkBytes, grids);
  std::vector<std::string> datasets;  // unique in the file
  std::set<std::string> taken;
  for (const SnapshotPiece& piece : pieces) {
    const std::string base = pieceDatasetPath(piece.tensor, piece.slice);
    std::string path = base;
    for (int k = 1; !taken.insert(path).second; ++k) path = base + "~" + std::to_string(k);
    datasets.push_back(path);
  }
  std::unique_ptr<CompressionPipeline> pipeline;
  if (options.zstdLevel > 0 && !tasks.empty()) {
    pipeline = std::make_unique<CompressionPipeline>(tasks, options.zstdLevel, std::max(1, options.threads));
  }
  // An upper bound of the file: every chunk at zstd's worst case, plus metadata.
  int64_t reserve = 64 << 10;
  for (const ChunkTask& t : tasks) reserve += static_cast<int64_t>(t.paddedBytes + t.paddedBytes / 128 + 1024);
  reserve += static_cast<int64_t>(pieces.size()) * 8192;
  ShardWriter writer(path, step, rank, worldSize, reserve);
  // Checksums on their own thread, ahead of the writer (hashing is ~3x faster
  // than the disk, so the writer never waits for one).
  std::vector<std::promise<uint64_t>> hashPromises(pieces.size());
  std::vector<std::future<uint64_t>> hashes;
  for (auto& promise : hashPromises) hashes.push_back(promise.get_future());
  std::atomic<bool> abandon{false};
  std::thread hasher([&] {
    for (size_t p = 0; p < pieces.size() && !abandon; ++p) {
      hashPromises[p].set_value(
          XXH64(pieces[p].data, static_cast<size_t>(pieces[p].slice.numel) * c10::elementSize(pieces[p].dtype), 0));
    }
  });
  struct JoinHasher {
    std::thread& thread;
    std::atomic<bool>& abandon;
    ~JoinHasher() {
      abandon = true;
      thread.join();
    }
  } joinHasher{hasher, abandon};
  std::vector<uint8_t> padded;
  int64_t chunkBytesWritten = 0;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const ChunkTask& task = tasks[i];
    const SnapshotPiece& piece = pieces[task.piece];
    if (task.index == 0) {
      writer.createDataset(PieceDataset{datasets[task.piece], piece.tensor, piece.dtype, piece.globalShape,
                                        piece.slice, grids[task.piece], options.zstdLevel,
                                        options.zstdLevel > 0 && task.element > 1});
    }
    const uint8_t* encoded = task.data;
    size_t encodedBytes = task.rawBytes;
    if (pipeline) {
      std::tie(encoded, encodedBytes) = pipeline->take(i);
    } else if (task.rawBytes < task.paddedBytes) {
      padded.assign(task.paddedBytes, 0);
      std::memcpy(padded.data(), task.data, task.rawBytes);
      encoded = padded.data();
      encodedBytes = padded.size();
    }
    if (options.faults.enospcAfterBytes >= 0 &&
        chunkBytesWritten + static_cast<int64_t>(encodedBytes) > options.faults.enospcAfterBytes) {
      throw CheckpointError("writing " + path + ": " + describeErrno(ENOSPC) +
                            " [injected: TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES]");
    }
    writer.writeChunk(task.index, encoded, encodedBytes);
    chunkBytesWritten += static_cast<int64_t>(encodedBytes);
    if (pipeline) pipeline->release(i);
    if (options.faults.delayMsPerChunk > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(options.faults.delayMsPerChunk));
    }
    const bool lastOfPiece = i + 1 == tasks.size() || tasks[i + 1].piece != task.piece;
    if (lastOfPiece) {
      const std::string checksum = xxh64Hex(hashes[task.piece].get());
      writer.finishDataset(checksum);
      result.pieces.push_back(StoredPiece{fileName, datasets[task.piece], piece.slice, checksum});
      result.bytes += piece.slice.numel * static_cast<int64_t>(c10::elementSize(piece.dtype));
    }
  }
  pipeline.reset();
  writer.close();
  fsyncPath(path);
  result.fileBytes = fileSize(path);
  return result;
}

}  // namespace tessera::checkpoint
