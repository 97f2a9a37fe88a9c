// One shard file of a checkpoint: an HDF5 file holding one 1-D chunked
// dataset per stored piece, chunks written pre-encoded (zstd frames or raw)
// with H5Dwrite_chunk, read back through libhdf5's filter pipeline. Layout and
// attributes: docs/checkpoint-format.md. Internal to checkpoint/.
#pragma once

#include <ATen/core/Tensor.h>
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tessera::checkpoint {

// The checkpoint's name of a dtype ("float32", "bfloat16", ...); throws
// CheckpointError naming `tensor` for a dtype checkpoints cannot store.
std::string dtypeName(at::ScalarType dtype, const std::string& tensor);
// The inverse; false for an unknown name.
bool dtypeFromName(const std::string& name, at::ScalarType* dtype);

// What the writer needs to create one piece's dataset.
struct PieceDataset {
  std::string path;                  // "model/w@0": groups created as needed
  std::string tensor;                // logical tensor name (attribute)
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> globalShape;  // attribute
  int64_t offset = 0;                // attribute
  int64_t numel = 0;                 // > 0
  int64_t chunkNumel = 0;            // elements per chunk (the last one is zero-padded)
  int zstdLevel = 0;                 // 0: no filter
  bool shuffle = false;              // HDF5 shuffle filter before zstd (chunks arrive shuffled)
};

// Writes one shard file. Every method serializes on the process-wide HDF5
// lock; not for use by two threads at once. Throws CheckpointError naming the
// file, with libhdf5's error text (and kDiskFullHint on ENOSPC).
class ShardWriter {
 public:
  // reserveBytes > 0: allocates that much disk space for the file first
  // (posix_fallocate; ENOSPC fails here, before any write), trimmed at close().
  ShardWriter(std::string path, int64_t step, int rank, int worldSize, int64_t reserveBytes);
  ~ShardWriter();  // closes without throwing (after an error)
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  void createDataset(const PieceDataset& dataset);
  // Chunk `index` of the current dataset: a zstd frame of the (padded) chunk,
  // or the raw padded chunk when the dataset has no filter.
  void writeChunk(int64_t index, const void* data, size_t bytes);
  // Records the piece's checksum attribute and closes the dataset.
  void finishDataset(const std::string& checksumHex);
  // Closes the file (flushing HDF5's metadata). Does not fsync.
  void close();
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] void fail(const std::string& what);

  std::string path_;
  PieceDataset current_;
  hid_t file_ = -1;
  hid_t dataset_ = -1;
  int reserveFd_ = -1;
};

// Reads datasets of one shard file. Serializes on the HDF5 lock.
class ShardReader {
 public:
  // Throws CheckpointError (missing, unreadable, truncated, not HDF5).
  explicit ShardReader(std::string path);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  // Decodes the whole 1-D dataset (numel elements of elementSize bytes) into
  // dst. Throws CheckpointError (absent, wrong size, undecodable chunk).
  void readDataset(const std::string& dataset, int64_t numel, size_t elementSize, void* dst);

 private:
  std::string path_;
  hid_t file_ = -1;
};

}  // namespace tessera::checkpoint
