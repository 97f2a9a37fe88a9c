// DiLoCo (arXiv 2311.08105) and streaming DiLoCo (arXiv 2501.18512): local
// inner steps on each replica, and every H steps an outer step on the
// all-reduced pseudo-gradient (REFERENCE §1).
//
//   each round: H inner steps (the wrapped optimizer, on the training tensors)
//               delta_i = theta_g - theta_i           (pseudo-gradient)
//               Delta   = allreduce_mean(delta_i)     over the replica group
//               outer Nesterov SGD on theta_g with Delta; theta_i <- theta_g
//
// The outer copy theta_g is kept in fp32 in host memory, off the training
// tensors, and sharded exactly like them: DiLoCo wraps whatever tensors it is
// given -- full parameters (no data parallelism or DDP inside a replica) or
// this rank's FSDP shards (the INTELLECT-1 DiLoCo-FSDP hybrid: FSDP over
// dp_shard inside each replica, DiLoCo over dp_replicate across them).
//
// Streaming (fragments > 1): the parameters are split into P fragments
// (strided over `groups`, e.g. transformer layers); fragment f syncs every H
// steps but offset by f*H/P, its all-reduce starts `delay` (tau) steps before
// it is applied and runs in the background meanwhile, and after its outer
// step theta_f <- (1 - mixing)*theta_f_global + mixing*theta_f_local.
// fragments = 1, delay = 0, mixing = 0 is plain DiLoCo.
//
// step() is collective over the replica communicator at outer steps (and
// every step while a streaming fragment is in flight it may test it). It
// reports outerStep = true when at least one fragment was applied.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/comm/compression.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// The [diloco] section. Plain struct; validate() before use.
struct DilocoConfig {
  int64_t inner_steps = 100;      // H: inner steps per outer step; >= 1
  double outer_lr = 0.7;          // outer SGD learning rate; > 0
  double outer_momentum = 0.9;    // outer SGD momentum, in [0, 1)
  bool nesterov = true;           // PyTorch-style Nesterov outer momentum
  std::string compression = "none";  // pseudo-gradient all-reduce: "none" or "int8"
  int64_t fragments = 1;          // P (streaming); 1..H, and H % P == 0
  int64_t delay = 0;              // tau (streaming): steps the all-reduce overlaps; 0 <= tau < H/P
  double mixing = 0.0;            // alpha (streaming), in [0, 1]

  // Throws ConfigError naming the field (prefix + "inner_steps") and the accepted values.
  void validate(const std::string& prefix = "diloco.") const;
};

// Wraps `inner` (created once over the same `parameters`; its state persists
// across rounds). `groups[i]` (optional: empty means i) is the layer group of
// parameters[i]; streaming fragments take groups g with g % P == f.
// `replicaComm` is the group the pseudo-gradients are averaged over (the
// mesh's dp_replicate axis); for streaming with delay > 0 DiLoCo splits a
// private communicator off it (collective, here). Collective over
// replicaComm: broadcasts replica 0's parameters so every replica starts
// from the same theta_g. Throws ConfigError for a bad config.
std::unique_ptr<Optimizer> makeDiloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner,
                                      std::vector<at::Tensor> parameters, comm::CommPtr replicaComm,
                                      std::vector<int> groups = {});

}  // namespace tessera::optim
