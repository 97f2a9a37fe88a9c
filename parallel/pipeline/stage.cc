// A pipeline rank's chunks of the GPT, and the strategy wrapper for its tied copy.
#include "tessera/parallel/pipeline/stage.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline {

std::vector<int> StagePlan::held() const {
  std::vector<int> chunks;
  for (size_t c = 0; c < chunkOwner.size(); ++c) {
    if (chunkOwner[c] == rank) chunks.push_back(static_cast<int>(c));
  }
  return chunks;
}

StagePlan planStage(const models::GptConfig& config, std::vector<int> chunkOwner, int rank,
                    const std::vector<int64_t>& layersPerChunk) {
  TESSERA_CHECK_ARG(!chunkOwner.empty(), "planStage: the schedule owns no chunk");
  StagePlan plan;
  plan.rank = rank;
  plan.chunks = static_cast<int>(chunkOwner.size());
  plan.stages = *std::max_element(chunkOwner.begin(), chunkOwner.end()) + 1;
  plan.chunkOwner = std::move(chunkOwner);
  plan.chunkBlocks = models::gptChunkBlocks(config.n_layer, plan.chunks, layersPerChunk);
  return plan;
}

models::GptPart partOf(const StagePlan& plan) {
  models::GptPart part;
  part.all_blocks = false;
  part.embedding = plan.holds(0);
  part.head = plan.holds(plan.chunks - 1);
  for (int c : plan.held()) {
    const auto [begin, end] = plan.chunkBlocks[static_cast<size_t>(c)];
    for (int64_t b = begin; b < end; ++b) part.blocks.push_back(b);
  }
  std::sort(part.blocks.begin(), part.blocks.end());
  return part;
}

namespace {

class GptStage final : public StageModel {
 public:
  GptStage(TrainableModel& model, models::GptImpl& gpt, StagePlan plan)
      : model_(model), gpt_(gpt), plan_(std::move(plan)) {}

  torch::nn::Module& module() override { return gpt_; }

  at::Tensor forward(int chunk, const at::Tensor& input, const Batch& batch, at::Tensor* aux) override {
    if (aux) *aux = at::Tensor();
    const auto [begin, end] = plan_.chunkBlocks.at(static_cast<size_t>(chunk));
    const at::Tensor x = chunk == 0 ? gpt_.embed(batch.inputs) : input;  // (b, T_r, C)
    models::BlockOutput body = gpt_.runBlocks(x, begin, end);            // (b, T_r, C), aux () or undefined
    if (chunk + 1 < plan_.chunks) {
      // The chunk's share of the objective; the executor adds it (GptImpl::lossFromLogits' weighting).
      if (aux && body.aux.defined()) *aux = body.aux * gpt_.config().moe.aux_loss_weight;
      return body.x;
    }
    models::GptOutput out = gpt_.logits(body.x);
    if (body.aux.defined()) out.aux_loss = body.aux;  // lossFromLogits adds weight * the last chunk's own aux
    return gpt_.lossFromLogits(out, batch.targets);    // ()
  }

  bool hasAuxLoss() const override { return gpt_.config().use_moe; }

  std::vector<int64_t> activationShape(const Batch& batch) const override {
    int64_t T = batch.inputs.size(1);
    if (gpt_.sequenceParallel()) T /= gpt_.tensorParallelGroup()->size();
    return {batch.inputs.size(0), T, gpt_.config().d_model};
  }

  int chunkUses(const std::string& name) const override {
    int uses = 0;
    for (int c : plan_.held()) uses += chunkUses(c, name) ? 1 : 0;
    return uses;
  }

  void setRandomKey(int64_t step, int64_t microBatch) override { model_.setRandomKey(step, microBatch); }

 private:
  // Whether chunk `c` reads parameter `name`.
  bool chunkUses(int c, const std::string& name) const {
    const bool first = c == 0, last = c + 1 == plan_.chunks;
    if (name.rfind("blocks.", 0) == 0) {
      const int64_t block = std::atoll(name.c_str() + 7);
      const auto [begin, end] = plan_.chunkBlocks[static_cast<size_t>(c)];
      return block >= begin && block < end;
    }
    if (name.rfind("wte.", 0) == 0) return first || (last && gpt_.config().tie_weights);
    if (name.rfind("wpe.", 0) == 0) return first;
    return last;  // ln_f, head
  }

  TrainableModel& model_;
  models::GptImpl& gpt_;
  StagePlan plan_;
};

}  // namespace

std::unique_ptr<StageModel> makeGptStage(TrainableModel& model, StagePlan plan) {
  auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.pp",
                       "pipeline stages cut GPT blocks; model.kind = \"mlp\" runs with pp = 1");
  const models::GptPart want = partOf(plan);
  const models::GptPart& have = gpt->part();
  TESSERA_CHECK_ARG(have.embedding == want.embedding && have.head == want.head && !have.all_blocks &&
                        have.blocks == want.blocks,
                    "pipeline rank " << plan.rank << ": the model was not built as this rank's part "
                                     << "(build it with GptImpl(config, pipeline::partOf(plan)))");
  return std::make_unique<GptStage>(model, *gpt, std::move(plan));
}

namespace {

// The pipeline rank's strategy: the tied copy's gradient summed with the
// first rank's, and the stage's share of the logical norm.
class PipelineStageStrategy final : public DataParallelWrapper {
 public:
  PipelineStageStrategy(std::unique_ptr<DataParallel> inner, torch::nn::Module& module, bool tiedCopy,
                        comm::CommPtr embeddingComm, comm::CommPtr tpComm, comm::CommPtr shardComm)
      : DataParallelWrapper(std::move(inner)), embeddingComm_(std::move(embeddingComm)), tpComm_(std::move(tpComm)),
        shardComm_(std::move(shardComm)) {
    if (embeddingComm_ && embeddingComm_->size() > 1) {
      for (const auto& item : module.named_parameters()) {
        if (item.key() == "wte.weight") wte_ = item.value();
      }
      TESSERA_CHECK_ARG(wte_.defined(), "withPipelineStage: an embedding group without wte.weight");
    }
    if (tiedCopy) {
      const auto layout = parameterLayout();
      for (size_t i = 0; i < layout.size(); ++i) {
        for (const ParameterPiece& piece : layout[i]) {
          if (piece.name == "wte.weight") copyRanges_.push_back({i, piece.tensorOffset, piece.slice.numel});
        }
      }
    }
  }

  void finishGradientSync() override {
    // The sum of the two copies' gradients: on the full gradient before a
    // sharding strategy scatters it, on the averaged one after DDP's sync
    // (whose buckets may still hold it before).
    const bool before = sharded();
    if (before) sumTiedGradients();
    inner().finishGradientSync();
    if (!before) sumTiedGradients();
  }

  double gradNorm() override {
    const double norm = inner().gradNorm();
    if (copyRanges_.empty()) return norm;
    // Minus the tied copy's squares: the first rank counts wte.weight.
    const std::vector<at::Tensor> params = optimizerParameters();
    at::Tensor copy = at::zeros({1}, at::kDouble);
    for (const Range& r : copyRanges_) {
      const at::Tensor& grad = params[r.tensor].grad();
      if (grad.defined()) copy += grad.reshape({-1}).narrow(0, r.offset, r.numel).to(at::kDouble).pow(2).sum();
    }
    if (shardComm_ && shardComm_->size() > 1) shardComm_->allReduce(copy, comm::ReduceOp::kSum);
    if (tpComm_ && tpComm_->size() > 1) tpComm_->allReduce(copy, comm::ReduceOp::kSum);
    const double rest = norm * norm - copy.item<double>();
    if (!std::isfinite(rest)) return rest;
    return std::sqrt(std::max(0.0, rest));
  }

 private:
  void sumTiedGradients() {
    if (!wte_.defined()) return;
    at::Tensor grad = wte_.grad();
    if (!grad.defined() || grad.numel() == 0) return;  // FSDP's sharded root: see its own grads
    at::Tensor flat = grad.contiguous();
    embeddingComm_->allReduce(flat, comm::ReduceOp::kSum);
    if (!flat.is_same(grad)) grad.copy_(flat);
  }

  struct Range {
    size_t tensor;
    int64_t offset;
    int64_t numel;
  };
  comm::CommPtr embeddingComm_;
  comm::CommPtr tpComm_;
  comm::CommPtr shardComm_;
  at::Tensor wte_;
  std::vector<Range> copyRanges_;
};

}  // namespace

std::unique_ptr<DataParallel> withPipelineStage(std::unique_ptr<DataParallel> inner, torch::nn::Module& module,
                                                bool tiedCopy, comm::CommPtr embeddingComm, comm::CommPtr tpComm,
                                                comm::CommPtr shardComm) {
  TESSERA_CHECK_ARG(inner != nullptr, "withPipelineStage needs a strategy");
  return std::make_unique<PipelineStageStrategy>(std::move(inner), module, tiedCopy, std::move(embeddingComm),
                                                 std::move(tpComm), std::move(shardComm));
}

}  // namespace tessera::parallel::pipeline
