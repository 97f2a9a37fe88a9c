#include "tessera/optim/grad_clip.h"

#include <algorithm>

#include "tessera/parallel/data_parallel.h"

namespace tessera::optim {

double clipScale(double norm, double maxNorm) {
  if (maxNorm <= 0) return 1.0;
  return std::min(1.0, maxNorm / (norm + 1e-6));
}

double clipGradNorm(parallel::DataParallel& dp, double maxNorm) {
  const double norm = dp.gradNorm();
  const double scale = clipScale(norm, maxNorm);
  if (scale < 1.0) {
    for (auto& p : dp.optimizerParameters()) {
      if (p.grad().defined()) p.mutable_grad().mul_(scale);
    }
  }
  return norm;
}

}  // namespace tessera::optim
