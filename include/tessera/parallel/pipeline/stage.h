// Step 1 of parallelize()'s composition order: the model cut into pipeline
// chunks, and what one pp rank runs of it (REFERENCE.md §6).
//
// The model is cut into p * v chunks (p = the pp degree, v = chunks per rank:
// 1 for GPipe / 1F1B / ZB-H1 / ZB-H2, 2 for ZB-V, `pipeline.virtual_stages`
// for interleaved 1F1B); chunk 0 holds the embedding, the last chunk ln_f,
// the head and the loss. Which rank holds which chunk is the schedule's
// (PipelineSchedule::chunkOwner). One rank holds the union of its chunks in
// ONE module built as a GptPart: every parameter keeps the whole model's name
// (blocks their global index), so checkpoints, export, init_from and the
// optimizers see the tensors of the whole model.
//
// Tied embeddings (model.tie_weights) with chunk 0 and the last chunk on
// different ranks: the last rank holds a copy of wte.weight (GptImpl::
// holdsTiedCopy); the two copies start equal (the init is a function of the
// name) and stay equal because their gradients are summed over the embedding
// group (withPipelineStage) before either optimizer steps -- Megatron's
// embedding group. Checkpoints store it once under wte.weight.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/trainable.h"
#include "tessera/parallel/data_parallel.h"

namespace torch::nn {
class Module;
}

namespace tessera::parallel::pipeline {

// What one pp rank runs: its chunks of the model and the schedule's geometry.
// Plain data; built by planStage().
struct StagePlan {
  int stages = 1;                                       // p: ranks along pp
  int rank = 0;                                         // this rank's pp coordinate
  int chunks = 1;                                       // p * v
  std::vector<int> chunkOwner;                          // chunk -> pp rank
  std::vector<std::pair<int64_t, int64_t>> chunkBlocks; // chunk -> global block range [begin, end)
  std::vector<int> held() const;                        // this rank's chunks, ascending
  bool holds(int chunk) const { return chunkOwner.at(static_cast<size_t>(chunk)) == rank; }
};

// One rank's chunks as the executor drives them. Implementations are not
// thread-safe; the executor calls them from the training thread.
class StageModel {
 public:
  virtual ~StageModel() = default;
  // The module holding every chunk of this rank (what the strategy wraps).
  virtual torch::nn::Module& module() = 0;
  // Forward of chunk `chunk` on a micro-batch. Chunk 0 reads batch.inputs
  // (`input` undefined); any other chunk reads `input`, the previous chunk's
  // output. Returns the chunk's activation, or, for the last chunk, the
  // micro-batch's mean loss (a scalar) -- with MoE, cross-entropy plus
  // moe.aux_loss_weight times the last chunk's own blocks' aux losses.
  // `aux` (may be null): set to the objective's share of a NON-last chunk's
  // MoE blocks, aux_loss_weight * their summed aux loss (() fp32, attached to
  // the graph), which the caller must add to the objective (backpropagate
  // with the activation) and to the reported loss; undefined for the last
  // chunk (already in the loss), for a chunk without MoE blocks and without
  // MoE. A null `aux` drops it: only for callers that neither train nor
  // report (the gradient would miss the load-balancing term). Throws what
  // the model throws.
  virtual at::Tensor forward(int chunk, const at::Tensor& input, const Batch& batch, at::Tensor* aux) = 0;
  // Whether forward can return an aux loss (the model uses MoE). The same on
  // every pp rank of a model: the executor's extra collective over pp (the
  // other stages' aux values reaching the loss) keys on it.
  virtual bool hasAuxLoss() const { return false; }
  // Shape and dtype of the activation between two chunks for `batch`, as
  // this rank holds it (the sequence shard under sequence parallelism): what
  // a receive buffer must be.
  virtual std::vector<int64_t> activationShape(const Batch& batch) const = 0;
  virtual at::ScalarType activationDtype() const { return at::kFloat; }
  // How many of this rank's chunks use parameter `name` (a gradient arrives
  // once per chunk pass that uses it: the tied wte on a rank holding both
  // ends counts 2).
  virtual int chunkUses(const std::string& name) const = 0;
  // Keys dropout for the next forwards (TrainableModel::setRandomKey).
  virtual void setRandomKey(int64_t step, int64_t microBatch) = 0;
};

// The chunk ranges and owners for this rank: chunk ranges from
// gptChunkBlocks over `layersPerChunk` (empty: balanced), owners from the
// schedule. Throws ConfigError naming the key: more chunks than layers or
// counts that do not sum to n_layer ("pipeline.layers_per_stage"). MoE
// models are cut like dense ones (each MoE block stays whole in its chunk;
// its aux loss travels as StageModel::forward says).
StagePlan planStage(const models::GptConfig& config, std::vector<int> chunkOwner, int rank,
                    const std::vector<int64_t>& layersPerChunk);

// The part of the GPT this rank builds (GptImpl(config, partOf(plan))):
// the embedding with chunk 0, the head with the last chunk, the blocks of
// its chunks.
models::GptPart partOf(const StagePlan& plan);

// The executor's view of `model`, whose GPT must have been built as
// partOf(plan) (throws InvalidArgument naming the difference otherwise, and
// ConfigError "parallel.pp" for a model that is not a GPT). `model` must
// outlive the result.
std::unique_ptr<StageModel> makeGptStage(TrainableModel& model, StagePlan plan);

// The strategy for a pipeline rank: `inner` (built on the rank's module)
// plus what the pipeline needs from it --
//   finishGradientSync(): inner's, and for a tied copy the sum of the two
//     wte.weight gradients over `embeddingComm` (the first and last ranks;
//     before inner's sync when it shards, on the full gradient; after it
//     otherwise, on the averaged one);
//   gradNorm(): this STAGE's part of the logical gradient norm (the tied
//     copy counted on the first rank only); the Trainer sums the squares over
//     the stages (CrossStageNorm);
// everything else is inner's. `tpComm` / `shardComm`: the groups over which
// the tied copy's pieces differ (null when whole). Collective like inner.
std::unique_ptr<DataParallel> withPipelineStage(std::unique_ptr<DataParallel> inner, torch::nn::Module& module,
                                                bool tiedCopy, comm::CommPtr embeddingComm, comm::CommPtr tpComm,
                                                comm::CommPtr shardComm);

}  // namespace tessera::parallel::pipeline
