// The vocabulary-parallel cross-entropy (Megatron-LM arXiv 1909.08053 §3,
// megatron/core/tensor_parallel/cross_entropy.py; REFERENCE.md §9): the loss
// of logits whose vocabulary columns are split over a ShardGroup, computed
// without the full (N, V) logits ever existing on one rank.
//
// Rank r holds z_r = logits[:, b_r : b_r + V_r) (N, V_r). Per token i, with
// target t_i:
//   m_i   = max over ranks of max_j z_r[i, j]                 all-reduce (max), N elements
//   S_i   = sum over ranks of sum_j exp(z_r[i, j] - m_i)       } one all-reduce (sum) of 3N
//   T_i   = z[i, t_i] - m_i, from the one rank owning t_i      } elements: S, T and the number
//           (the others contribute 0)                          } of ranks owning t_i
//   loss_i = log S_i - T_i
// Backward, per rank and without communication (the softmax is saved):
//   dL/dz_r[i, j] = (exp(z_r[i, j] - m_i) / S_i - [b_r + j == t_i]) * dL/dloss_i
//
// Deliberately not here: reduction over tokens (the caller averages or sums
// the per-token losses, as its data-parallel accounting needs), ignore-index
// tokens and label smoothing, and which columns a rank holds (the caller
// splits the vocabulary, e.g. with shardRange, padding included).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "tessera/core/models/layer_options.h"

namespace tessera::models {

// Per-token cross-entropy losses (N) of vocabulary-split logits, in the
// logits' dtype, differentiable with respect to `logits` (not `targets`).
//   logits:     (N, V_r) float32 or float64, this rank's columns
//               [vocabBegin, vocabBegin + V_r) of the logical (N, V) logits;
//               V_r >= 1 and may differ between ranks (an uneven split).
//   targets:    (N) int64 in [0, V), the same on every rank of `group`.
//   vocabBegin: >= 0, this rank's first column.
// Collective over `group` (forward only; backward communicates nothing): every
// rank calls it with the same N and targets. The ranks' column ranges must
// tile [0, V) exactly. Throws InvalidArgument naming the argument for a bad
// shape, dtype or vocabBegin (before any communication), and, on every rank
// together after the forward's all-reduces, when some target lies in no
// rank's columns or in several (a target >= V, or ranges that overlap or leave
// a gap). `group` is used during the call only.
at::Tensor vocabParallelCrossEntropy(const at::Tensor& logits, const at::Tensor& targets, int64_t vocabBegin,
                                     ShardGroup& group);

}  // namespace tessera::models
