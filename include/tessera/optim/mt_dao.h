// MT-DAO (arXiv 2510.05361; the first author's qhadopt.py / desloc.py): each
// worker runs QH-ADOPT locally with N first momenta of different betas, and
// parameters, each momentum and the second moment are averaged across workers
// by plain averaging at their own intervals (REFERENCE §3). No gradient sync.
//
// Let t = 0, 1, 2, ... count the calls of step() before this one (the
// checkpointed scalar "step"), lr the current rate, lr0 the peak rate.
//
// form = "adopt" (QH-ADOPT, as qhadopt.py):
//   t == 0: v = g^2; parameters and momenta do not move (no weight decay either)
//   t >= 1: p  *= 1 - (lr / lr0) * wd
//           n   = clamp(g / max(sqrt(v), eps), -t^0.25, +t^0.25)   (first update: t = 1, clip 1)
//           u_j = lerp(u_j, n, 1 - beta_j)              = beta_j u_j + (1 - beta_j) n
//           p  -= lr * [(1 - sum_j nu_j) * n + sum_j nu_j * u_j]
//           v   = beta2 * v + (1 - beta2) * g^2          (after the update: ADOPT's order)
//
// form = "adamw" (the bias-corrected AdamW form), with s = t + 1:
//   p  *= 1 - (lr / lr0) * wd
//   u_j = beta_j u_j + (1 - beta_j) g;   v = beta2 v + (1 - beta2) g^2
//   p  -= lr * ((1 - sum_j nu_j) * g + sum_j nu_j * u_j / (1 - beta_j^s)) / (sqrt(v / (1 - beta2^s)) + eps)
//   (use betas like {0.9}, beta2 0.95 there; nu = 1 and one momentum is AdamW
//   with weight decay wd / lr0).
//
// Sync, after the local update of the call that makes the count T = t + 1:
//   the parameters are replaced by their average over the group if T % sync_params == 0,
//   momentum j                                                 if T % sync_momenta[j] == 0,
//   v                                                          if T % sync_second == 0.
// Everything due in one call travels in one all-reduce (kAvg) per dtype.
// So with K = 1 every state is averaged after every step (also after t = 0).
//
// A parameter whose .grad is undefined skips the local update but still takes
// part in the averaging (all states exist from construction).
//
// step() is collective over the communicator on calls where something syncs;
// it reports outerStep = true on calls where the parameters were averaged
// (T % sync_params == 0; also with no communicator).
//
// Sharded tensors (tensor parallelism, FSDP inside a replica): the tensors
// are this rank's shards, and the group (the mesh's dp_replicate axis) joins
// the ranks of the same tp and dp_shard coordinates, which hold the same
// shard of every tensor. Averaging is elementwise over the replicas, so a
// shard's average is exactly its part of the logical tensor's average; the
// local update is elementwise too (the clip and eps act per element). So
// MT-DAO on tp = N shards takes, shard by shard, the steps MT-DAO takes at
// tp = 1, up to rounding. A tensor replicated over tp (LayerNorm, the bias of
// a row-parallel layer) gets identical gradients on the tp ranks of a
// replica (parallel/tensor_parallel.h) and so stays identical there.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/optim/elastic_collective.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// The [mt_dao] section. Plain struct; validate() before use.
struct MtDaoConfig {
  std::string form = "adopt";               // "adopt" (QH-ADOPT) or "adamw" (bias-corrected)
  std::vector<double> betas = {0.999};      // beta_j of each first momentum, in [0, 1); at least one
  std::vector<double> nus = {0.9};          // nu_j, >= 0, sum <= 1; same length as betas
  double beta2 = 0.9999;                    // second moment decay, in [0, 1)
  double eps = 1e-6;                        // > 0
  double weight_decay = 0.0;                // decoupled, scaled by lr / lr0; >= 0
  int64_t sync_params = 32;                 // K_x; >= 1
  std::vector<int64_t> sync_momenta = {32}; // K_j per momentum; >= 1; same length as betas
  int64_t sync_second = 32;                 // K_v; >= 1

  // Throws ConfigError naming the field (prefix + "nus", ...).
  void validate(const std::string& prefix = "mt_dao.") const;
};

// `lr0` is the peak learning rate (the schedule's base rate) used to scale
// the weight decay; the optimizer starts at rate lr0. `comm` null or of size
// 1: no syncing. The parameters are shared, not copied: they must outlive the
// optimizer. State: per-parameter "mt_dao/momentum_<j>" (j = 0 .. N-1, the
// index into betas) and "mt_dao/second", created at construction (zeros),
// plus scalar "step" (t above). Throws ConfigError for a bad config or lr0.
std::unique_ptr<Optimizer> makeMtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters,
                                     comm::CommPtr comm, double lr0);

// Elastic training (parallel/elastic.h; optim/elastic_collective.h): every
// call where something is due syncs through `collective` on the group of the
// nodes that are members then, sync index T (the update count, "step" in the
// state after the call: a joiner restores it and continues the numbering).
// The body all-reduces copies of the due tensors (one buffer per dtype, as
// above); the tensors take the means only after the sync committed, so a
// retried attempt averages the same values and a failed sync (the collective
// throws) leaves them as the local update left them. The mean divides by the
// members of that sync. With a fixed membership the steps equal makeMtDao's
// on a group of the same members, bit for bit; after a parameter sync every
// member (a joiner included) holds bit-identical parameters. Every sync, of
// the parameters or not, reports outerStep = true (the launcher serves
// joiners after it); a group of one syncs too (joiners are admitted there).
// Throws as makeMtDao, and InvalidArgument for a null collective.
std::unique_ptr<Optimizer> makeElasticMtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters,
                                            ElasticCollective collective, double lr0);

}  // namespace tessera::optim
