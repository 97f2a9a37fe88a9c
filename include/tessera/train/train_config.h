// The [train] section: how long to train and how often to evaluate and log.
#pragma once

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

  // Throws ConfigError naming the field (prefix + "steps") and the accepted values.
  void validate(const std::string& prefix = "train.") const;
};

}  // namespace tessera
