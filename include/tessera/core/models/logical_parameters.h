// A model's parameters as logical tensors: for each trainable parameter, the
// global shape of the tensor it is part of and the slice of it this process
// holds. DDP, FSDP, checkpoints and initialization ask any module through
// logicalParameters() and never need to know which layer shards what.
//
// A tessera layer (Linear, Embedding) declares the layout of its parameters
// through DeclaresParameterLayout; every other parameter (LayerNorm, a
// torch::nn layer inside a user's model) is whole: its global shape is its
// own shape.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/state.h"

namespace torch::nn {
class Module;
}

namespace tessera::models {

// Where a parameter sits in its logical tensor: one or more slices of it,
// whose elements lie one after the other in the parameter's memory (each in
// its own row-major order). Usually one slice; a fused column-parallel layer
// (qkv: rows [q; k; v] split by head) holds one row block of each of its
// fused blocks, so its parameter is several pieces of the logical tensor.
// The parameter's own shape is the slice's sizes for one whole box, else any
// shape with the pieces' total numel (qkv's (3C/p, C): three (C/p, C) boxes).
struct ParameterLayout {
  std::vector<int64_t> globalShape;  // shape of the whole logical tensor
  std::vector<TensorSlice> pieces;   // what this process holds, in memory order; disjoint

  // The whole tensor of `shape`, held by one process.
  static ParameterLayout whole(const std::vector<int64_t>& shape);
  int64_t numel() const;
};

// A slice of a logical tensor and where its elements start in a flat buffer.
struct PlacedSlice {
  TensorSlice slice;
  int64_t offset = 0;
};

// The parts of `pieces` (laid out one after the other, as ParameterLayout's)
// that elements [offset, offset + numel) of the parameter's flat memory hold,
// each with its offset relative to `offset`. Throws InvalidArgument when the
// range exceeds the pieces' total.
std::vector<PlacedSlice> slicesOfRange(const std::vector<TensorSlice>& pieces, int64_t offset, int64_t numel);

// Implemented by modules whose parameters may be slices of larger tensors.
class DeclaresParameterLayout {
 public:
  virtual ~DeclaresParameterLayout() = default;
  // Layout of the parameter registered under `local_name` ("weight"), or
  // nullptr for a name this module does not declare (it is then whole).
  virtual const ParameterLayout* parameterLayout(const std::string& local_name) const = 0;
};

struct LogicalParameter {
  std::string name;                  // "blocks.0.attn.qkv.weight": the name in root.named_parameters()
  at::Tensor tensor;                 // the parameter itself (shares storage; not a copy)
  std::vector<int64_t> globalShape;  // shape of the whole logical tensor
  std::vector<TensorSlice> pieces;   // what `tensor` holds of it (ParameterLayout::pieces)
};

// Every trainable (requires_grad) parameter of `root`, in registration order
// (the order of root.named_parameters()); a tensor reachable under several
// names (tied weights) appears once, under its first name. A parameter's
// slice is whole unless the module that registered it declares otherwise.
// Throws InvalidArgument when a declared layout does not fit its parameter
// (a layer bug), naming the parameter.
std::vector<LogicalParameter> logicalParameters(torch::nn::Module& root);

}  // namespace tessera::models
