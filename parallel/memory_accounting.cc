#include "tessera/parallel/memory_accounting.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdio>
#include <unordered_set>

#include "tessera/core/error.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"

namespace tessera::parallel {
namespace {

// Sums storage bytes, each storage once (keyed by its data pointer; a
// storage of 0 bytes -- an FSDP parameter between steps -- has none).
class StorageCounter {
 public:
  // Adds t's storage to `into` unless already counted.
  void add(const at::Tensor& t, int64_t& into) {
    if (!t.defined() || !t.has_storage()) return;
    const at::Storage& storage = t.storage();
    const void* data = storage.data();
    if (data == nullptr || storage.nbytes() == 0) return;
    if (seen_.insert(data).second) into += static_cast<int64_t>(storage.nbytes());
  }

 private:
  std::unordered_set<const void*> seen_;
};

}  // namespace

double MemoryReport::perParameter(int64_t categoryBytes) const {
  return logicalParameters > 0 ? static_cast<double>(categoryBytes) / static_cast<double>(logicalParameters) : 0.0;
}

std::string MemoryReport::toString() const {
  char line[256];
  std::snprintf(line, sizeof line,
                "weights %.2f B/param, master %.2f, grads %.2f, optimizer %.2f, scales %.4f, buffers %.2f, "
                "total %.2f (P = %lld parameters)",
                perParameter(bytes.weights), perParameter(bytes.masterWeights), perParameter(bytes.gradients),
                perParameter(bytes.optimizerState), perParameter(bytes.scales), perParameter(bytes.buffers),
                perParameter(bytes.total()), static_cast<long long>(logicalParameters));
  return line;
}

MemoryReport measureMemory(const torch::nn::Module& model, const optim::Optimizer& optimizer,
                           const MemoryOptions& options) {
  MemoryReport report;
  StorageCounter counter;
  const std::vector<at::Tensor> moduleParameters = model.parameters(/*recurse=*/true);

  // The logical count: distinct parameter storages' elements. Counting by
  // storage (not by tensor) keeps the tied head once.
  int64_t logical = options.logicalParameters;
  if (logical == 0) {
    std::unordered_set<const void*> seen;
    for (const at::Tensor& p : moduleParameters) {
      if (!p.defined() || p.numel() == 0) continue;
      if (seen.insert(p.storage().data()).second) logical += p.numel();
    }
  }
  TESSERA_CHECK_ARG(logical > 0, "measureMemory: the module has no parameter elements (an FSDP module between "
                                 "steps?); pass MemoryOptions::logicalParameters");
  report.logicalParameters = logical;

  // Order matters only for storages reached twice (see the header).
  for (const at::Tensor& p : moduleParameters) counter.add(p, report.bytes.weights);
  for (const at::Tensor& p : options.optimizerParameters) counter.add(p, report.bytes.weights);
  for (const at::Tensor& p : moduleParameters) counter.add(p.grad(), report.bytes.gradients);
  for (const at::Tensor& p : options.optimizerParameters) counter.add(p.grad(), report.bytes.gradients);

  const optim::OptimizerState state = optimizer.state();
  if (auto it = state.perParameter.find("master"); it != state.perParameter.end()) {
    for (const at::Tensor& t : it->second) counter.add(t, report.bytes.masterWeights);
  }
  for (const auto& [kind, tensors] : state.perParameter) {
    if (kind == "master") continue;
    for (const at::Tensor& t : tensors) counter.add(t, report.bytes.optimizerState);
  }
  for (const auto& [kind, tensors] : state.perParameterAux) {
    for (const at::Tensor& t : tensors) counter.add(t, report.bytes.scales);
  }
  for (const at::Tensor& t : options.scales) counter.add(t, report.bytes.scales);
  for (const at::Tensor& b : model.buffers(/*recurse=*/true)) counter.add(b, report.bytes.buffers);
  return report;
}

MemoryReport measureMemory(const torch::nn::Module& model, const optim::Optimizer& optimizer,
                           DataParallel& dataParallel, MemoryOptions options) {
  std::vector<at::Tensor> held = dataParallel.optimizerParameters();
  options.optimizerParameters.insert(options.optimizerParameters.end(), held.begin(), held.end());
  return measureMemory(model, optimizer, options);
}

}  // namespace tessera::parallel
