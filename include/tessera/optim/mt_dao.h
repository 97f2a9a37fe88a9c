// MT-DAO (arXiv 2510.05361; the first author's qhadopt.py / desloc.py): each
// worker runs QH-ADOPT locally with N first momenta of different betas, and
// parameters, each momentum and the second moment are averaged across workers
// by plain averaging at their own intervals (REFERENCE §3). No gradient sync.
//
//   step 0: v = g^2; parameters do not move
//   else:   p *= 1 - (lr / lr0) * wd
//           n  = clamp(g / max(sqrt(v), eps), +-step^0.25)
//           u_j = lerp(u_j, n, 1 - beta_j)
//           p -= lr * [(1 - sum nu_j) * n + sum nu_j * u_j]
//           v  = beta2 * v + (1 - beta2) * g^2
//   sync: p every sync_params steps, u_j every sync_momenta[j], v every sync_second.
//
// form = "adamw": the bias-corrected AdamW form
//   p -= lr * ((1 - sum nu_j) * g + sum nu_j * m_hat_j) / (sqrt(v_hat) + eps).
//
// step() is collective over the communicator on steps where some state syncs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// The [mt_dao] section. Plain struct; validate() before use.
struct MtDaoConfig {
  std::string form = "adopt";               // "adopt" (QH-ADOPT) or "adamw" (bias-corrected)
  std::vector<double> betas = {0.999};      // beta_j of each first momentum, in [0, 1)
  std::vector<double> nus = {0.9};          // nu_j, >= 0, sum <= 1; same length as betas
  double beta2 = 0.9999;                    // second moment decay, in [0, 1)
  double eps = 1e-6;                        // > 0
  double weight_decay = 0.0;                // decoupled, scaled by lr / lr0; >= 0
  int64_t sync_params = 32;                 // K_x; >= 1
  std::vector<int64_t> sync_momenta = {32}; // K_j per momentum; >= 1; same length as betas
  int64_t sync_second = 32;                 // K_v; >= 1

  void validate(const std::string& prefix = "mt_dao.") const;
};

// `lr0` is the peak learning rate (the schedule's base rate) used to scale
// the weight decay. `comm` null or of size 1: no syncing.
std::unique_ptr<Optimizer> makeMtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters,
                                     comm::CommPtr comm, double lr0);

}  // namespace tessera::optim
