// parallelize(): the one place that turns a model, a DeviceMesh and the
// [parallel] config into the parallel job -- used by tessera-train,
// `tessera-bench train` / `convergence` and examples/train_gpt.cc alike.
//
// Composition order (torchtitan's; later issues extend it in place, never in
// a second copy):
//   1. pipeline split      (pp)            the model cut into stages; each rank keeps its stage
//   2. tensor parallel     (tp)            per stage: column/row/vocabulary-parallel layers
//   3. expert parallel     (ep)            per stage: experts over ep (TED: tp inside experts)
//   4. FSDP / DDP          (dp_shard,      inside a replica: shard over dp_shard (FSDP, hybrid)
//                           dp_replicate)  or replicate over dp_replicate (DDP, hybrid)
//   5. DiLoCo / elastic    (dp_replicate)  across replicas: the communication-light optimizers
//                                          (optim/) average over replicaComm, built after this
// Steps 1 and 3 are not built yet: validate() refuses pp, ep > 1 with an
// error naming the axis. Step 2 is tensor_parallel.h. Step 5 is the optimizer's (it needs the strategy's
// tensors): parallelize() hands it replicaComm.
//
// The strategy string and the degrees are reconciled once, in
// ParallelConfig::resolve(); everything downstream reads the resolved plan.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/trainable.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/device_mesh.h"
#include "tessera/parallel/step_executor.h"

namespace tessera::parallel {

// How data parallelism runs on the mesh, decided once from the config.
struct DataParallelPlan {
  std::string strategy;                // "none", "ddp", "fsdp", "hybrid"
  bool localUpdates = false;           // the optimizer replicates over dp_replicate itself
  // The axes gradients are averaged over by the strategy (empty: none), and
  // the axes data is sharded over (the "data ranks": losses are averaged and
  // tokens counted over them). Ranks that differ only along tp/pp/ep read the
  // same batch.
  std::vector<MeshAxis> gradientAxes;
  std::vector<MeshAxis> dataAxes;
};

// [parallel]: the mesh degrees and how data parallelism runs on them. Plain
// struct; read from TOML by the launcher.
struct ParallelConfig {
  MeshShape mesh;                     // dp_replicate, dp_shard, tp, pp, ep; product = world size
  // "none" (one replica), "ddp" (replicate over dp_replicate), "fsdp" (shard
  // over dp_shard) or "hybrid" (shard within dp_shard, replicate across dp_replicate).
  std::string strategy = "ddp";
  double bucket_mb = 25;              // DDP gradient bucket size in MiB; > 0
  std::string backend = "auto";       // communicator: "auto", "gloo" or "mpi" (see InitOptions::backend)
  // With tp > 1: split the activations between TP blocks along the sequence
  // (Megatron's sequence parallelism); the sequence length must divide by tp.
  // No effect with tp = 1.
  bool sequence_parallel = false;

  // The single validation of the section: keys, degrees against worldSize
  // (MeshShape::validate with this prefix), and the strategy against the
  // degrees. `localUpdates`: the optimizer (DiLoCo, DeMo, MT-DAO) replicates
  // over dp_replicate; the strategy then runs inside each replica, over
  // dp_shard: "none" (dp_shard = 1), "ddp" or "fsdp". Throws ConfigError
  // naming prefix + key ("parallel.dp_shard") and the fix.
  DataParallelPlan resolve(int worldSize, bool localUpdates = false, const std::string& prefix = "parallel.") const;
  // resolve() for its checks only.
  void validate(int worldSize, bool localUpdates = false, const std::string& prefix = "parallel.") const {
    resolve(worldSize, localUpdates, prefix);
  }
};

// A communicator a step uses, named for the metrics line's "comm" object:
// a mesh axis ("dp_shard", "dp_replicate", later "tp", "pp", "ep"), a
// flattened group ("dp"), or another group (an optimizer's private one).
struct NamedComm {
  std::string name;
  comm::CommPtr comm;
};

// The parallel job for one rank. Owns the strategy and the executor; the
// model and the mesh are referenced and must outlive it.
struct ParallelModel {
  DataParallelPlan plan;
  std::unique_ptr<DataParallel> dp;         // the strategy; its optimizerParameters() feed the optimizer
  std::unique_ptr<StepExecutor> executor;   // forward + backward of a step (the Trainer's seam)
  comm::CommPtr dataComm;                   // over plan.dataAxes: averages losses; null for one data rank
  int dataRank = 0;                         // this rank's data shard: index in dataComm
  int dataRanks = 1;                        // data shards in all
  comm::CommPtr replicaComm;                // across replicas, for local-update optimizers; else null
  int replica = 0;                          // this rank's dp_replicate coordinate (local updates)
  int replicas = 1;                         // replicas whose parameters differ between syncs (local updates)
  std::vector<NamedComm> traffic;           // every communicator the strategy and the loop use
  // True on the one rank that writes metrics: the rank that has the loss
  // with every data, tp and ep coordinate 0 (world rank 0 until pipelines).
  bool reportsMetrics = false;
};

// Collective over mesh.world() (DDP and FSDP broadcast rank 0's parameters;
// hybrid and local updates flatten dp axes). Applies the composition order
// above to `model`. Throws ConfigError as ParallelConfig::resolve does, and
// for a strategy the model cannot run ("fsdp" needs a GPT); CommError /
// TimeoutError from the comms.
ParallelModel parallelize(TrainableModel& model, DeviceMesh& mesh, const ParallelConfig& config,
                          bool localUpdates);

}  // namespace tessera::parallel
