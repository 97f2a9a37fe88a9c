// Internal to activation offload (offload.h): the pool's shared state, its
// per-storage entries and the copies. Shared between offload.cc (hooks,
// bookkeeping, copy thread) and offload_copy.cc (the byte copies per device).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Storage.h>
#include <c10/core/Stream.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "tessera/parallel/pipeline/offload.h"

namespace tessera::parallel::pipeline::detail {

struct PoolState;

enum class Residence {
  kResident,    // in the compute pool (CPU memory on CPU, device memory on CUDA)
  kOffloading,  // being copied out; still resident
  kOffloaded,   // only the host copy exists
  kReloading,   // being copied back; the device copy is allocated
};

// One saved storage. Fields after `registeredAs` are guarded by the pool's mutex.
struct StorageEntry {
  std::shared_ptr<PoolState> pool;
  int64_t key = 0;         // the key that saved it first, whose offload() moves it
  int64_t nbytes = 0;
  c10::Device device{c10::kCPU};
  bool offloadable = false;  // >= minBytes, on CPU or CUDA
  const c10::StorageImpl* registeredAs = nullptr;  // its slot in PoolState::byStorage_, while resident
  Residence residence = Residence::kResident;
  bool counted = true;     // in PoolState::resident_
  bool reloadQueued = false;  // a reload job will copy it back: unpacks wait for it
  c10::Storage resident;   // defined when kResident / kOffloading
  c10::Storage host;       // defined when kOffloaded / kReloading
  std::string error;       // a failed copy; the unpack throws it
  ~StorageEntry();         // leaves the count (autograd freed the graph)
};

// The compute-stream side of a job on CUDA, taken on the compute thread when
// offload()/reload() is called: the stream F/B run on and, for an offload, an
// event recorded on it then (the copy must not read before F's kernels wrote).
struct CopyStreams {
  struct PerDevice {
    c10::Device device;
    c10::Stream compute;
    std::shared_ptr<c10::Event> ready;  // offload only
  };
  std::vector<PerDevice> devices;  // empty on CPU
};

// A copy of `source`'s bytes into a new storage on `target` (CPU: memcpy on
// the calling thread; CUDA: on a side stream, waited for before returning).
// Throws on failure (allocation, device error).
c10::Storage copyStorage(const c10::Storage& source, c10::Device target, const CopyStreams& streams);
// The CopyStreams of the entries' CUDA devices (empty when none is on CUDA).
CopyStreams computeStreamsOf(const std::vector<std::weak_ptr<StorageEntry>>& entries, bool reload);

std::string describeKey(int64_t key);  // "activation offload: key 7"

struct PoolState : std::enable_shared_from_this<PoolState> {
  explicit PoolState(const ActivationPool::Options& options);

  // Hooks side (compute thread).
  bool managed(const at::Tensor& t) const;  // false: kept as is, not counted
  std::shared_ptr<StorageEntry> entryFor(int64_t key, const at::Tensor& t);
  c10::Storage residentStorage(StorageEntry& entry);  // waits, or copies back itself
  void forget(StorageEntry& entry);

  // Pool side.
  void openKey(int64_t key);
  void closeKey(int64_t key);
  void enqueue(int64_t key, bool reload);
  void waitIdle();
  int64_t residentBytes() const;
  int64_t peakResidentBytes() const;
  void resetPeak();
  void startCopyThread();
  void stopCopyThread();

 private:
  struct Job {
    int64_t key = 0;
    bool reload = false;
    std::vector<std::weak_ptr<StorageEntry>> entries;
    CopyStreams streams;
  };
  struct KeyRecord {
    std::vector<std::weak_ptr<StorageEntry>> entries;  // those it owns
  };
  struct Slot {
    std::weak_ptr<StorageEntry> weak;
    const StorageEntry* raw = nullptr;  // to recognise our own slot once `weak` expired
  };

  void runCopies();
  void runJob(const Job& job);
  void addResident(int64_t bytes);
  void unregister(StorageEntry& entry);
  void beginReload(StorageEntry& entry);
  void finishOffload(StorageEntry& entry, c10::Storage host, const std::string& error, c10::Storage& dropped);
  void finishReload(StorageEntry& entry, c10::Storage back, const std::string& error);

  const ActivationPool::Options options_;
  std::set<const c10::StorageImpl*> parameterStorages_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;  // an entry's residence changed, or a job finished
  std::condition_variable work_;     // a job was queued, or stop
  std::map<int64_t, KeyRecord> keys_;
  std::unordered_map<const c10::StorageImpl*, Slot> byStorage_;  // resident entries by storage
  std::deque<Job> jobs_;
  bool busy_ = false;
  bool stopping_ = false;
  int64_t resident_ = 0;
  int64_t peak_ = 0;
  std::thread copyThread_;
};

}  // namespace tessera::parallel::pipeline::detail
