// The [train] section: how long to train and how often to evaluate and log.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace tessera {

// Plain struct; every field has a default. validate() before use.
struct TrainConfig {
  int64_t steps = 100;        // optimizer steps to run (the schedule's total_steps); >= 1
  int64_t grad_accum = 1;     // micro-batches per optimizer step, gradients summed locally
                              // (DataParallel::noSync) then averaged; >= 1
  double clip = 1.0;          // max global gradient L2 norm; 0 disables clipping; >= 0
  int64_t eval_every = 100;   // validate after every eval_every-th step and after the last; 0: only after the last
  int64_t eval_batches = 8;   // validation batches per rank per evaluation; 0: never validate
  int64_t log_every = 10;     // write a metrics line after every log_every-th step and the last; >= 1
  uint64_t seed = 0;          // seeds torch's global generator (dropout) when the Trainer is built
  int threads = 0;            // torch intra-op threads per process; 0: cores / processes on this node
  bool progress = true;       // rank 0 rewrites a progress line on stderr when it is a terminal
  // Optimizer post-validation of a pipeline (Zero Bubble §4; trainer.h): "auto" steps optimistically
  // while the norm over the stages is in flight and rolls back when it says clip or skip, when the
  // Trainer has a stage norm (TrainerParts::stageNorm) and the optimizer can be rolled back (AdamW,
  // SGD); "off" waits for the norm before the step. Either way the parameters are the same bits.
  std::string post_validation = "auto";
  // Where the model, its gradients, the optimizer state and each batch live: "cpu", "cuda" (this
  // process's LOCAL_RANK-th CUDA device) or "cuda:N". What runs on CUDA and what is refused:
  // parallel::ParallelConfig::validateDevice. Resolved at startup by resolveDevice().
  std::string device = "cpu";

  // Throws ConfigError naming the field (prefix + "steps") and the accepted values.
  // Checks train.device's spelling only; whether the device exists is resolveDevice()'s.
  void validate(const std::string& prefix = "train.") const;
};

// A device spec as TrainConfig::device spells it, parsed: CPU, or CUDA with
// an explicit index (index >= 0) or this process's local rank (index = -1).
struct DeviceSpec {
  bool cuda = false;
  int index = -1;
};

// Local, no CUDA calls. Throws ConfigError naming `key` for anything but
// "cpu", "cuda" and "cuda:N" (N a decimal integer >= 0).
DeviceSpec parseDeviceSpec(const std::string& spec, const std::string& key = "train.device");

// The device `spec` names for the process whose LOCAL_RANK is `localRank`
// ("cuda" -> cuda:localRank). Local. Throws ConfigError naming `key` and the
// fix when CUDA is asked for and this libtorch build has no CUDA, no CUDA
// device is visible, or the index is out of range. Makes `cuda:N` the
// calling thread's current CUDA device (NCCL and the caching allocator use it).
c10::Device resolveDevice(const std::string& spec, int localRank, const std::string& key = "train.device");

}  // namespace tessera
