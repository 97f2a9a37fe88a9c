// Step 3 of parallelize()'s composition order: expert parallelism over the
// mesh's ep axis (REFERENCE.md §7; DeepSpeed-MoE arXiv 2201.05596, TED
// arXiv 2303.06318).
//
// The MoE layer's routing is the single-process layer's (core/models/moe.h),
// untouched: each rank routes ITS tokens (capacity C and the aux loss per
// forward over those tokens), dispatches them into a fixed-capacity (E, C, M)
// buffer, and this file moves the buffer to the experts and back:
//
//   (E, C, M)  --all-to-all over ep: expert block j to rank j-->  (E/ep, ep*C, M)
//   local experts (E/ep of them, on every ep rank's slots)
//   (E/ep, ep*C, M)  --all-to-all back--------------------------> (E, C, M) -> combine
//
// Fixed capacity, not uneven splits: every rank's buffer has the same shape
// (C depends only on the token count, equal on every rank), so each direction
// is ONE equal-split all-to-all with no count exchange (an uneven split needs
// the counts first: another collective and a host sync per layer), the
// shapes are static, and the experts run one dense GEMM over their slots. The
// cost is the capacity slack: empty slots travel as zeros. Ranks with
// different token counts per forward get different C; the communicator
// reports the size mismatch as a CommError naming both sizes.
//
// Groups and gradients (the issue's §2, enforced by parallelize()): for the
// dense parameters ep is a data-parallel axis (ranks along ep read different
// batches); an expert's parameters live on one ep rank, and the all-to-all's
// backward carries every ep rank's tokens' gradients into them, so the
// strategy sums them over the ranks holding that expert (dp_shard x
// dp_replicate) and divides by the whole data-parallel size. Ranks are laid
// out by DeviceMesh: ep groups are contiguous (ep is inside dp_shard), the
// expert-data-parallel groups strided, as REFERENCE.md §7 says.
//
// TED (tp > 1): every expert's fc is column-, proj row-parallel over tp
// (GptImpl::applyTensorParallel). The tokens entering the MoE layer are the
// same on every tp rank, so each tp rank routes all of them identically and
// the all-to-all above runs on every tp rank: tp copies of the same bytes.
// Duplicate-token dropping (parallel.moe_dtd) sends each token once: the
// dispatched buffer is split along C over tp (C padded with empty slots to a
// multiple of tp), each tp rank all-to-alls its part over ep, the experts'
// Linears gather the slots over tp before fc and reduce-scatter them after
// proj (their sequence-parallel regions, applied along the slot dim), the
// parts go back over ep, and an all-gather over tp rebuilds (E, C, M) for
// combine. Outputs and gradients are those without DTD; the all-to-all bytes
// drop by the tp degree.
//
// Sequence parallelism: the block gathers the sequence over tp before the MoE
// layer and takes its part after (BlockImpl::forwardWithAux), so routing,
// capacity and drops are those of the whole sequence, as without it, and
// everything above applies unchanged. (A layer routing only its sequence
// shard would cut the all-to-all by tp as DTD does, but change the capacity
// per forward, so the drops, and the loss, would differ from tp = 1.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "tessera/comm/communicator.h"
#include "tessera/core/models/layer_options.h"
#include "tessera/core/trainable.h"

namespace tessera::models {
struct GptConfig;
}

namespace tessera::parallel {

// All-to-all as a differentiable region over `comm` (p ranks): x is split
// into p equal parts along splitDim, part j goes to rank j, and the parts
// received are concatenated along catDim in rank order. Backward is the
// inverse exchange (the gradient split along catDim, concatenated along
// splitDim). Collective over `comm`, forward and backward; the graph keeps
// the communicator alive. InvalidArgument (before any communication) when
// x.size(splitDim) is not divisible by p; CommError / TimeoutError from the
// communicator. With one rank it returns x.
at::Tensor allToAllRegion(const at::Tensor& x, int64_t splitDim, int64_t catDim, comm::CommPtr comm);

// Splits the experts of every MoE layer of `model` (a GPT) over `epComm`:
// rank r keeps global experts [r*E/ep, (r+1)*E/ep) under their global names
// and installs the all-to-all exchange above. `duplicateTokenDropping`:
// DTD over the GPT's tensor-parallel group (call after tensor parallelism;
// nothing to drop without one). Call once, on every rank, before any
// wrapper or optimizer sees the model. Local (communication starts with the
// first forward). Throws ConfigError naming the keys: a model that is not a
// GPT with use_moe ("parallel.ep"), model.moe.num_experts not divisible by
// parallel.ep.
void applyExpertParallel(TrainableModel& model, comm::CommPtr epComm, bool duplicateTokenDropping);

// Whether parameter `name` belongs to an expert ("blocks.<i>.moe.experts.<e>...").
bool isExpertParameter(const std::string& name);

// The bytes one rank sends over ep in the MoE layers' all-to-alls for one
// forward and its backward of `moeLayers` layers on `tokens` tokens per
// forward (B*T of a micro-batch): 4 exchanges per layer (two in forward, two
// in backward) of the buffer (E, C/t, M) fp32, less the part a rank keeps,
// where t = tp with duplicate-token dropping (C padded to a multiple of tp)
// and 1 without. FSDP's recomputation in backward repeats the two forward
// exchanges (not counted here). The model the benchmark and tests compare
// the ep communicator's traffic with.
int64_t allToAllBytesPerPass(const models::GptConfig& config, int64_t moeLayers, int64_t tokens, int ep, int tp,
                             bool duplicateTokenDropping);

}  // namespace tessera::parallel
