// Tensor parallelism as parallelize() applies it: the model's split and the
// gradient norm over logical parameters (logical_norm.cc).
#include "tessera/parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <set>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/parallel/logical_norm.h"
#include "tessera/parallel/tp_regions.h"

namespace tessera::parallel {

void applyTensorParallel(TrainableModel& model, comm::CommPtr tpComm, bool sequenceParallel) {
  TESSERA_CHECK_ARG(tpComm != nullptr, "applyTensorParallel needs the tp communicator");
  auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.tp",
                       "tensor parallelism splits GPT layers; model.kind = \"mlp\" runs with tp = 1, got tp = "
                           << tpComm->size());
  gpt->applyTensorParallel(makeTensorParallelGroup(std::move(tpComm)), sequenceParallel);
}

std::set<std::string> tensorParallelParameters(torch::nn::Module& model) {
  std::set<std::string> names;
  for (const models::LogicalParameter& p : models::logicalParameters(model)) {
    int64_t held = 0;
    for (const TensorSlice& slice : p.pieces) held += slice.numel;
    int64_t whole = 1;
    for (int64_t d : p.globalShape) whole *= d;
    if (held != whole) names.insert(p.name);
  }
  return names;
}

std::unique_ptr<DataParallel> withTensorParallelNorm(std::unique_ptr<DataParallel> inner,
                                                     std::set<std::string> tpSharded, comm::CommPtr tpComm,
                                                     comm::CommPtr shardComm) {
  TESSERA_CHECK_ARG(inner != nullptr && tpComm != nullptr, "withTensorParallelNorm needs a strategy and tp");
  // No expert parallelism: experts (TED-split or not) are held as dense parameters are.
  return withLogicalNorm(std::move(inner), std::move(tpSharded), std::move(tpComm), /*epComm=*/nullptr,
                         std::move(shardComm), /*expertShardComm=*/nullptr);
}

}  // namespace tessera::parallel
