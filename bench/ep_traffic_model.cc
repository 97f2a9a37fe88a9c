#include "bench/ep_traffic_model.h"

#include "tessera/core/error.h"
#include "tessera/core/models/moe.h"
#include "tessera/parallel/expert_parallel.h"
#include "tessera/parallel/parallelize.h"

namespace tessera::bench {

EpTrafficModel expertParallelTrafficPerStep(const launcher::TrainJobConfig& job) {
  TESSERA_CHECK_ARG(job.model.kind == "gpt" && job.model.gpt.use_moe,
                    "the ep traffic model is for a GPT with model.use_moe = true");
  const auto& gpt = job.model.gpt;
  const auto& parallel = job.parallel;
  EpTrafficModel m;
  m.ep = parallel.mesh.ep;
  m.tp = parallel.mesh.tp;
  m.dtd = parallel.moe_dtd && m.tp > 1;
  // Rank 0 holds pipeline stage 0: its blocks (every block is MoE with use_moe).
  const int pp = parallel.mesh.pp;
  int64_t microBatches = 1;
  if (pp > 1) {
    const models::GptPart part = parallel::pipelinePart(gpt, parallel, /*ppRank=*/0);
    m.moeLayers = part.all_blocks ? gpt.n_layer : static_cast<int64_t>(part.blocks.size());
    microBatches = parallel.pipeline.microBatchesFor(pp);
  } else {
    m.moeLayers = gpt.n_layer;
  }
  m.tokensPerForward = job.data.batch_size / microBatches * job.data.seq_len;
  m.capacity = models::moeCapacity(m.tokensPerForward, gpt.moe.num_experts, gpt.moe.capacity_factor, gpt.moe.top_k);
  const bool fsdp = parallel.strategy == "fsdp" || parallel.strategy == "hybrid";
  m.forwardsPerStep = static_cast<double>(job.train.grad_accum * microBatches) * (fsdp ? 1.5 : 1.0);

  auto perStep = [&](bool dtd) {
    return m.forwardsPerStep * static_cast<double>(parallel::allToAllBytesPerPass(gpt, m.moeLayers, m.tokensPerForward,
                                                                                  m.ep, m.tp, dtd));
  };
  m.termBytes["all_to_all"] = perStep(m.dtd);
  // Integer arithmetic as the communicators record it.
  m.termBytes["grad_norm"] = m.ep > 1 ? static_cast<double>(2 * 8 * 2 * (m.ep - 1) / m.ep) : 0.0;
  for (const auto& [name, bytes] : m.termBytes) m.totalBytes += bytes;
  m.totalBytesWithoutDtd = m.totalBytes - m.termBytes["all_to_all"] + perStep(false);
  return m;
}

}  // namespace tessera::bench
