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
// The schedule, exactly. t = 1, 2, ... counts step() calls; every call first
// runs the inner optimizer's step, then:
//   1. each fragment f with t >= 1 and t = f*H/P (mod H) (t = H, 2H, ... for
//      f = 0; t = f*H/P, f*H/P + H, ... for f > 0, so fragment f's first
//      round is shorter) gets its outer step:
//        delay = 0: delta_f = theta_g,f - theta_i,f now; blocking all-reduce
//                   (mean) on replicaComm;
//        delay > 0: wait for the all-reduce started at step t - delay;
//      then outer SGD on theta_g,f with Delta_f, and the training tensors of
//      fragment f <- (1 - mixing)*theta_g,f + mixing*theta_i,f (theta_i,f as
//      they are now, i.e. including the `delay` inner steps taken since the
//      snapshot: mixing keeps that share of the local progress, as torchft's
//      merge does; mixing = 0 discards it).
//   2. (delay > 0) the fragment whose outer step falls on t + delay takes its
//      snapshot delta_f = theta_g,f - theta_i,f now and starts its all-reduce
//      on a private communicator (split off replicaComm at construction).
// Since delay < H/P, at most one fragment is in flight at a time.
// Example H = 4, P = 2, delay = 1: fragment 1 starts at 1, applies at 2;
// fragment 0 starts at 3, applies at 4; fragment 1 starts at 5, applies at 6 ...
// Outer SGD is torch.optim.SGD's (dampening 0): buf = Delta on a fragment's
// first outer step, then buf = mu*buf + Delta; theta_g -= lr*(Delta + mu*buf)
// (Nesterov) or lr*buf; mu = 0: theta_g -= lr*Delta (nesterov then ignored).
//
// Precision: theta_g, the momentum and the pseudo-gradients are fp32 host
// tensors whatever the parameters' dtype and device (bf16/CUDA parameters
// are read and written with casting copies). With one replica, outer_lr 1
// and momentum 0 the result is bit-identical to the inner optimizer alone
// wherever theta_g - (theta_g - theta_i) == theta_i in fp32, i.e. wherever
// an element stays within a factor 2 of its round-start value (Sterbenz);
// an element crossing zero can differ in its last bit.
//
// state(): the inner optimizer's kinds and scalars prefixed "inner/",
// "diloco/outer" (theta_g), "diloco/momentum" (undefined for a fragment
// before its first outer step, and always for momentum 0),
// "diloco/pending_delta" (defined only for the fragment in flight: its
// pseudo-gradient, already averaged -- state() waits for the in-flight
// all-reduce to finish, which needs no new collective), scalar "diloco/step".
// All fp32, shaped like the parameters. The training tensors themselves are
// not part of it (save them with the model). loadState() of a state saved at
// step t continues bit for bit as the uninterrupted run would.
//
// step() is collective over the replica group at outer steps (delay = 0:
// a blocking all-reduce on replicaComm; delay > 0: it starts or waits for
// the private group's all-reduce, never touching replicaComm itself). It
// reports outerStep = true when at least one fragment was applied, and
// throws what the all-reduce throws (CommError, TimeoutError, NotSupported
// for a compression the build lacks); theta_g is then unchanged.
//
// Sharded tensors (tensor parallelism, FSDP inside a replica): `parameters`
// are this rank's shards and replicaComm (the mesh's dp_replicate axis)
// joins the ranks of the same tp and dp_shard coordinates, which hold the
// same shards. Pseudo-gradient, mean, theta_g and outer momentum are all
// elementwise, so a shard's outer step is its part of the logical tensor's:
// with an elementwise inner optimizer (AdamW, SGD) DiLoCo at tp = N equals
// DiLoCo at tp = 1 up to rounding. Fragments go by parameter, not by bytes:
// `groups` come from parameter names (the launcher's: the block index), the
// same on every tp rank, so fragment f holds the same parameters' shards on
// every tp rank and syncs at the same steps. Exception: compression =
// "int8" / "fp8" quantizes the flat pseudo-gradient (int8: per chunk; fp8:
// one shared scale per flat tensor), whose contents depend on the sharding,
// so there tp = N matches tp = 1 only up to the quantization error.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/comm/compression.h"
#include "tessera/optim/elastic_collective.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// The [diloco] section. Plain struct; validate() before use.
struct DilocoConfig {
  int64_t inner_steps = 100;      // H: inner steps per outer step; >= 1
  double outer_lr = 0.7;          // outer SGD learning rate; > 0
  double outer_momentum = 0.9;    // outer SGD momentum, in [0, 1)
  bool nesterov = true;           // PyTorch-style Nesterov outer momentum
  std::string compression = "none";  // pseudo-gradient all-reduce: "none", "int8" or "fp8" (comm/compression.h)
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
// from the same theta_g, and copies theta_g into the tensors. replicaComm
// must take CPU fp32 tensors (Gloo, MPI, single-rank). `parameters` are the
// tensors `inner` updates, in the same order; shared, not copied. Throws
// ConfigError for a bad config (and diloco.fragments when a fragment would
// get no parameter), InvalidArgument for bad groups or missing arguments.
std::unique_ptr<Optimizer> makeDiloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner,
                                      std::vector<at::Tensor> parameters, comm::CommPtr replicaComm,
                                      std::vector<int> groups = {});

// Elastic training (parallel/elastic.h; optim/elastic_collective.h): the
// syncs run through `collective` on the group of the nodes that are members
// at each one, instead of on a fixed replica communicator. Streaming included
// (fragments, delay, mixing as above), with the same numbers as makeDiloco on
// a fixed group of the same members, bit for bit:
//   - each fragment sync is one collective, numbered syncIndex = t / (H/P)
//     (t: local steps, the state's "diloco/step"; every multiple of H/P is
//     exactly one fragment's sync, so the numbers are 1, 2, 3, ...; with one
//     fragment it is the outer step n = t / H). A joiner restores "diloco/step"
//     and continues the numbering.
//   - its body averages a copy of the fragment's pseudo-gradient (compression
//     as configured) on the group of that sync, whose size is the members at
//     that sync; theta_g and the momentum change only after it committed, so a
//     retried attempt averages the same pseudo-gradient and a failed sync
//     (the collective throws) leaves them unchanged.
//   - delay > 0: the snapshot is taken `delay` steps early as above, but it is
//     averaged blocking at the apply step (the elastic group is not used from a
//     background thread): the same values, without the overlap. A state()
//     taken while a snapshot waits holds it in "diloco/pending_delta" not yet
//     averaged (makeDiloco's holds it averaged); after a fragment sync nothing
//     waits (delay < H/P), so states served to joiners or checkpointed at sync
//     boundaries are the same in both modes.
// Nothing is broadcast at construction: elastic founders start from identical
// parameters (the same seed) and joiners receive the state from a peer.
// communicators() is empty (the elastic mesh counts its own traffic). Throws
// as makeDiloco, and InvalidArgument for a null collective.
std::unique_ptr<Optimizer> makeElasticDiloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner,
                                             std::vector<at::Tensor> parameters, ElasticCollective collective,
                                             std::vector<int> groups = {});

}  // namespace tessera::optim
