// Memory accounting: the bytes a training process holds for its parameters,
// measured, not computed from a formula. measureMemory() walks every tensor
// the model and the optimizer hold and sums the STORAGE bytes behind them,
// each storage counted once (by its data pointer), so views, the tied head
// and optimizer state that aliases the model are not double counted, and
// what is really allocated (FSDP's padding, a gathered full buffer, an FP8
// code tensor) is what shows.
//
// Categories (a storage reached from two of them counts in the first of
// this order):
//   weights         the module's parameters and the tensors the optimizer
//                   updates when those are not the module's (FSDP's shards);
//   gradients       .grad of those (what is held between backward and step);
//   masterWeights   the optimizer state kind "master" (O3's FP16 masters);
//   optimizerState  every other OptimizerState::perParameter tensor;
//   scales          OptimizerState::perParameterAux (FP8 scales, amax
//                   histories) plus any tensors the caller names as scales;
//   buffers         the module's buffers (masks, running stats).
// Bytes per parameter divide by the LOGICAL parameter count: the model's
// distinct parameter elements (tied tensors once), or what the caller gives
// (needed under FSDP, whose module parameters are empty between steps).
// Per rank: under sharding each rank measures what it holds.
//
// Not here: activations, the allocator's caching and fragmentation,
// communication buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace tessera::optim {
class Optimizer;
}

namespace tessera::parallel {

class DataParallel;

struct MemoryBytes {
  int64_t weights = 0;
  int64_t masterWeights = 0;
  int64_t gradients = 0;
  int64_t optimizerState = 0;
  int64_t scales = 0;
  int64_t buffers = 0;
  int64_t total() const { return weights + masterWeights + gradients + optimizerState + scales + buffers; }
};

struct MemoryReport {
  MemoryBytes bytes;              // this rank's storage bytes per category
  int64_t logicalParameters = 0;  // the divisor of the per-parameter figures
  // bytes / logicalParameters (0 when there are no parameters).
  double perParameter(int64_t categoryBytes) const;
  // One line: "weights 4.00 B/param, master 0.00, grads 4.00, optimizer 8.00,
  // scales 0.00, buffers 0.01, total 16.01 (P = 1234 parameters)".
  std::string toString() const;
};

struct MemoryOptions {
  // Tensors the optimizer updates that are not the module's parameters (FSDP's
  // shards: DataParallel::optimizerParameters() or Fsdp::shards()). Their
  // storage counts as weights, their .grad as gradients.
  std::vector<at::Tensor> optimizerParameters;
  // Extra tensors to count as scales (an FP8 recipe's amax histories held
  // outside the optimizer).
  std::vector<at::Tensor> scales;
  // > 0: the divisor for bytes per parameter; 0: the module's distinct
  // parameter elements (throws InvalidArgument when that is 0, e.g. an FSDP
  // module between steps: pass the count).
  int64_t logicalParameters = 0;
};

// Local (not collective); reads the optimizer's state() and the tensors'
// storage only. Throws InvalidArgument as described in MemoryOptions.
MemoryReport measureMemory(const torch::nn::Module& model, const optim::Optimizer& optimizer,
                           const MemoryOptions& options = {});
// The same with options.optimizerParameters = dataParallel.optimizerParameters().
MemoryReport measureMemory(const torch::nn::Module& model, const optim::Optimizer& optimizer,
                           DataParallel& dataParallel, MemoryOptions options = {});

}  // namespace tessera::parallel
