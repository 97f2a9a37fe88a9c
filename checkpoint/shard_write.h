// Writes one rank's shard file from a host snapshot: zstd compression of the
// chunks on worker threads (in parallel; the HDF5 filter would run them one
// by one in the writing thread), direct chunk writes in order, an xxh64 per
// piece, fsync. Internal to checkpoint/.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint.h"

namespace tessera::checkpoint {

// One piece of the host snapshot this rank writes.
struct SnapshotPiece {
  std::string tensor;
  std::vector<int64_t> globalShape;
  at::ScalarType dtype = at::kFloat;
  TensorSlice slice;              // which elements; slice.numel > 0
  const uint8_t* data = nullptr;  // slice.numel * element size bytes in the snapshot buffer
};

// Test hooks (fault injection), read from the environment by save():
//   TESSERA_CHECKPOINT_FAULT_ENOSPC_AFTER_BYTES=N  the write fails with ENOSPC
//       once this rank's file would hold more than N bytes of chunk data;
//   TESSERA_CHECKPOINT_FAULT_WRITE_DELAY_MS=M      sleep M ms after each chunk.
struct WriteFaults {
  int64_t enospcAfterBytes = -1;
  int delayMsPerChunk = 0;
  static WriteFaults fromEnvironment();
};

struct ShardWriteOptions {
  int zstdLevel = 3;
  int threads = 1;                       // compression threads
  int64_t chunkBytes = 4 << 20;          // target uncompressed chunk size
  WriteFaults faults;
};

struct ShardWriteResult {
  std::vector<StoredPiece> pieces;       // file = the shard's file name
  int64_t bytes = 0;                     // uncompressed tensor bytes
  int64_t fileBytes = 0;
};

// Writes `pieces` into `path` (file name `fileName` in the index) in format
// kCheckpointFormatVersion and fsyncs it.
// Throws CheckpointError naming the file (disk full: with kDiskFullHint).
ShardWriteResult writeShard(const std::string& path, const std::string& fileName, int64_t step, int rank,
                            int worldSize, const std::vector<SnapshotPiece>& pieces, const ShardWriteOptions& options);

// The dataset of a piece (format 2): "model/w@0,4" for the box at offsets
// (0, 4), "model/w@0,4+96" for a flat range of it starting at element 96 of
// the box, "model/s@0" for a scalar. writeShard makes a path unique in its
// file by appending "~1", "~2", ... (only two different slices of one tensor
// on one rank with the same box offsets and flat offset can collide).
std::string pieceDatasetPath(const std::string& tensor, const TensorSlice& slice);
// xxh64 (seed 0) as 16 lowercase hex digits.
std::string xxh64Hex(uint64_t value);

}  // namespace tessera::checkpoint
