// QueuedWeightGradStore and the switch that puts a module's GEMMs into it.
#include "tessera/core/models/weight_grad_store.h"

#include <torch/nn/module.h>

#include <utility>

#include "tessera/core/models/embedding.h"
#include "tessera/core/models/linear.h"

namespace tessera::models {

void QueuedWeightGradStore::setKey(int64_t key) {
  std::lock_guard<std::mutex> lock(mutex_);
  key_ = key;
}

int64_t QueuedWeightGradStore::key() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return key_;
}

void QueuedWeightGradStore::defer(std::function<void()> weight_grad_gemm) {
  std::lock_guard<std::mutex> lock(mutex_);
  queues_[key_].push_back(std::move(weight_grad_gemm));
}

void QueuedWeightGradStore::drain(int64_t key) {
  for (;;) {
    std::function<void()> next;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = queues_.find(key);
      if (it == queues_.end()) return;
      if (it->second.empty()) {
        queues_.erase(it);
        return;
      }
      next = std::move(it->second.front());
      it->second.pop_front();
    }
    next();  // without the lock: it runs a GEMM and an autograd delivery
  }
}

size_t QueuedWeightGradStore::pending(int64_t key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = queues_.find(key);
  return it == queues_.end() ? 0 : it->second.size();
}

size_t QueuedWeightGradStore::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t n = 0;
  for (const auto& entry : queues_) n += entry.second.size();
  return n;
}

void QueuedWeightGradStore::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  queues_.clear();
}

void setDeferredWeightGradients(torch::nn::Module& module, std::shared_ptr<WeightGradStore> store) {
  module.apply([&store](torch::nn::Module& m) {
    if (auto* linear = dynamic_cast<LinearImpl*>(&m)) linear->setWeightGradStore(store);
    if (auto* embedding = dynamic_cast<EmbeddingImpl*>(&m)) embedding->setWeightGradStore(store);
  });
}

}  // namespace tessera::models
