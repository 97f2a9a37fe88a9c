#include "bench/tp_traffic_model.h"

#include "tessera/core/error.h"
#include "tessera/core/models/moe.h"

namespace tessera::bench {

TpTrafficModel tensorParallelTrafficPerStep(const launcher::TrainJobConfig& job) {
  const int64_t p = job.parallel.mesh.tp;
  TESSERA_CHECK_ARG(job.model.kind == "gpt" && p > 1, "the tp traffic model is for a GPT with parallel.tp > 1");
  const auto& gpt = job.model.gpt;
  const double e = 4;  // fp32 activations and gradients
  const double f = static_cast<double>(p - 1) / static_cast<double>(p);
  const double N = static_cast<double>(job.data.batch_size) * static_cast<double>(job.data.seq_len);
  const double C = static_cast<double>(gpt.d_model);
  const double L = static_cast<double>(gpt.n_layer);
  const double allReduce = 2 * f * e;  // bytes sent per element all-reduced
  const double gatherOrScatter = f * e;  // per element of the whole tensor
  const bool sequence = job.parallel.sequence_parallel;
  const bool fsdp = job.parallel.strategy == "fsdp" || job.parallel.strategy == "hybrid";
  const double micro = static_cast<double>(job.train.grad_accum);
  const bool moe = gpt.use_moe;

  TpTrafficModel m;
  // One all-reduce of N C, or its all-gather + reduce-scatter: the same bytes.
  const double activation = sequence ? 2 * gatherOrScatter * N * C : allReduce * N * C;
  m.termBytes["embedding"] = micro * activation;
  // A block's attention and dense MLP: one all-reduce of N C each way (or
  // all-gather + reduce-scatter). An MoE block's feed-forward instead
  // gathers the sequence forward and scatters it (all-gather backward) under
  // sequence parallelism, and communicates inside its experts (below).
  const double moeSequence = moe && sequence ? gatherOrScatter * N * C : 0;
  const double blockForward = activation * (moe ? 1 : 2) + moeSequence;
  const double blockBackward = activation * (moe ? 1 : 2) + moeSequence;
  m.termBytes["blocks_forward"] = micro * L * blockForward;
  m.termBytes["blocks_backward"] = micro * L * blockBackward;
  double expertsForward = 0;
  double expertsForwardOfLayers = 0;  // the part inside the experts' Linears
  if (moe) {
    const auto& cfg = gpt.moe;
    const int64_t ep = job.parallel.mesh.ep;
    const double E = static_cast<double>(cfg.num_experts);
    const double localExperts = E / static_cast<double>(ep);
    const int64_t capacity = models::moeCapacity(job.data.batch_size * job.data.seq_len, cfg.num_experts,
                                                 cfg.capacity_factor, cfg.top_k);
    double expertsBackward = 0;
    if (job.parallel.moe_dtd) {
      // Slots padded to C' (a multiple of p) and split over tp: per local
      // expert fc's gatherFromSequence and proj's reduceScatterToSequence on
      // (ep C', M), each one collective of the whole tensor each way, and
      // the all-reduce of proj's bias gradient (added on slot shards); the
      // exchange's gatherFromShards (forward) and scatterToShards (backward)
      // on the (E, C', M) buffer.
      const double padded = static_cast<double>((capacity + p - 1) / p * p);
      const double slots = E * padded * C;  // (E, C', M) = local experts x (ep C', M)
      expertsForwardOfLayers = 2 * gatherOrScatter * slots;
      expertsForward = expertsForwardOfLayers + gatherOrScatter * slots;
      expertsBackward = 2 * gatherOrScatter * slots + gatherOrScatter * slots + allReduce * localExperts * C;
    } else {
      // Per local expert: proj's forward all-reduce and fc's backward
      // all-reduce of its (ep C, M) slots.
      const double slots = E * static_cast<double>(capacity) * C;
      expertsForwardOfLayers = allReduce * slots;
      expertsForward = expertsForwardOfLayers;
      expertsBackward = allReduce * slots;
    }
    m.termBytes["experts_forward"] = micro * L * expertsForward;
    m.termBytes["experts_backward"] = micro * L * expertsBackward;
  }
  if (fsdp) {
    // FSDP recomputes each block's forward in backward; with ep > 1 the
    // experts are a unit of their own, recomputed once more in their backward.
    const double expertsAgain = job.parallel.mesh.ep > 1 ? expertsForwardOfLayers : 0;
    m.termBytes["blocks_recompute"] = micro * L * (blockForward + expertsForward + expertsAgain);
  }
  m.termBytes["head"] = micro * activation;
  m.termBytes["cross_entropy"] = micro * allReduce * (N + 3 * N);
  if (sequence) {
    // ln1, ln2 (2 C each), attn.proj's bias and the dense MLP's proj bias (C each).
    double params = L * (2 * 2 * C + C + (moe ? 0 : C)) + 2 * C;
    if (gpt.positions == "learned") params += static_cast<double>(gpt.block_size) * C;
    m.termBytes["sequence_parallel_params"] = micro * allReduce * params;
  }
  // The logical norm's all-reduce of 2 float64 (dense and expert tp squares).
  m.termBytes["grad_norm"] = 2 * f * 16;
  for (const auto& [name, bytes] : m.termBytes) m.totalBytes += bytes;
  return m;
}

}  // namespace tessera::bench
