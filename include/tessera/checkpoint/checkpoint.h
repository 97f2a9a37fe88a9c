// Checkpoints: asynchronous, sharded HDF5 files with zstd-compressed tensors
// and a checksum per stored piece, committed atomically, readable on another
// world size. The file format is docs/checkpoint-format.md.
//
// Layout under a root directory:
//   ROOT/step-00000100/          one committed checkpoint
//       index.json               tensors (global shape, dtype, every stored piece:
//                                file, dataset, slice, checksum), meta,
//                                world size, format version
//       rank-00000.h5 ...        one file per writing rank
//   ROOT/latest                  text: the name of the newest committed checkpoint
//   ROOT/.tmp-step-00000100/     a save in progress (renamed into place when done)
//
// What goes in is a StateDict (core/state.h): tensors held whole
// (replicated = true: only the lowest rank holding it writes it) or as pieces,
// each a TensorSlice (an N-D box, optionally a flat range of it; every rank
// writes its own; a slice stored by several ranks, as in hybrid FSDP, is
// written once, by the lowest of them). Format 2 stores a whole-box piece as
// one N-D dataset of the box's shape, a flat range as a 1-D dataset; format
// 1 checkpoints (flat ranges of the whole tensor) still load.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/error.h"
#include "tessera/core/state.h"

namespace tessera::checkpoint {

// A checkpoint could not be written or read: the message names the file
// (and the tensor) and what is wrong with it.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

struct CheckpointOptions {
  std::string dir;              // the root directory (created when missing)
  int keep = 3;                 // complete checkpoints kept (older ones removed after a commit); >= 1
  int zstdLevel = 3;            // 0: store uncompressed; 1..19: zstd level (HDF5 filter 32015)
  int compressionThreads = 0;   // threads compressing chunks; 0: hardware threads
  bool skipWhenBusy = false;    // save() while one is in flight: false waits for it, true skips it (logged)

  // Throws ConfigError naming the field (prefix + "keep").
  void validate(const std::string& prefix = "checkpoint.") const;
};

// Timings of the most recent completed save, this rank.
struct SaveStats {
  int64_t step = -1;
  int64_t bytes = 0;             // bytes of tensor data this rank wrote (uncompressed)
  int64_t fileBytes = 0;         // size of this rank's file on disk
  double blockedSeconds = 0;     // inside save(): the snapshot copy (training was blocked)
  double writeSeconds = 0;       // background: encode + write + fsync of this rank's file
  double commitSeconds = 0;      // background: agreement, index, rename
};

// Owns one background writer thread. Not copyable. Public methods are called
// from the training thread, the same sequence on every rank.
class Checkpointer {
 public:
  // Collective over `comm` (splits a private communicator for the writer
  // thread, so background agreement never interleaves with training
  // collectives). Throws ConfigError for bad options, CheckpointError when
  // the directory cannot be created or written.
  Checkpointer(CheckpointOptions options, comm::CommPtr comm);
  // Waits for a save in flight; its error, if any, is logged, not thrown.
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Collective. If a save is in flight on any rank, waits for it or (with
  // skipWhenBusy, decided the same on every rank by a one-element
  // allReduce(max) on `comm`; logged) returns false. Then rethrows, on every
  // rank, the error of the previous save if it failed (ranks agree on each
  // save's outcome, so all throw or none does). Copies
  // `state` to host memory and returns true; the background thread writes
  // and fsyncs this rank's file, the ranks agree that every file is
  // complete, rank 0 writes the index, renames the directory into place,
  // updates `latest`, and prunes beyond `keep`. A failure at any point
  // (disk full, a rank's writer dying) leaves the previous checkpoint and
  // `latest` untouched. Throws CheckpointError on every rank when some
  // rank's state cannot be saved (an unsupported dtype, a piece outside its
  // tensor). The snapshot buffer (this rank's written bytes) is kept and
  // reused across saves, so its pages stay mapped and the copy runs at
  // memcpy speed.
  bool save(int64_t step, const StateDict& state);
  // Collective: waits for the save in flight; throws its error (CheckpointError).
  void wait();
  // Directory of the newest checkpoint this object committed ("" if none).
  std::string lastCommitted() const;
  SaveStats lastStats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One stored piece of a tensor, as the index records it.
struct StoredPiece {
  std::string file;              // relative to the checkpoint directory
  std::string dataset;           // HDF5 dataset path inside the file
  TensorSlice slice;             // which elements (format 1: a flat range of the whole tensor)
  std::string checksum;          // hex, of the uncompressed bytes
};

struct StoredTensor {
  std::vector<int64_t> globalShape;
  std::string dtype;             // "float32", "bfloat16", "float16", "uint8", "int64", ...
  std::vector<StoredPiece> pieces;
};

struct CheckpointIndex {
  int formatVersion = 0;         // as read; pieces are converted to slices whatever the version
  int64_t step = 0;
  int worldSize = 0;
  std::map<std::string, StoredTensor> tensors;
  std::map<std::string, std::string> meta;
};

// The version this build writes, and the newest it reads (it reads 1 and 2).
constexpr int kCheckpointFormatVersion = 2;

// A checkpoint directory from `path`: path itself if it holds index.json,
// else the one ROOT/latest names. Throws CheckpointError when neither.
std::string resolveCheckpoint(const std::string& path);
// Reads and checks the index (format version, structure). Throws
// CheckpointError naming the file.
CheckpointIndex readIndex(const std::string& checkpointDir);

// What one rank wants to read: a slice of a logical tensor.
struct LoadRequest {
  std::string name;
  std::vector<int64_t> globalShape;  // must match the stored shape
  at::ScalarType dtype = at::kFloat; // must match the stored dtype
  std::optional<TensorSlice> slice;  // which elements; none: the whole tensor

  // The slice asked for (the whole tensor when none was given).
  TensorSlice wanted() const { return slice ? *slice : TensorSlice::whole(globalShape); }
};

// Local: reads the requested slices from the checkpoint at `path` (see
// resolveCheckpoint), assembled from whichever stored pieces intersect them
// (any boxes, any flat ranges: a checkpoint saved on N ranks with one layout
// loads on M ranks with another), reading only those and verifying the
// checksum of every piece it reads. Before reading any data it checks every
// request and throws one CheckpointError listing all missing names, shape
// and dtype mismatches, slices outside their tensor and -- for names under
// any of `strictPrefixes` in the checkpoint but not requested -- the
// unexpected ones. A slice not fully covered by stored pieces (a missing
// shard file) is an error naming the first missing element. Returns each
// request as a one-piece StateTensor (fresh tensors shaped
// slice.localShape(), nothing aliased) plus the checkpoint's meta; nothing is
// returned halfway.
StateDict load(const std::string& path, const std::vector<LoadRequest>& requests,
               const std::vector<std::string>& strictPrefixes = {"model/"});

}  // namespace tessera::checkpoint
