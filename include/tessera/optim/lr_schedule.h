// Learning-rate schedules as plain functions of the step.
//
// A schedule maps the index of the optimizer step about to run (0-based) to
// the learning rate that step uses. Two shapes, both with a linear warm-up:
//
//   cosine  (Loshchilov & Hutter, SGDR, arXiv 1608.03983, eq. 5, one cycle):
//     warm-up:  lr * (step + 1) / warmup_steps                 step < W
//     decay:    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (step - W) / (S - W)
//   wsd     (warm-up-stable-decay, Hu et al. MiniCPM, arXiv 2404.06395, §4.1):
//     warm-up as above, then lr until the decay starts at D = S - round(decay_fraction * S),
//     then linear: lr + (min_lr - lr) * (step - D) / (S - D)
//   constant: lr after the warm-up.
//
// S is total_steps: the rate reaches min_lr at step S (one past the last
// step), so the last step still learns. Steps past S keep min_lr.
// Not here: restarts, per-parameter-group rates, schedules that depend on the loss.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace tessera::optim {

// The schedule part of the [optim] section. Plain struct; validate() before use.
struct LrScheduleConfig {
  std::string schedule = "cosine";  // "cosine", "wsd" or "constant"
  double lr = 3e-3;                 // peak learning rate, after the warm-up; > 0
  double min_lr = 3e-4;             // rate reached at total_steps (cosine, wsd); in [0, lr]
  int64_t warmup_steps = 0;         // linear warm-up steps from lr / warmup_steps to lr; >= 0
  double decay_fraction = 0.2;      // wsd: fraction of total_steps spent decaying; in (0, 1]

  // Throws ConfigError naming the field (prefix + "min_lr") and the accepted values.
  void validate(const std::string& prefix = "optim.") const;
};

// The rate of step `step` (0-based) of a run of `totalSteps` steps (>= 1).
// Pure. Throws InvalidArgument for step < 0 or totalSteps < 1.
double learningRateAt(const LrScheduleConfig& config, int64_t step, int64_t totalSteps);

// step -> learning rate; what the Trainer calls once per optimizer step.
using LrSchedule = std::function<double(int64_t step)>;

// Binds config (validated here, throws ConfigError) and totalSteps.
LrSchedule makeLrSchedule(const LrScheduleConfig& config, int64_t totalSteps);

}  // namespace tessera::optim
