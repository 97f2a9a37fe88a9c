// The training state as named tensors: what a checkpoint writes and what live
// recovery sends to a joining node. Both go through this one vocabulary, so a
// state kind added once (a new optimizer's buffers) is saved, resharded and
// transferred without further code.
//
// Every tensor is a *logical* tensor with a global shape, of which one rank
// holds pieces, each a TensorSlice (below): an N-D box of the tensor,
// optionally narrowed to a flat row-major range of the box. Replicated tensors
// are held whole (TensorSlice::whole) by every rank. A logical tensor may be
// held in several pieces by one rank (an FSDP shard crossing parameter
// boundaries gives one piece per parameter), hence the vector per name.
//
// Names are '/'-separated paths: "model/blocks.0.attn.qkv.weight",
// "optim/exp_avg/blocks.0.attn.qkv.weight", "optim/diloco/outer/...". Scalars
// and small values (step, sampler position, config text) live in `meta` as
// strings; use the helpers to read them back typed.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace tessera {

// Which elements of a logical tensor a piece holds: an N-D box of the tensor
// (offset and size per dimension, as PyTorch DCP's chunk metadata), optionally
// narrowed to a flat row-major range *of the box*. A tensor-parallel shard is a
// box (a dim-1 slice of a row-parallel weight is one box, not one piece per
// row); FSDP's flat shard of a parameter -- whole or itself a box -- is a flat
// range of that parameter's box, so every layout later issues add (TP slices,
// qkv's three row blocks, pipeline stages, experts, FSDP of any of them) is a
// list of TensorSlices. Decided once here: checkpoint format 2 and live-recovery
// wire version 2 store exactly this.
//
// Invariants: offsets.size() == sizes.size() == rank of the global shape;
// 0 <= flatOffset, flatOffset + numel <= boxNumel(). A scalar (rank 0) has
// empty offsets/sizes and boxNumel() 1.
struct TensorSlice {
  std::vector<int64_t> offsets;  // box start per dimension
  std::vector<int64_t> sizes;    // box extent per dimension
  int64_t flatOffset = 0;        // first element held, in the box's row-major order
  int64_t numel = 0;             // elements held; boxNumel() when the whole box is held

  // The whole tensor of `shape`.
  static TensorSlice whole(const std::vector<int64_t>& shape);
  // The whole box [offsets, offsets + sizes).
  static TensorSlice box(std::vector<int64_t> offsets, std::vector<int64_t> sizes);
  // Format 1's flat range [offset, offset + numel) of a tensor of `shape`:
  // the whole-tensor box narrowed to that range.
  static TensorSlice flatRange(const std::vector<int64_t>& shape, int64_t offset, int64_t numel);
  // This slice's box narrowed to [flatOffset + offset, ... + numel) (offset
  // relative to this slice's own first element). Throws InvalidArgument when
  // the range does not fit.
  TensorSlice narrowFlat(int64_t offset, int64_t numel) const;

  int64_t boxNumel() const;
  bool isWholeBox() const { return flatOffset == 0 && numel == boxNumel(); }
  // Covers every element of a tensor of `shape`.
  bool isWhole(const std::vector<int64_t>& shape) const;
  // Throws InvalidArgument naming `what` when the slice does not fit a tensor of `shape`.
  void check(const std::vector<int64_t>& shape, const std::string& what) const;
  // "[0:4, 2:6]" or "[0:4, 2:6] flat 3+5": for error messages and logs.
  std::string text() const;
  bool operator==(const TensorSlice& other) const {
    return offsets == other.offsets && sizes == other.sizes && flatOffset == other.flatOffset &&
           numel == other.numel;
  }
  bool operator!=(const TensorSlice& other) const { return !(*this == other); }
  // True when the boxes share at least one position (flat ranges ignored).
  bool boxIntersects(const TensorSlice& other) const;
  // The shape a piece of this slice has in memory and in checkpoint format 2:
  // the box's sizes when the whole box is held, else [numel] (flat).
  std::vector<int64_t> localShape() const;
};

// Calls fn(aIndex, bIndex, count) for every run of `count` consecutive
// elements held by both `a` and `b` (slices of one tensor): aIndex and bIndex
// are positions in each slice's own element order (0 .. numel), runs come in
// increasing order and do not overlap. General: any boxes, any flat ranges.
// Costs one step per row of the boxes' intersection (dimensions both boxes
// span fully are merged into one run).
void forEachOverlap(const TensorSlice& a, const TensorSlice& b,
                    const std::function<void(int64_t aIndex, int64_t bIndex, int64_t count)>& fn);
// Elements held by both.
int64_t overlapCount(const TensorSlice& a, const TensorSlice& b);
// Copies the elements `src` and `dst` share from srcValues (src.numel
// elements, contiguous) into dstValues (dst.numel, contiguous, same dtype);
// returns how many. Throws InvalidArgument for mismatched sizes or dtypes.
int64_t copyOverlap(const TensorSlice& src, const at::Tensor& srcValues, const TensorSlice& dst,
                    const at::Tensor& dstValues);
// Elements of a tensor of `shape` held by at least one of `slices` (their
// union: overlapping slices count once), and the first element in row-major
// order held by none (-1 when all are held).
struct Coverage {
  int64_t covered = 0;
  int64_t firstMissing = -1;
};
Coverage coverageOf(const std::vector<int64_t>& shape, const std::vector<TensorSlice>& slices);
// "[2, 7]": the coordinates of flat row-major element `index` of `shape`.
std::string positionText(const std::vector<int64_t>& shape, int64_t index);

// One rank's piece of a logical tensor.
struct StatePiece {
  at::Tensor local;                  // the values, any dtype, contiguous; slice.numel elements,
                                     // shaped slice.localShape() (a whole tensor: its shape)
  TensorSlice slice;                 // which elements of the logical tensor
};

struct StateTensor {
  std::vector<int64_t> globalShape;  // shape of the whole logical tensor
  std::vector<StatePiece> pieces;    // what this rank holds (disjoint slices)
  // True when every rank holds the same complete value (only one rank need
  // write it). False for shards.
  bool replicated = true;

  int64_t globalNumel() const;
  // Throws InvalidArgument naming `name` when a piece does not fit the global
  // shape or holds another number of elements than its slice.
  void checkPieces(const std::string& name) const;
};

// "[2, 3]": a shape as error messages print it.
std::string shapeText(const std::vector<int64_t>& shape);

struct StateDict {
  std::map<std::string, StateTensor> tensors;
  std::map<std::string, std::string> meta;

  // A whole tensor held by this rank (TensorSlice::whole, replicated).
  void putReplicated(const std::string& name, const at::Tensor& value);
  // Adds one piece of a sharded tensor (replicated = false), `value` holding
  // slice.numel elements (reshaped to slice.localShape()). Throws
  // InvalidArgument when the slice does not fit `globalShape` or the tensor
  // was put with another shape.
  void putPiece(const std::string& name, const std::vector<int64_t>& globalShape, const TensorSlice& slice,
                const at::Tensor& value);
  void putMeta(const std::string& key, int64_t value);
  void putMeta(const std::string& key, double value);   // written with 17 significant digits: round-trips
  void putMeta(const std::string& key, std::string value);
  // Throw InvalidArgument naming the key when absent or not a number.
  int64_t metaInt(const std::string& key) const;
  double metaDouble(const std::string& key) const;
  const std::string& metaString(const std::string& key) const;
  bool hasMeta(const std::string& key) const { return meta.count(key) != 0; }

  // The value of a tensor held whole by this rank (one piece covering it);
  // throws InvalidArgument naming the tensor otherwise.
  const at::Tensor& whole(const std::string& name) const;
  // Deep copy of every piece into fresh contiguous CPU tensors (no aliasing
  // with the training tensors); meta copied.
  StateDict clone() const;
  // Total bytes of this rank's pieces.
  int64_t localBytes() const;
};

}  // namespace tessera
