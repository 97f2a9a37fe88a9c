// The tensor- and sequence-parallel regions (tp_regions.h has the math): one
// torch::autograd::Function per region, its forward and backward each one
// collective (or none) on the group's communicator.
//
// Splits and gathers along an arbitrary dim work on the dim moved to the
// front: a collective sees one contiguous buffer whose rank-r block is rank
// r's part, so gathering (B, T/p, C) along dim 1 all-gathers (T/p, B, C)
// blocks into (T, B, C) and moves the dim back. Outputs of forward are fresh
// tensors, never views (a custom Function's view output cannot be modified
// in place later), except where a region is the identity.
#include "tessera/parallel/tp_regions.h"

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What a region's backward needs from its group. AutogradContext::saved_data
// holds IValues only, so the group travels as a capsule: a graph that is kept
// alive keeps its communicator alive.
struct RegionGroup : torch::CustomClassHolder {
  RegionGroup(comm::CommPtr c, std::string n) : comm(std::move(c)), name(std::move(n)) {}
  comm::CommPtr comm;
  std::string name;
};
using RegionGroupPtr = c10::intrusive_ptr<RegionGroup>;

void saveGroup(AutogradContext* ctx, const RegionGroupPtr& group, int64_t dim) {
  ctx->saved_data["group"] = at::IValue::make_capsule(group);
  ctx->saved_data["dim"] = dim;
}

RegionGroup& groupOf(AutogradContext* ctx) {
  return *c10::static_intrusive_pointer_cast<RegionGroup>(ctx->saved_data["group"].toCapsule());
}

int64_t dimOf(AutogradContext* ctx) { return ctx->saved_data["dim"].toInt(); }

// `dim` as an index in [0, x.dim()); InvalidArgument naming the region otherwise.
int64_t wrapDim(const char* region, const RegionGroup& group, const at::Tensor& x, int64_t dim) {
  TESSERA_CHECK_ARG(x.defined(), region << " on group '" << group.name << "': the tensor is undefined");
  const int64_t n = x.dim();
  TESSERA_CHECK_ARG(n > 0 && dim >= -n && dim < n,
                    region << " on group '" << group.name << "': dim " << dim << " is out of range for a tensor of "
                           << n << " dims " << x.sizes() << "; pass a dim in [" << -n << ", " << n << ")");
  return dim < 0 ? dim + n : dim;
}

// A split into size() parts needs size(dim) divisible by size().
void checkDivisible(const char* region, const RegionGroup& group, const at::Tensor& x, int64_t dim) {
  const int64_t parts = group.comm->size();
  TESSERA_CHECK_ARG(x.size(dim) % parts == 0,
                    region << " on group '" << group.name << "': x.size(" << dim << ") = " << x.size(dim)
                           << " is not divisible by the group size " << parts
                           << "; make that dim a multiple of " << parts << " (pad it, or choose another degree)");
}

// (..., n, ...) along dim -> (n, ...) contiguous: the layout collectives see.
at::Tensor toFront(const at::Tensor& x, int64_t dim) { return x.movedim(dim, 0).contiguous(); }

// The inverse of toFront, as a fresh contiguous tensor (not a view).
at::Tensor fromFront(const at::Tensor& front, int64_t dim) {
  if (dim == 0) return front;
  return front.movedim(0, dim).clone(at::MemoryFormat::Contiguous);
}

// This rank's part of x along dim (divisibility checked by the caller), a copy.
at::Tensor ownPart(const comm::Communicator& comm, const at::Tensor& x, int64_t dim) {
  const int64_t chunk = x.size(dim) / comm.size();
  return x.narrow(dim, comm.rank() * chunk, chunk).clone(at::MemoryFormat::Contiguous);
}

// A reduced copy of x; x is untouched.
at::Tensor allReduced(comm::Communicator& comm, const at::Tensor& x, comm::ReduceOp op) {
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  comm.allReduce(out, op);
  return out;
}

// [x_0 ... x_{p-1}] along dim, rank order.
at::Tensor allGatheredAlong(comm::Communicator& comm, const at::Tensor& x, int64_t dim) {
  const at::Tensor front = toFront(x, dim);  // (n, ...)
  std::vector<int64_t> shape = front.sizes().vec();
  shape[0] *= comm.size();
  at::Tensor gathered = at::empty(shape, front.options());  // (p * n, ...)
  comm.allGather(front, gathered);
  return fromFront(gathered, dim);
}

// Part r of sum_s x_s along dim (divisibility checked by the caller).
at::Tensor reduceScatteredAlong(comm::Communicator& comm, const at::Tensor& x, int64_t dim) {
  const at::Tensor front = toFront(x, dim);  // (p * n, ...)
  std::vector<int64_t> shape = front.sizes().vec();
  shape[0] /= comm.size();
  at::Tensor part = at::empty(shape, front.options());  // (n, ...)
  comm.reduceScatter(front, part, comm::ReduceOp::kSum);
  return fromFront(part, dim);
}

// Each backward returns one gradient per forward argument: x's, then none for
// the group and the dim.

// f: identity forward, all-reduce backward.
struct CopyToShardsFn : torch::autograd::Function<CopyToShardsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group) {
    saveGroup(ctx, group, 0);
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {allReduced(*groupOf(ctx).comm, grads[0], comm::ReduceOp::kSum), at::Tensor()};
  }
};

// g: all-reduce forward, identity backward.
struct ReduceFromShardsFn : torch::autograd::Function<ReduceFromShardsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group) {
    (void)ctx;
    return allReduced(*group->comm, x, comm::ReduceOp::kSum);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)ctx;
    return {grads[0], at::Tensor()};
  }
};

// Split forward, all-gather backward.
struct ScatterToShardsFn : torch::autograd::Function<ScatterToShardsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group, int64_t dim) {
    saveGroup(ctx, group, dim);
    return ownPart(*group->comm, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {allGatheredAlong(*groupOf(ctx).comm, grads[0], dimOf(ctx)), at::Tensor(), at::Tensor()};
  }
};

// All-gather forward, split backward (no communication).
struct GatherFromShardsFn : torch::autograd::Function<GatherFromShardsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group, int64_t dim) {
    saveGroup(ctx, group, dim);
    return allGatheredAlong(*group->comm, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ownPart(*groupOf(ctx).comm, grads[0], dimOf(ctx)), at::Tensor(), at::Tensor()};
  }
};

// All-gather forward, reduce-scatter backward.
struct GatherFromSequenceFn : torch::autograd::Function<GatherFromSequenceFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group, int64_t dim) {
    saveGroup(ctx, group, dim);
    return allGatheredAlong(*group->comm, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {reduceScatteredAlong(*groupOf(ctx).comm, grads[0], dimOf(ctx)), at::Tensor(), at::Tensor()};
  }
};

// Reduce-scatter forward, all-gather backward.
struct ReduceScatterToSequenceFn : torch::autograd::Function<ReduceScatterToSequenceFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const RegionGroupPtr& group, int64_t dim) {
    saveGroup(ctx, group, dim);
    return reduceScatteredAlong(*group->comm, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {allGatheredAlong(*groupOf(ctx).comm, grads[0], dimOf(ctx)), at::Tensor(), at::Tensor()};
  }
};

class TensorParallelGroup final : public models::ShardGroup {
 public:
  TensorParallelGroup(comm::CommPtr comm, std::string name)
      : group_(c10::make_intrusive<RegionGroup>(std::move(comm), std::move(name))) {}

  int64_t rank() const override { return group_->comm->rank(); }
  int64_t size() const override { return group_->comm->size(); }
  std::string name() const override { return group_->name; }

  at::Tensor copyToShards(const at::Tensor& x) override {
    checkDefined("copyToShards", x);
    return size() == 1 ? x : CopyToShardsFn::apply(x, group_);
  }
  at::Tensor reduceFromShards(const at::Tensor& x) override {
    checkDefined("reduceFromShards", x);
    return size() == 1 ? x : ReduceFromShardsFn::apply(x, group_);
  }
  at::Tensor scatterToShards(const at::Tensor& x, int64_t dim) override {
    dim = wrapDim("scatterToShards", *group_, x, dim);
    checkDivisible("scatterToShards", *group_, x, dim);
    return size() == 1 ? x : ScatterToShardsFn::apply(x, group_, dim);
  }
  at::Tensor gatherFromShards(const at::Tensor& x, int64_t dim) override {
    dim = wrapDim("gatherFromShards", *group_, x, dim);
    return size() == 1 ? x : GatherFromShardsFn::apply(x, group_, dim);
  }
  at::Tensor gatherFromSequence(const at::Tensor& x, int64_t dim) override {
    dim = wrapDim("gatherFromSequence", *group_, x, dim);
    return size() == 1 ? x : GatherFromSequenceFn::apply(x, group_, dim);
  }
  at::Tensor reduceScatterToSequence(const at::Tensor& x, int64_t dim) override {
    dim = wrapDim("reduceScatterToSequence", *group_, x, dim);
    checkDivisible("reduceScatterToSequence", *group_, x, dim);
    return size() == 1 ? x : ReduceScatterToSequenceFn::apply(x, group_, dim);
  }

  at::Tensor allReduceSum(const at::Tensor& x) override { return reducedCopy("allReduceSum", x, comm::ReduceOp::kSum); }
  at::Tensor allReduceMax(const at::Tensor& x) override { return reducedCopy("allReduceMax", x, comm::ReduceOp::kMax); }

 private:
  void checkDefined(const char* region, const at::Tensor& x) const {
    TESSERA_CHECK_ARG(x.defined(), region << " on group '" << group_->name << "': the tensor is undefined");
  }

  // Not differentiable: the copy is detached from x's graph.
  at::Tensor reducedCopy(const char* what, const at::Tensor& x, comm::ReduceOp op) {
    checkDefined(what, x);
    const at::Tensor detached = x.detach();
    if (size() == 1) return detached.clone(at::MemoryFormat::Contiguous);
    return allReduced(*group_->comm, detached, op);
  }

  RegionGroupPtr group_;
};

}  // namespace

std::shared_ptr<models::ShardGroup> makeTensorParallelGroup(comm::CommPtr comm, std::string name) {
  TESSERA_CHECK_ARG(comm != nullptr, "makeTensorParallelGroup('" << name
                                         << "'): the communicator is null; pass the mesh axis's communicator");
  return std::make_shared<TensorParallelGroup>(std::move(comm), std::move(name));
}

}  // namespace tessera::parallel
