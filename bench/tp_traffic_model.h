// The bytes a tensor-parallel GPT step sends on the tp communicator, from
// the model's shape alone (REFERENCE.md §9), so `tessera-bench train` can put
// the measured tp traffic beside it.
//
// Per micro-batch of N = B * T tokens, width C, L blocks, p tp ranks, e bytes
// per element, with the communicator's accounting of bytes SENT per rank:
// an all-reduce of n elements sends 2 (p-1)/p n e (ring), an all-gather or a
// reduce-scatter whose whole tensor has n elements sends (p-1)/p n e.
//   embedding   forward: the vocab-parallel lookup's all-reduce of N C
//               (sequence parallel: reduce-scatter forward, all-gather backward)
//   per block   forward: 2 all-reduces of N C (after attention and after the MLP)
//               backward: 2 all-reduces of N C (at the inputs of qkv and fc)
//               (sequence parallel: each all-reduce becomes all-gather + reduce-scatter)
//   head        backward: the all-reduce of its input's gradient, N C
//               (sequence parallel: all-gather forward, reduce-scatter backward)
//   loss        the vocab-parallel cross-entropy: an all-reduce-max of N and
//               an all-reduce-sum of 3 N (sum of exps, target logit, owner count)
//   sequence-parallel parameters: the gradients of replicated parameters used
//               on sequence shards are all-reduced: per block ln1, ln2 (2 C each)
//               and the biases of attn.proj and mlp.proj (C each; no mlp with
//               MoE); ln_f (2 C); the
//               position table (block_size C) with learned positions
//   MoE blocks  (model.use_moe, TED) the feed-forward's two all-reduces are
//               replaced by the experts': per local expert (E/ep of them, on
//               their (ep*C, M) slots, C the capacity of B*T tokens) fc's
//               backward and proj's forward all-reduce; with
//               parallel.moe_dtd, on slots padded to C' (a multiple of p):
//               fc's all-gather forward / reduce-scatter backward and proj's
//               reduce-scatter forward / all-gather backward of (ep*C', M),
//               proj's bias gradient all-reduced (M), and the exchange's
//               all-gather of the (E, C', M) buffer each way. Under sequence
//               parallelism the block all-gathers the MoE input (B,T,C)
//               forward and its output's gradient backward
//   FSDP        recomputes each block's forward in backward: its forward
//               collectives run twice (with ep > 1 the experts are a unit
//               of their own, recomputed once more: their Linears' three times)
// Per step: grad_accum micro-batches, plus the clipping norm's all-reduce of
// two float64 over tp (dense and expert squares). Not modelled: pp > 1.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "launcher/train_config.h"

namespace tessera::bench {

struct TpTrafficModel {
  std::map<std::string, double> termBytes;  // per step, by term name (above)
  double totalBytes = 0;                    // per step
};

// The model for `job` (a GPT with parallel.tp > 1). Throws InvalidArgument otherwise.
TpTrafficModel tensorParallelTrafficPerStep(const launcher::TrainJobConfig& job);

}  // namespace tessera::bench
