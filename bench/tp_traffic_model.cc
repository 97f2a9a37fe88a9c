#include "bench/tp_traffic_model.h"

#include "tessera/core/error.h"

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

  TpTrafficModel m;
  // One all-reduce of N C, or its all-gather + reduce-scatter: the same bytes.
  const double activation = sequence ? 2 * gatherOrScatter * N * C : allReduce * N * C;
  m.termBytes["embedding"] = micro * activation;
  // Forward collectives of a block: 2 all-reduces, or 2 all-gathers + 2 reduce-scatters.
  const double blockForward = sequence ? 4 * gatherOrScatter * N * C : 2 * allReduce * N * C;
  const double blockBackward = sequence ? 4 * gatherOrScatter * N * C : 2 * allReduce * N * C;
  m.termBytes["blocks_forward"] = micro * L * blockForward;
  m.termBytes["blocks_backward"] = micro * L * blockBackward;
  if (fsdp) m.termBytes["blocks_recompute"] = micro * L * blockForward;
  m.termBytes["head"] = micro * activation;
  m.termBytes["cross_entropy"] = micro * allReduce * (N + 3 * N);
  if (sequence) {
    double params = L * (2 * 2 * C + 2 * C) + 2 * C;
    if (gpt.positions == "learned") params += static_cast<double>(gpt.block_size) * C;
    m.termBytes["sequence_parallel_params"] = micro * allReduce * params;
  }
  m.termBytes["grad_norm"] = 2 * f * 8;
  for (const auto& [name, bytes] : m.termBytes) m.totalBytes += bytes;
  return m;
}

}  // namespace tessera::bench
