// Internal to activation offload (offload.h): the autograd Engine subclass
// that hands SavedVariables tessera's saved-tensor hooks while a capture is
// active on the calling thread.
#pragma once

#include <torch/csrc/autograd/saved_variable_hooks.h>

#include <memory>

namespace tessera::parallel::pipeline::detail {

// Makes the hooks of one SavedVariable being built on this thread.
class SavedTensorSink {
 public:
  virtual ~SavedTensorSink() = default;
  virtual std::unique_ptr<torch::autograd::SavedVariableHooks> makeHooks() = 0;
};

// Makes tessera's engine the process's default autograd engine, once
// (thread-safe, idempotent). Call it before any backward that should see the
// hooks runs; it is never uninstalled (an engine has to outlive every graph).
void installOffloadEngine();

// Routes the saves of the calling thread to `sink` (nullptr: none, autograd's
// default behaviour); returns the previous sink, for nesting.
SavedTensorSink* exchangeThreadSink(SavedTensorSink* sink);

}  // namespace tessera::parallel::pipeline::detail
