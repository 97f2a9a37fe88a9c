#include "tessera/train/train_config.h"

#include "tessera/core/config.h"

namespace tessera {

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
  TESSERA_CHECK_CONFIG(threads >= 0, prefix + "threads", "must be >= 0 (0: automatic), got " << threads);
}

}  // namespace tessera
