// The training state as named tensors: what a checkpoint writes and what live
// recovery sends to a joining node. Both go through this one vocabulary, so a
// state kind added once (a new optimizer's buffers) is saved, resharded and
// transferred without further code.
//
// Every tensor is a *logical* tensor with a global shape, of which one rank
// holds a contiguous row-major flat range [offset, offset + local.numel()).
// Replicated tensors are held whole (offset 0, local.numel() == numel of the
// global shape) by every rank. A logical tensor may be held in several pieces
// by one rank (an FSDP shard crossing parameter boundaries gives one piece per
// parameter), hence the vector per name.
//
// Names are '/'-separated paths: "model/blocks.0.attn.qkv.weight",
// "optim/exp_avg/blocks.0.attn.qkv.weight", "optim/diloco/outer/...". Scalars
// and small values (step, sampler position, config text) live in `meta` as
// strings; use the helpers to read them back typed.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tessera {

// One rank's piece of a logical tensor.
struct StatePiece {
  at::Tensor local;                  // the values, any dtype, contiguous; numel() elements
  int64_t offset = 0;                // flat row-major element offset in the logical tensor
};

struct StateTensor {
  std::vector<int64_t> globalShape;  // shape of the whole logical tensor
  std::vector<StatePiece> pieces;    // what this rank holds (disjoint ranges)
  // True when every rank holds the same complete value (only one rank need
  // write it). False for shards.
  bool replicated = true;

  int64_t globalNumel() const;
};

// "[2, 3]": a shape as error messages print it.
std::string shapeText(const std::vector<int64_t>& shape);

struct StateDict {
  std::map<std::string, StateTensor> tensors;
  std::map<std::string, std::string> meta;

  // A whole tensor held by this rank (offset 0, replicated).
  void putReplicated(const std::string& name, const at::Tensor& value);
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
