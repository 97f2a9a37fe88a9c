#include "tessera/train/train_config.h"

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>

#include <charconv>

#include "tessera/core/config.h"

namespace tessera {

DeviceSpec parseDeviceSpec(const std::string& spec, const std::string& key) {
  const char* const valid = "(valid: \"cpu\", \"cuda\" for this process's LOCAL_RANK-th GPU, \"cuda:N\")";
  if (spec == "cpu") return {};
  if (spec == "cuda") return {true, -1};
  int index = -1;
  const std::string prefix = "cuda:";
  if (spec.size() > prefix.size() && spec.compare(0, prefix.size(), prefix) == 0) {
    const char* first = spec.data() + prefix.size();
    const char* last = spec.data() + spec.size();
    const auto [ptr, ec] = std::from_chars(first, last, index);
    if (ec == std::errc() && ptr == last && index >= 0) return {true, index};
  }
  throw ConfigError(key, "got '" + spec + "' " + valid);
}

c10::Device resolveDevice(const std::string& spec, int localRank, const std::string& key) {
  const DeviceSpec parsed = parseDeviceSpec(spec, key);
  if (!parsed.cuda) return c10::Device(c10::kCPU);
  // at::hasCUDA(): libtorch_cuda is loaded (a CUDA build of libtorch, e.g. PyTorch's wheel).
  TESSERA_CHECK_CONFIG(at::hasCUDA(), key,
                       "is \"" << spec << "\", but this tessera/libtorch build has no CUDA (a CPU-only libtorch): "
                                << "build tessera against a CUDA libtorch (PyTorch's CUDA wheel), or set " << key
                                << " = \"cpu\"");
  const int count = static_cast<int>(torch::cuda::device_count());
  TESSERA_CHECK_CONFIG(count > 0, key,
                       "is \"" << spec << "\", but no CUDA device is visible (check nvidia-smi and "
                                << "CUDA_VISIBLE_DEVICES), or set " << key << " = \"cpu\"");
  const int index = parsed.index >= 0 ? parsed.index : localRank;
  TESSERA_CHECK_CONFIG(index >= 0 && index < count, key,
                       "is \"" << spec << "\", which names cuda:" << index
                                << (parsed.index < 0 ? " (this process's LOCAL_RANK)" : "") << ", but " << count
                                << " CUDA device(s) are visible: "
                                << (parsed.index < 0 ? "start at most one process per GPU on each node"
                                                     : "use an index below " + std::to_string(count)));
  const c10::Device device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  // Through the registered guard (no CUDA headers needed here): NCCL and the
  // caching allocator work on the current device.
  c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(device);
  return device;
}

void TrainConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(steps >= 1, prefix + "steps", "must be >= 1, got " << steps);
  TESSERA_CHECK_CONFIG(grad_accum >= 1, prefix + "grad_accum", "must be >= 1, got " << grad_accum);
  TESSERA_CHECK_CONFIG(clip >= 0, prefix + "clip", "must be >= 0 (0 disables clipping), got " << clip);
  TESSERA_CHECK_CONFIG(eval_every >= 0, prefix + "eval_every", "must be >= 0 (0: only after the last step), got "
                                                                    << eval_every);
  TESSERA_CHECK_CONFIG(eval_batches >= 0, prefix + "eval_batches", "must be >= 0, got " << eval_batches);
  TESSERA_CHECK_CONFIG(log_every >= 1, prefix + "log_every", "must be >= 1, got " << log_every);
  TESSERA_CHECK_CONFIG(post_validation == "auto" || post_validation == "off", prefix + "post_validation",
                       "got '" << post_validation << "' (valid: auto, off)");
  parseDeviceSpec(device, prefix + "device");
  TESSERA_CHECK_CONFIG(threads >= 0, prefix + "threads", "must be >= 0 (0: automatic), got " << threads);
}

}  // namespace tessera
