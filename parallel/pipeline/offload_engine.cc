// tessera's autograd Engine: the base engine plus default saved-tensor hooks
// for the threads inside an ActivationPool capture (see offload.h for why).
//
// It is installed the way Python's engine installs itself
// (set_default_engine_stub), so Engine::get_default_engine() -- which
// SavedVariable's constructor and backward() both call -- returns it. Graphs
// built before the switch run on it too: an engine holds no per-graph state
// that a graph depends on (GraphTasks carry their own).
#include "parallel/pipeline/offload_engine.h"

#include <torch/csrc/autograd/engine.h>

#include <mutex>

namespace tessera::parallel::pipeline::detail {
namespace {

thread_local SavedTensorSink* threadSink = nullptr;

struct OffloadEngine final : torch::autograd::Engine {
  OffloadEngine() = default;
  // The base engine requires stop() before the subclass part is destroyed
  // (engine.h: a data race on the vptr otherwise), as PythonEngine does.
  ~OffloadEngine() override { stop(); }

  std::unique_ptr<torch::autograd::SavedVariableHooks> get_default_saved_variable_hooks() override {
    return threadSink != nullptr ? threadSink->makeHooks() : nullptr;
  }
};

torch::autograd::Engine& offloadEngine() {
  // Never destroyed before exit: graphs and worker threads may outlive any
  // pool. A function-local static, so it is built on first use.
  static OffloadEngine engine;
  return engine;
}

}  // namespace

void installOffloadEngine() {
  static std::once_flag once;
  std::call_once(once, [] {
    offloadEngine();
    torch::autograd::set_default_engine_stub(&offloadEngine);
  });
}

SavedTensorSink* exchangeThreadSink(SavedTensorSink* sink) {
  SavedTensorSink* previous = threadSink;
  threadSink = sink;
  return previous;
}

}  // namespace tessera::parallel::pipeline::detail
