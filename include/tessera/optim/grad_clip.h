// Gradient-norm clipping across the whole (possibly sharded) model.
#pragma once

namespace tessera::parallel {
class DataParallel;
}

namespace tessera::optim {

// Collective when dp shards the model (it calls dp.gradNorm()); call after
// dp.finishGradientSync(). Scales every gradient of dp.optimizerParameters()
// by min(1, maxNorm / (norm + 1e-6)) (the 1e-6 as torch.nn.utils.clip_grad_norm_)
// and returns the norm before clipping. maxNorm <= 0 disables the scaling but
// still returns the norm.
double clipGradNorm(parallel::DataParallel& dp, double maxNorm);

// The scaling half of clipGradNorm, for a norm computed elsewhere (a
// pipeline's norm over every stage): scales every gradient of
// dp.optimizerParameters() by clipScale(norm, maxNorm), leaving them untouched
// when that is 1. Local. The caller handles a non-finite norm (the Trainer
// skips the step; here it would scale by 0 or NaN).
void clipGradients(parallel::DataParallel& dp, double norm, double maxNorm);

// The factor clipGradNorm applies: min(1, maxNorm / (norm + 1e-6)), or 1 when maxNorm <= 0.
double clipScale(double norm, double maxNorm);

}  // namespace tessera::optim
