// The byte copies of activation offload (offload.h): whole storages between
// the compute pool and host memory.
//
// CPU: a plain memcpy on the copy thread into a fresh CPU storage --
// deliberately not Tensor::copy_, which would split the copy over the
// intra-op thread pool that F and B are using.
//
// CUDA: written against c10's device-generic stream and event API, so this
// file compiles without CUDA headers. NOT RUN (no GPU on the machines this was
// written on). The copy runs on a stream from the device's pool; an offload
// first waits for the event recorded on the compute stream at offload() (F's
// kernels have written the tensors); a reload allocates its device storage
// with the compute stream current, so the caching allocator orders the
// block's reuse after B, and the side stream first waits for the compute
// stream's earlier work (the block may have been freed by it). The copy
// thread synchronizes the side stream before publishing the result, so the
// unpack (on the compute thread) sees a finished copy.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstring>

#include "parallel/pipeline/offload_internal.h"
#include "tessera/core/error.h"

namespace tessera::parallel::pipeline::detail {
namespace {

// The storage's bytes as a 1-D uint8 tensor (no copy).
at::Tensor bytesOf(const c10::Storage& storage) {
  at::Tensor bytes = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(storage.device()));
  bytes.set_(storage, 0, {static_cast<int64_t>(storage.nbytes())}, {1});
  return bytes;
}

const CopyStreams::PerDevice* streamsFor(const CopyStreams& streams, c10::Device device) {
  for (const auto& d : streams.devices) {
    if (d.device == device) return &d;
  }
  return nullptr;
}

c10::Storage copyCuda(const c10::Storage& source, c10::Device target, const CopyStreams& streams) {
  const bool toHost = target.is_cpu();
  const c10::Device cuda = toHost ? source.device() : target;
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream side = impl.getStreamFromGlobalPool(cuda);
  const CopyStreams::PerDevice* compute = streamsFor(streams, cuda);
  const int64_t nbytes = static_cast<int64_t>(source.nbytes());
  at::NoGradGuard noGrad;
  at::Tensor destination;
  if (toHost) {
    destination = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (compute != nullptr && compute->ready) compute->ready->block(side);
  } else {
    const c10::Stream computeStream = compute != nullptr ? compute->compute : impl.getStream(cuda);
    {
      c10::StreamGuard onCompute(computeStream);
      destination = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(cuda));
    }
    c10::Event freed(c10::DeviceType::CUDA);
    freed.record(computeStream);
    freed.block(side);
  }
  {
    c10::StreamGuard onSide(side);
    destination.copy_(bytesOf(source), /*non_blocking=*/true);
  }
  side.synchronize();
  return destination.storage();
}

}  // namespace

c10::Storage copyStorage(const c10::Storage& source, c10::Device target, const CopyStreams& streams) {
  const c10::Device from = source.device();
  if (from.is_cuda() || target.is_cuda()) return copyCuda(source, target, streams);
  TESSERA_CHECK_ARG(from.is_cpu() && target.is_cpu(),
                    "activation offload copies CPU and CUDA storages only, got " << from << " -> " << target);
  const size_t nbytes = source.nbytes();
  c10::Storage copy(c10::Storage::use_byte_size_t(), nbytes, c10::GetCPUAllocator(), /*resizable=*/false);
  if (nbytes > 0) std::memcpy(copy.data_ptr().get(), source.data_ptr().get(), nbytes);
  return copy;
}

CopyStreams computeStreamsOf(const std::vector<std::weak_ptr<StorageEntry>>& entries, bool reload) {
  CopyStreams streams;
  for (const auto& weak : entries) {
    const std::shared_ptr<StorageEntry> entry = weak.lock();
    if (!entry || !entry->device.is_cuda() || streamsFor(streams, entry->device) != nullptr) continue;
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    CopyStreams::PerDevice d{entry->device, impl.getStream(entry->device), nullptr};
    if (!reload) {
      d.ready = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
      d.ready->record(d.compute);
    }
    streams.devices.push_back(std::move(d));
  }
  return streams;
}

}  // namespace tessera::parallel::pipeline::detail
