// ActivationPool: the saved-tensor hooks, the per-storage bookkeeping and the
// copy thread of activation offload (see offload.h for the contract and the
// mechanism; offload_engine.cc installs the hooks; offload_copy.cc copies).
//
// Bookkeeping: one StorageEntry per storage saved under a capture, shared by
// every saved view of it (the hooks of those views hold the entry). An entry
// belongs to the key that first saved it; offload(key) moves the key's own
// entries. Entries die with the last hook holding them, i.e. when autograd
// frees the graph, and leave the resident count then.
#include "tessera/parallel/pipeline/offload.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/saved_variable_hooks.h>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <thread>

#include "parallel/pipeline/offload_engine.h"
#include "parallel/pipeline/offload_internal.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline {
namespace detail {

using Clock = std::chrono::steady_clock;

std::string describeKey(int64_t key) {
  std::ostringstream out;
  out << "activation offload: key " << key;
  return out.str();
}

PoolState::PoolState(const ActivationPool::Options& options) : options_(options) {
  for (const at::Tensor& p : options.parameters) {
    if (p.defined() && p.has_storage()) parameterStorages_.insert(p.storage().unsafeGetStorageImpl());
  }
}

bool PoolState::managed(const at::Tensor& t) const {
  if (!t.has_storage() || t.layout() != at::kStrided || t.is_quantized() || t.is_conj() || t.is_neg()) return false;
  if (t.is_leaf() && t.requires_grad()) return false;  // a parameter, or the stage's input
  if (t.is_view()) {
    // A view of a parameter (weight.t() before a matmul) is not a leaf but
    // holds the parameter's storage.
    const at::TensorBase& base = t._base();
    if (base.is_leaf() && base.requires_grad()) return false;
  }
  return parameterStorages_.count(t.storage().unsafeGetStorageImpl()) == 0;
}

void PoolState::addResident(int64_t bytes) {
  resident_ += bytes;
  peak_ = std::max(peak_, resident_);
}

std::shared_ptr<StorageEntry> PoolState::entryFor(int64_t key, const at::Tensor& t) {
  const c10::Storage& storage = t.storage();
  const c10::StorageImpl* impl = storage.unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = byStorage_.find(impl);
  if (found != byStorage_.end()) {
    if (std::shared_ptr<StorageEntry> entry = found->second.weak.lock()) return entry;
  }
  auto entry = std::make_shared<StorageEntry>();
  entry->pool = shared_from_this();
  entry->key = key;
  entry->nbytes = static_cast<int64_t>(storage.nbytes());
  entry->device = storage.device();
  entry->offloadable = entry->nbytes >= options_.minBytes && (entry->device.is_cpu() || entry->device.is_cuda());
  entry->resident = storage;
  entry->registeredAs = impl;
  byStorage_[impl] = {entry, entry.get()};
  keys_[key].entries.push_back(entry);
  addResident(entry->nbytes);
  return entry;
}

void PoolState::forget(StorageEntry& entry) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (entry.counted) resident_ -= entry.nbytes;
  unregister(entry);
}

void PoolState::unregister(StorageEntry& entry) {
  if (entry.registeredAs == nullptr) return;
  auto found = byStorage_.find(entry.registeredAs);
  // Only our own slot: an expired entry's slot may already hold a newer entry.
  if (found != byStorage_.end() && found->second.raw == &entry) byStorage_.erase(found);
  entry.registeredAs = nullptr;
}

void PoolState::finishOffload(StorageEntry& entry, c10::Storage host, const std::string& error,
                              c10::Storage& dropped) {
  if (!error.empty()) {
    entry.error = "offload failed: " + error;  // still resident; the unpack reports it
    entry.residence = Residence::kResident;
  } else {
    entry.host = std::move(host);
    dropped = std::move(entry.resident);  // freed by the caller, outside the lock
    entry.residence = Residence::kOffloaded;
    unregister(entry);
    if (entry.counted) resident_ -= entry.nbytes;
    entry.counted = false;
  }
  changed_.notify_all();
}

void PoolState::finishReload(StorageEntry& entry, c10::Storage back, const std::string& error) {
  if (!error.empty()) {
    entry.error = "reload failed: " + error;
    entry.residence = Residence::kOffloaded;
    if (entry.counted) resident_ -= entry.nbytes;
    entry.counted = false;
  } else {
    entry.resident = std::move(back);
    entry.host = c10::Storage();
    entry.residence = Residence::kResident;
  }
  changed_.notify_all();
}

void PoolState::beginReload(StorageEntry& entry) {
  entry.residence = Residence::kReloading;
  addResident(entry.nbytes);  // the device copy is allocated now
  entry.counted = true;
}

c10::Storage PoolState::residentStorage(StorageEntry& entry) {
  std::unique_lock<std::mutex> lock(mutex_);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(options_.timeoutSeconds));
  for (;;) {
    TESSERA_CHECK(entry.error.empty(), describeKey(entry.key) << ": " << entry.error);
    if (entry.residence == Residence::kResident) return entry.resident;
    if (entry.residence == Residence::kOffloaded && !entry.reloadQueued) {
      // Nobody asked it back (no reload(), or the pool is gone): copy it back here.
      beginReload(entry);
      const c10::Storage host = entry.host;
      lock.unlock();
      c10::Storage back;
      std::string error;
      try {
        back = copyStorage(host, entry.device, CopyStreams{});
      } catch (const std::exception& e) {
        error = e.what();
      }
      lock.lock();
      finishReload(entry, std::move(back), error);
      continue;
    }
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
      throw TimeoutError(describeKey(entry.key) + ": a saved tensor's copy " +
                         (entry.residence == Residence::kOffloading ? "to" : "back from") +
                         " host memory did not finish within " + std::to_string(options_.timeoutSeconds) +
                         " s (is the copy thread stuck?)");
    }
  }
}

void PoolState::enqueue(int64_t key, bool reload) {
  Job job;
  job.key = key;
  job.reload = reload;
  // Declared before the lock: the last reference to an entry may go here,
  // and its destructor takes the lock.
  std::vector<std::shared_ptr<StorageEntry>> alive;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = keys_.find(key);
    TESSERA_CHECK_ARG(found != keys_.end(), describeKey(key)
                                                << ": " << (reload ? "reload" : "offload")
                                                << " of a key that was never captured or is already released; "
                                                   "capture(key) must wrap the key's F first");
    for (const auto& weak : found->second.entries) {
      job.entries.push_back(weak);
      // An unpack waits for a queued reload rather than racing it with a copy of its own.
      if (auto entry = weak.lock(); entry && reload) {
        entry->reloadQueued = true;
        alive.push_back(std::move(entry));
      }
    }
  }
  // Which stream work must be ordered against is known only on the compute
  // thread (this one): record it now, the copy thread uses it later.
  job.streams = computeStreamsOf(job.entries, reload);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  work_.notify_one();
}

void PoolState::runCopies() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
    if (stopping_) return;
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    busy_ = true;
    lock.unlock();
    runJob(job);
    lock.lock();
    busy_ = false;
    changed_.notify_all();
  }
}

void PoolState::runJob(const Job& job) {
  const Residence from = job.reload ? Residence::kOffloaded : Residence::kResident;
  for (const auto& weak : job.entries) {
    std::shared_ptr<StorageEntry> entry = weak.lock();
    if (!entry) continue;  // freed by autograd meanwhile
    c10::Storage source;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (job.reload) {
        entry->reloadQueued = false;
        changed_.notify_all();
      }
      if (!entry->offloadable || entry->residence != from || !entry->error.empty()) continue;
      if (job.reload) {
        beginReload(*entry);
        source = entry->host;
      } else {
        entry->residence = Residence::kOffloading;
        source = entry->resident;
      }
    }
    c10::Storage copy;
    std::string error;
    try {
      if (options_.beforeCopy) options_.beforeCopy(job.key, job.reload);
      copy = job.reload ? copyStorage(source, entry->device, job.streams)
                        : copyStorage(source, c10::Device(c10::kCPU), job.streams);
    } catch (const std::exception& e) {
      error = e.what();
    }
    c10::Storage dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (job.reload) {
        finishReload(*entry, std::move(copy), error);
      } else {
        finishOffload(*entry, std::move(copy), error, dropped);
      }
    }
    // `dropped`, `source` and `entry` go here, outside the lock: the last
    // reference to an entry runs its destructor, which takes the lock.
  }
}

// One SavedVariable's hooks: the tensor itself when the pool does not manage
// it, else its storage's entry and the view to rebuild on it.
class OffloadHooks final : public torch::autograd::SavedVariableHooks {
 public:
  OffloadHooks(std::shared_ptr<PoolState> pool, int64_t key) : pool_(std::move(pool)), key_(key) {}

  void call_pack_hook(const at::Tensor& tensor) override {
    if (!pool_->managed(tensor)) {
      kept_ = tensor.detach();  // detached: no cycle through an output's grad_fn
      return;
    }
    entry_ = pool_->entryFor(key_, tensor);
    dtype_ = tensor.scalar_type();
    sizes_ = tensor.sizes().vec();
    strides_ = tensor.strides().vec();
    offset_ = tensor.storage_offset();
  }

  at::Tensor call_unpack_hook() override {
    if (!entry_) return kept_;
    const c10::Storage storage = pool_->residentStorage(*entry_);
    at::NoGradGuard noGrad;
    at::Tensor view = at::empty({0}, at::TensorOptions().dtype(dtype_).device(storage.device()));
    view.set_(storage, offset_, sizes_, strides_);
    return view;
  }

 private:
  std::shared_ptr<PoolState> pool_;
  int64_t key_;
  at::Tensor kept_;
  std::shared_ptr<StorageEntry> entry_;
  at::ScalarType dtype_ = at::kFloat;
  std::vector<int64_t> sizes_, strides_;
  int64_t offset_ = 0;
};

StorageEntry::~StorageEntry() {
  if (pool) pool->forget(*this);
}

}  // namespace detail

namespace {

// The thread's capture: routes the saves made on it to the pool under `key`.
class CaptureScope final : public ActivationPool::Capture, public detail::SavedTensorSink {
 public:
  CaptureScope(std::shared_ptr<detail::PoolState> pool, int64_t key) : pool_(std::move(pool)), key_(key) {
    previous_ = detail::exchangeThreadSink(this);
  }
  ~CaptureScope() override { detail::exchangeThreadSink(previous_); }

  std::unique_ptr<torch::autograd::SavedVariableHooks> makeHooks() override {
    return std::make_unique<detail::OffloadHooks>(pool_, key_);
  }

 private:
  std::shared_ptr<detail::PoolState> pool_;
  int64_t key_;
  detail::SavedTensorSink* previous_ = nullptr;
};

}  // namespace

const std::vector<std::string>& offloadPolicies() {
  static const std::vector<std::string> names{"none", "all", "selective"};
  return names;
}

ActivationPool::ActivationPool(Options options) : options_(std::move(options)) {
  const auto& names = offloadPolicies();
  TESSERA_CHECK_ARG(std::find(names.begin(), names.end(), options_.policy) != names.end(),
                    "pipeline.offload: unknown policy \"" << options_.policy
                                                          << "\"; valid: \"none\", \"all\", \"selective\"");
  TESSERA_CHECK_ARG(options_.budgetBytes >= 0,
                    "pipeline.offload_budget_mb must be >= 0, got " << options_.budgetBytes / (1 << 20));
  TESSERA_CHECK_ARG(options_.timeoutSeconds > 0, "activation offload: timeoutSeconds must be > 0");
  detail::installOffloadEngine();
  state_ = std::make_shared<detail::PoolState>(options_);
  state_->startCopyThread();
}

ActivationPool::~ActivationPool() { state_->stopCopyThread(); }

std::unique_ptr<ActivationPool::Capture> ActivationPool::capture(int64_t key) {
  state_->openKey(key);
  return std::make_unique<CaptureScope>(state_, key);
}

void ActivationPool::offload(int64_t key) { state_->enqueue(key, /*reload=*/false); }
void ActivationPool::reload(int64_t key) { state_->enqueue(key, /*reload=*/true); }
void ActivationPool::release(int64_t key) { state_->closeKey(key); }
void ActivationPool::waitIdle() { state_->waitIdle(); }
int64_t ActivationPool::residentBytes() const { return state_->residentBytes(); }
int64_t ActivationPool::peakResidentBytes() const { return state_->peakResidentBytes(); }
void ActivationPool::resetPeak() { state_->resetPeak(); }

bool ActivationPool::shouldOffload(int64_t /*key*/) const {
  if (options_.policy == "all") return true;
  if (options_.policy == "selective") return static_cast<double>(residentBytes()) > options_.budgetBytes;
  return false;
}

namespace detail {

void PoolState::startCopyThread() {
  copyThread_ = std::thread([this] { runCopies(); });
}

void PoolState::stopCopyThread() {
  std::vector<std::shared_ptr<StorageEntry>> alive;  // released after the lock (see enqueue)
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    for (const Job& job : jobs_) {
      for (const auto& weak : job.entries) {
        if (auto entry = weak.lock()) {
          entry->reloadQueued = false;  // their unpacks copy back themselves
          alive.push_back(std::move(entry));
        }
      }
    }
    jobs_.clear();
    changed_.notify_all();
  }
  work_.notify_all();
  if (copyThread_.joinable()) copyThread_.join();
}

void PoolState::openKey(int64_t key) {
  std::lock_guard<std::mutex> lock(mutex_);
  keys_[key];
}

void PoolState::closeKey(int64_t key) {
  std::lock_guard<std::mutex> lock(mutex_);
  keys_.erase(key);
}

void PoolState::waitIdle() {
  std::unique_lock<std::mutex> lock(mutex_);
  const bool idle = changed_.wait_for(lock, std::chrono::duration<double>(options_.timeoutSeconds),
                                      [&] { return jobs_.empty() && !busy_; });
  TESSERA_CHECK_T(TimeoutError, idle,
                  "activation offload: the copy thread still had " << jobs_.size() + (busy_ ? 1 : 0)
                                                                   << " job(s) after " << options_.timeoutSeconds
                                                                   << " s");
}

int64_t PoolState::residentBytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return resident_;
}

int64_t PoolState::peakResidentBytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return peak_;
}

void PoolState::resetPeak() {
  std::lock_guard<std::mutex> lock(mutex_);
  peak_ = resident_;
}

}  // namespace detail
}  // namespace tessera::parallel::pipeline
