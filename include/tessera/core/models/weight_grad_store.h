// The pipeline's store of deferred weight-gradient GEMMs (issue 16's B/W
// split, Zero Bubble arXiv 2401.10241): a layer in WeightGrad::kDeferred mode
// hands its dW closure to a WeightGradStore during backward (B); the
// schedule's W action runs it later. QueuedWeightGradStore keeps one FIFO per
// key -- the pipeline executor's (chunk, micro-batch) -- so W(c, m) runs
// exactly the closures B(c, m) queued, in the order B queued them.
//
// Usage on one pipeline stage (the executor):
//   auto store = std::make_shared<QueuedWeightGradStore>();
//   setDeferredWeightGradients(stageModule, store);   // every Linear / tied head below
//   dataParallel.setWeightGradStore(store);           // FSDP queues its post-backward behind W
//   ...
//   store->setKey(key(c, m));  backward of (c, m)      // B: input gradients; dW queued under key
//   ...
//   store->drain(key(c, m));                           // W: dW delivered, hooks fire
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#include "tessera/core/models/layer_options.h"

namespace torch::nn {
class Module;
}

namespace tessera::models {

// Thread-safe: defer() may run on an autograd thread while the training
// thread calls the others; every method takes the store's mutex, except that
// drain() runs the closures themselves without it (a closure may defer more
// work into the store -- FSDP's post-backward does not, but a closure that
// runs a backward through a deferred layer would).
class QueuedWeightGradStore final : public WeightGradStore {
 public:
  // Subsequent defer() calls queue under `key` (0 until the first call).
  void setKey(int64_t key);
  int64_t key() const;

  // Appends to the current key's FIFO. Called by a deferred layer's backward.
  void defer(std::function<void()> weight_grad_gemm) override;

  // Runs `key`'s closures in FIFO order, removing each before it runs, then
  // forgets the key; closures queued under `key` while draining run too.
  // Draining a key with nothing queued (never used, or already drained) is a
  // no-op: a W action whose B deferred nothing (a chunk without GEMMs) is
  // legal. If a closure throws, the rest stay queued under `key` and the
  // exception propagates.
  void drain(int64_t key);

  size_t pending(int64_t key) const;  // closures queued under key
  size_t pending() const;             // under every key
  // Drops every queued closure without running it (the gradients they would
  // deliver are lost; for tearing down a failed step).
  void clear();

 private:
  mutable std::mutex mutex_;
  int64_t key_ = 0;
  std::map<int64_t, std::deque<std::function<void()>>> queues_;
};

// Switches every tessera Linear below `module` (itself included) and every
// Embedding's attend (the tied head's GEMM) to WeightGrad::kDeferred with
// `store`; a null store switches them back to kWithInput. Local; call between
// steps, never between a forward and its backward (a graph already built
// keeps the mode it was built with). Layers other than Linear / Embedding
// (LayerNorm) are untouched: their gradients finish in B.
void setDeferredWeightGradients(torch::nn::Module& module, std::shared_ptr<WeightGradStore> store);

}  // namespace tessera::models
