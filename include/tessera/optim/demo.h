// DeMo: decoupled momentum optimization (arXiv 2411.19870; bloc97/DeMo's
// demo.py, followed where it and the paper differ). Each worker keeps a local
// momentum `delta`, sends only the top-k DCT components of each chunk of it,
// and every worker applies sign(decode(mean of what all sent)) (REFERENCE §2).
// Gradient sync by DDP must be off: DeMo is the only communication.
//
// One step, per parameter p with gradient g (an undefined .grad counts as
// zero, so that every rank always sends the same amount):
//   p     *= 1 - lr * wd
//   delta  = beta * delta + lr * g              (the code's form: lr-scaled, no 1 - beta)
//   C      = encode(delta); per chunk keep the top-k |C| with their signs
//   delta -= decode(the kept components)        (error feedback)
//   U      = scatter-mean of every worker's kept components (a position picked
//            by several workers gets the mean of their values; others stay 0)
//   p     -= lr * sign(decode(U))
//
// Wire format: one all-gather per step carrying every parameter's payload,
// each worker contributing payloadBytesPerStep() bytes: first every kept
// value as float32 (parameter 0's chunks in order, then parameter 1's, ...),
// then every kept index as a little-endian 16-bit unsigned position inside
// its chunk (chunks have at most 256 x 256 = 65536 positions, see
// DemoConfig::compression_chunk), in the same order. Values of float64
// parameters travel rounded to float32, and the error feedback removes the
// rounded value (what was really sent), so nothing is lost. Traffic shows in
// the communicator's stats (kAllGather).
//
// step() is collective over the communicator (comm null or of size 1: one
// worker, no communication). Only 1-D and 2-D parameters are supported
// (others: InvalidArgument at construction, naming the index and shape).
//
// Sharded tensors (tensor parallelism; parallel/tensor_parallel.h). Chunks
// are cut on the LOGICAL tensor: given each tensor's layout (what it holds
// of its logical parameter, DataParallel::parameterLayout()), the chunk of
// dimension d is chunkSize(logical size of d, compression_chunk), and each
// piece the tensor holds (a box of the logical tensor; a tp shard of qkv
// holds three) is chunked on its own. When every piece is aligned -- a
// whole box whose offsets and sizes are multiples of those chunks -- the
// shard's chunks ARE the logical tensor's chunks inside it, and the DCT,
// the top-k and the scatter-mean of each chunk are exactly those of the
// unsharded run. The replica group of a tp rank holds the same shard on
// every member, so DeMo at tp = N equals DeMo at tp = 1 (each worker sends
// the components of the chunks it holds: its share of a sharded tensor's,
// all of a replicated one's). For the GPT split over tp = N this asks that
// the logical chunk of each split dimension divide the rank's share of it:
// C/N rows of each of q, k, v (the chunk of 3C), the MLP's hidden width / N,
// and the first row and row count of each rank's vocabulary rows, which may
// be uneven (e.g. d_model 768, tp 2, compression_chunk 64: chunkSize(2304,
// 64) = 64 divides 384). For even splits the shard's own chunks would then
// coincide with the logical ones; the layout matters for uneven splits and
// to know when they do not. "Equals" holds up to rounding, which sign()
// magnifies only where the decoded mean is rounding noise itself: a
// gradient that is zero in exact arithmetic, such as attention's key bias
// (softmax ignores a shift shared by all keys), steps +-lr either way.
// Otherwise (a piece straddling a chunk boundary; a piece of a 3-D or more
// logical tensor; an FSDP flat shard, which is not a box and may span
// parameters; pieces not covering the tensor, i.e. padding) the tensor is
// chunked as a tensor of its own shape, as without a layout: per-shard
// semantics, where chunks, top-k and therefore the steps differ from an
// unsharded run. Construction logs one line naming every
// such tensor and why. With no layout (or whole-tensor layouts) every
// tensor is chunked by its own shape, which is the logical one.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/optim/elastic_collective.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::optim {

// The [demo] section. Plain struct; validate() before use.
struct DemoConfig {
  double compression_decay = 0.999;  // beta: delta = beta * delta + lr * g; in [0, 1)
  int64_t compression_topk = 32;     // components kept per chunk (at most the chunk's size); >= 1
  int64_t compression_chunk = 64;    // target chunk length per dimension; in [1, 256] (16-bit indices)
  double weight_decay = 0.0;         // decoupled: p *= 1 - lr * wd; >= 0

  // Throws ConfigError naming the field (prefix + "compression_topk", ...).
  void validate(const std::string& prefix = "demo.") const;
};

// What each optimizer tensor holds of the model's logical parameters
// (DataParallel::parameterLayout()): layout[i] for parameters[i]. Empty:
// every tensor is a whole parameter.
using DemoLayout = std::vector<std::vector<parallel::ParameterPiece>>;

// DeMo over `parameters` (shared, not copied: they must outlive the
// optimizer), starting at learning rate `lr`, chunked on the logical tensors
// that `layout` describes (file comment; every replica must pass the same
// layout for its tensors). State: per-parameter "demo/delta" (created at
// construction, zeros) and scalar "demo/step" (step() calls completed;
// optional in loadState: states saved without it count from 0). Throws ConfigError for a bad config or lr,
// InvalidArgument for a parameter that is not floating point, a layout of
// another length than `parameters`, or a tensor chunked by its own shape
// that is not 1-D or 2-D.
std::unique_ptr<Optimizer> makeDemo(const DemoConfig& config, std::vector<at::Tensor> parameters,
                                    comm::CommPtr comm, double lr, DemoLayout layout = {});

// Elastic training (parallel/elastic.h; optim/elastic_collective.h): every
// step's all-gather runs through `collective` on the group of the nodes that
// are members at that step, sync index = "demo/step" after the step (1, 2,
// ...; a joiner restores it and continues the numbering). The local half
// (weight decay, momentum, top-k, error feedback) runs once before the
// collective; the body only gathers the payload into scratch, which is
// decoded and applied after the sync committed. The scatter-mean divides by
// how many of the members sent each component, so it follows the group's
// size as it changes. With a fixed membership the steps equal makeDemo's on a
// group of the same members, bit for bit; every member takes the same step,
// so members (a joiner included, once it restored a peer's state) hold
// bit-identical parameters when they started identical. Every step reports
// outerStep = true (a sync, after which the launcher serves joiners). If the
// collective throws, the local half already happened and the parameters did
// not take the step: the node must leave and rejoin (parallel::Evicted).
// Throws as makeDemo, and InvalidArgument for a null collective.
std::unique_ptr<Optimizer> makeElasticDemo(const DemoConfig& config, std::vector<at::Tensor> parameters,
                                           ElasticCollective collective, double lr, DemoLayout layout = {});

// --- The transform, exposed for tests and benchmarks -----------------------
namespace demo {
// The largest divisor of `size` that is <= `limit` (size itself when size < limit).
int64_t chunkSize(int64_t size, int64_t limit);
// The orthonormal DCT-II matrix of size n (rows are basis vectors), float64:
// D[k][i] = sqrt((k == 0 ? 1 : 2) / n) * cos(pi * (2i + 1) * k / (2n)).
// (Psyche's "dct(I)" is its transpose.)
at::Tensor dctMatrix(int64_t n);
// Chunked DCT of a 1-D or 2-D tensor with chunk `limit` per dimension, and
// its inverse: decode(encode(x)) == x up to rounding. Computed in x's dtype.
// Shapes: 1-D (L) with chunk n -> (L/n, n), each row D x_row;
//         2-D (R, C) with chunks n1 x n2 -> (R/n1, C/n2, n1, n2), each block D1 B D2^T
//         (block (a, b) is rows [a n1, (a+1) n1), columns [b n2, (b+1) n2)).
// A chunk's positions are numbered row-major inside the last one (1-D) or two (2-D) dims.
at::Tensor encode(const at::Tensor& x, int64_t limit);
at::Tensor decode(const at::Tensor& coefficients, const std::vector<int64_t>& shape, int64_t limit);
// The bytes one worker contributes to a step's all-gather for these
// parameters: 6 per kept component (float32 value + 16-bit index). With Gloo,
// a rank sends (W - 1) times this per step (ring all-gather).
int64_t payloadBytesPerStep(const DemoConfig& config, const std::vector<at::Tensor>& parameters,
                            const DemoLayout& layout = {});
}  // namespace demo

}  // namespace tessera::optim
