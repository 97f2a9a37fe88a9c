#include "tessera/optim/grad_clip.h"

#include <algorithm>

#include "tessera/parallel/data_parallel.h"

namespace tessera::optim {

double clipScale(double norm, double maxNorm) {
  if (maxNorm <= 0) return 1.0;
  return std::min(1.0, maxNorm / (norm + 1e-6));
}

void clipGradients(parallel::DataParallel& dp, double norm, double maxNorm) {
  const double scale = clipScale(norm, maxNorm);
  if (scale < 1.0) {
    for (auto& p : dp.optimizerParameters()) {
      if (p.grad().defined()) p.mutable_grad().mul_(scale);
    }
  }
}

double clipGradNorm(parallel::DataParallel& dp, double maxNorm) {
  const double norm = dp.gradNorm();
  clipGradients(dp, norm, maxNorm);
  return norm;
}

}  // namespace tessera::optim
