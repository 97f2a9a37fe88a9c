#include "tessera/optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "tessera/core/config.h"

namespace tessera::optim {

void LrScheduleConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(schedule == "cosine" || schedule == "wsd" || schedule == "constant",
                       prefix + "schedule", "got '" << schedule << "' (valid: cosine, wsd, constant)");
  TESSERA_CHECK_CONFIG(lr > 0 && std::isfinite(lr), prefix + "lr", "must be > 0, got " << lr);
  TESSERA_CHECK_CONFIG(min_lr >= 0 && min_lr <= lr, prefix + "min_lr",
                       "must be in [0, lr = " << lr << "], got " << min_lr);
  TESSERA_CHECK_CONFIG(warmup_steps >= 0, prefix + "warmup_steps", "must be >= 0, got " << warmup_steps);
  TESSERA_CHECK_CONFIG(decay_fraction > 0 && decay_fraction <= 1, prefix + "decay_fraction",
                       "must be in (0, 1], got " << decay_fraction);
}

double learningRateAt(const LrScheduleConfig& c, int64_t step, int64_t totalSteps) {
  TESSERA_CHECK_ARG(step >= 0, "learning-rate schedule: step must be >= 0, got " << step);
  TESSERA_CHECK_ARG(totalSteps >= 1, "learning-rate schedule: total steps must be >= 1, got " << totalSteps);
  const int64_t warmup = c.warmup_steps;
  if (step < warmup) return c.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (c.schedule == "constant") return c.lr;
  if (c.schedule == "cosine") {
    if (totalSteps <= warmup) return c.min_lr;
    const double p = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(totalSteps - warmup));
    return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
  }
  // wsd: the decay never starts before the warm-up ends.
  const auto decaySteps = std::max<int64_t>(1, std::llround(c.decay_fraction * static_cast<double>(totalSteps)));
  const int64_t decayStart = std::max(warmup, totalSteps - decaySteps);
  if (step < decayStart) return c.lr;
  const double p = std::min(1.0, static_cast<double>(step - decayStart) /
                                     static_cast<double>(std::max<int64_t>(1, totalSteps - decayStart)));
  return c.lr + (c.min_lr - c.lr) * p;
}

LrSchedule makeLrSchedule(const LrScheduleConfig& config, int64_t totalSteps) {
  config.validate();
  TESSERA_CHECK_ARG(totalSteps >= 1, "learning-rate schedule: total steps must be >= 1, got " << totalSteps);
  return [config, totalSteps](int64_t step) { return learningRateAt(config, step, totalSteps); };
}

}  // namespace tessera::optim
