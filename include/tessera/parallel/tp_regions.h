// The tensor- and sequence-parallel regions: models::ShardGroup implemented
// over a communicator (the mesh's tp axis), each region a paired autograd
// function named as in Megatron-LM's megatron/core/tensor_parallel/mappings.py.
//
// Over p ranks, x_r being rank r's tensor and [a_0 ... a_{p-1}]_dim the
// concatenation along dim (rank order):
//
//   region                    forward                         backward (dL/dx_r)
//   copyToShards        (f)   y_r = x_r                       all-reduce-sum: sum_s g_s
//   reduceFromShards    (g)   y_r = sum_s x_s                 identity: g_r
//   scatterToShards           y_r = part r of x_r along dim   all-gather: [g_0 ... g_{p-1}]_dim
//   gatherFromShards          y_r = [x_0 ... x_{p-1}]_dim     part r of g_r along dim (no communication)
//   gatherFromSequence        y_r = [x_0 ... x_{p-1}]_dim     reduce-scatter: part r of sum_s g_s
//   reduceScatterToSequence   y_r = part r of sum_s x_s       all-gather: [g_0 ... g_{p-1}]_dim
//
// f and g are the conjugate pair at a TP block's entry and exit (Megatron-LM,
// arXiv 1909.08053, §3); the two sequence regions replace them with sequence
// parallelism (Korthikanti et al., arXiv 2205.05198, §4.2.2): all-gather +
// reduce-scatter move the same bytes as one all-reduce. gatherFromShards'
// backward takes part r of g_r, not of a sum: it assumes, as Megatron's
// _GatherFromModelParallelRegion does, that the gathered output feeds
// replicated computation whose gradient is the same on every rank.
//
// Bytes on the wire are the communicator's (its stats()); every region's
// collective carries the full tensor (all-reduce) or the gathered tensor
// (all-gather, reduce-scatter), never more than one collective per direction.
//
// Deliberately not here: the layers that use these regions (core/models'
// Linear and Embedding, through the ShardGroup interface), and any choice of
// communicator (DeviceMesh hands out the tp axis's).
#pragma once

#include <memory>
#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/core/models/layer_options.h"

namespace tessera::parallel {

// A ShardGroup over `comm`'s ranks, rank() and size() those of `comm`, named
// `name` in errors ("tp"). The group shares ownership of `comm`, and so does
// every autograd graph that went through one of its regions until the graph is
// freed (its backward needs the communicator).
//
// Every region is collective over `comm` (forward and backward), as the
// ShardGroup contract says; dims may be negative (counted from the end). A
// split (scatterToShards, reduceScatterToSequence and the backward of
// gatherFromShards / gatherFromSequence) needs x.size(dim) divisible by
// size(): InvalidArgument naming the region, the dim size and the group size
// otherwise, thrown before any communication (every rank throws the same).
// Tensors keep their dtype (float32 and float64 are what layers use; anything
// the communicator carries works); inputs are never modified; gradients may
// arrive non-contiguous. With one rank every region returns x itself and
// allReduceSum / allReduceMax a copy: no collective is issued at all.
// Throws InvalidArgument for a null comm; CommError / TimeoutError from the
// communicator.
std::shared_ptr<models::ShardGroup> makeTensorParallelGroup(comm::CommPtr comm, std::string name = "tp");

}  // namespace tessera::parallel
