// Step 2 of parallelize()'s composition order: tensor parallelism over the
// mesh's tp axis (REFERENCE.md §9; Megatron-LM arXiv 1909.08053, sequence
// parallelism arXiv 2205.05198).
//
// The split itself is a mode of the model's layers (core/models: Linear
// column/row, Embedding vocabulary, LayerNorm on sequence shards; the GPT's
// plan is GptImpl::applyTensorParallel); the communication is the region
// functions of tp_regions.h. What lives here is what the rest of the job
// needs to agree with it:
//
// - Data: ranks that differ only along tp read the same batch (the
//   data-parallel group stays the dp axes), and compute the same loss.
// - Gradients: the strategy (none, DDP, FSDP, hybrid) acts on this rank's TP
//   shards, averaging over the dp axes exactly as without TP; each dp group
//   holds one tp coordinate, so shards meet only their own kind.
// - Clipping: the gradient norm is over logical parameters, each counted
//   once: squares of TP-sharded parameters summed over tp, replicated ones
//   (LayerNorm, biases of row-parallel layers, wpe) taken once -- their
//   gradients are identical on every tp rank (under sequence parallelism
//   because copyToShards already summed them).
// - Optimizers: AdamW and SGD are elementwise, so a shard updates as its part
//   of the whole would. DiLoCo (fragments too) and MT-DAO average tensors
//   elementwise over the replicas; a shard's average is its part of the
//   whole's average. DeMo: see optim/demo.h for how its DCT chunks meet the
//   shard boundaries.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/trainable.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::parallel {

// Splits `model` over `tpComm` (collective over it: every rank calls it, in
// the same order relative to other collectives). Today the GPT is the model
// with a tensor-parallel plan. Throws ConfigError naming the key: a model
// without one ("parallel.tp" for model.kind = "mlp"), or what
// GptImpl::applyTensorParallel refuses (model.n_head, model.vocab_size,
// model.use_moe).
void applyTensorParallel(TrainableModel& model, comm::CommPtr tpComm, bool sequenceParallel);

// The names of the parameters of `model` split over tp (those whose pieces
// do not cover their logical tensor). Call before a strategy that frees
// parameters (FSDP) wraps the model. Local.
std::set<std::string> tensorParallelParameters(torch::nn::Module& model);

// The strategy `inner` (built on the tensor-parallel model) with the
// gradient norm over logical parameters (file comment), without expert
// parallelism: withLogicalNorm (logical_norm.h) with no ep and the experts
// held as the dense parameters are, which composes with ep. `tpSharded` from
// tensorParallelParameters(). `shardComm`: the group over which `inner`
// holds distinct shards (FSDP's dp_shard), null when it holds whole
// parameters (none, DDP). Everything else is `inner`'s. gradNorm() is
// collective over shardComm and tpComm.
std::unique_ptr<DataParallel> withTensorParallelNorm(std::unique_ptr<DataParallel> inner,
                                                     std::set<std::string> tpSharded, comm::CommPtr tpComm,
                                                     comm::CommPtr shardComm);

}  // namespace tessera::parallel
