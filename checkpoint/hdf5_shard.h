// One shard file of a checkpoint: an HDF5 file holding one chunked dataset
// per stored piece (format 2: N-D with the box's shape for a whole-box piece,
// 1-D for a flat range; format 1: always 1-D), chunks written pre-encoded
// (zstd frames or raw) with H5Dwrite_chunk, read back raw and decoded in
// parallel (or through libhdf5's filter pipeline). Layout and attributes:
// docs/checkpoint-format.md. Internal to checkpoint/.
#pragma once

#include <ATen/core/Tensor.h>
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/state.h"

namespace tessera::checkpoint {

// The checkpoint's name of a dtype ("float32", "bfloat16", ...); throws
// CheckpointError naming `tensor` for a dtype checkpoints cannot store.
std::string dtypeName(at::ScalarType dtype, const std::string& tensor);
// The inverse; false for an unknown name.
bool dtypeFromName(const std::string& name, at::ScalarType* dtype);

// How a dataset of `dims` is cut into chunks so that every chunk is one
// contiguous run of the row-major data: a chunk spans one index of each dim
// before `split`, `perChunk` indices of dim `split` and all of every dim
// after it. Equal chunks of at most maxChunkBytes (unless one index of dim
// `split` alone is larger, which only a dim of more than 4 MiB per element
// row could make); the last chunk along `split` is zero-padded in the file,
// as HDF5 stores edge chunks whole. Format 1's 1-D datasets are the case
// split == 0.
struct ChunkGrid {
  std::vector<int64_t> dims;   // the dataset's shape (rank >= 1, every dim > 0)
  int split = 0;
  int64_t perChunk = 1;

  static ChunkGrid plan(const std::vector<int64_t>& dims, size_t elementSize, int64_t maxChunkBytes);
  // The grid of an existing dataset's chunk dims; false when they are not
  // of this form (another writer's file: read through libhdf5 instead).
  static bool fromChunkDims(const std::vector<int64_t>& dims, const std::vector<int64_t>& chunkDims, ChunkGrid* out);

  std::vector<int64_t> chunkDims() const;
  int64_t chunkNumel() const;  // elements per (padded) chunk
  int64_t count() const;       // chunks
  struct Chunk {
    std::vector<int64_t> coords;  // the chunk's first position in the dataset
    int64_t first = 0;            // its first element in the row-major data
    int64_t numel = 0;            // elements it holds (the rest of chunkNumel() is padding)
  };
  Chunk chunk(int64_t index) const;
};

// The shape of a stored piece's dataset: format 2 stores a whole-box piece
// with the box's shape ([1] for a scalar), a flat range as [numel]; format 1
// stored every piece as [numel].
std::vector<int64_t> pieceDatasetDims(const TensorSlice& slice, int formatVersion);

// What the writer needs to create one piece's dataset.
struct PieceDataset {
  std::string path;                  // "model/w@0,4": groups created as needed
  std::string tensor;                // logical tensor name (attribute)
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> globalShape;  // attribute
  TensorSlice slice;                 // attributes box_offsets, box_sizes, flat_offset, numel
  ChunkGrid grid;                    // the dataset's shape and chunks
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
  // Chunk `index` (ChunkGrid order) of the current dataset: a zstd frame of
  // the (padded) chunk, or the raw padded chunk when the dataset has no filter.
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

  // Decodes the whole dataset, which must have shape `dims` and elements of
  // elementSize bytes, into dst (row-major). Throws CheckpointError (absent,
  // wrong shape, undecodable chunk).
  void readDataset(const std::string& dataset, const std::vector<int64_t>& dims, size_t elementSize, void* dst);

 private:
  std::string path_;
  hid_t file_ = -1;
};

}  // namespace tessera::checkpoint
