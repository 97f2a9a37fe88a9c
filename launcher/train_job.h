// TrainJob: a training run built from a TrainJobConfig -- mesh, model, the
// parallel job (parallel::parallelize), optimizer, data -- ready for
// tessera::Trainer.
// tessera-train and `tessera-bench train` both build their runs here, so the
// benchmark measures exactly what the tool runs.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "launcher/train_config.h"
#include "tessera/launcher/init.h"
#include "tessera/optim/elastic_collective.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/device_mesh.h"
#include "tessera/parallel/moe_load.h"
#include "tessera/parallel/parallelize.h"
#include "tessera/train/trainer.h"

namespace tessera::launcher {

// Owns every piece the Trainer borrows; members are destroyed in reverse
// order, so the strategy goes before the model it wraps.
struct TrainJob {
  int threads = 1;                                   // intra-op threads per rank
  int64_t numParameters = 0;                         // of the unsharded model
  // Pipelines: every parameter of the WHOLE model with its shape, so a stage
  // restores and checks a checkpoint of any layout (TrainingParts::wholeModel). Empty otherwise.
  std::map<std::string, std::vector<int64_t>> wholeModel;
  std::unique_ptr<parallel::DeviceMesh> mesh;
  std::unique_ptr<TrainableModel> model;
  parallel::ParallelModel parallel;                  // strategy, executor, data ranks, named comms
  parallel::DataParallel* dp = nullptr;              // parallel.dp
  comm::CommPtr dpComm;                              // parallel.dataComm: null for one data rank
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train;
  std::unique_ptr<BatchSource> val;
  std::unique_ptr<MetricsWriter> metrics;            // the reporting rank, with a metrics path only
  std::unique_ptr<parallel::MoeLoadCollector> moeLoad;  // model.use_moe: the metrics line's "moe"
  TrainerParts parts;                                // views of the above, for the Trainer
  // Optimizers that update replicas locally between syncs (DiLoCo, DeMo,
  // MT-DAO) leave replicas with different parameters: their state is saved
  // per replica. 1 for DDP/FSDP (replicas always identical).
  int replica = 0;                                   // this rank's replica index (dp_replicate coordinate)
  int replicas = 1;                                  // replicas whose parameters differ between syncs
};

// What changes when the job is one node of an elastic run (tessera-run
// --nnodes MIN:MAX): ctx.world is the node's local group, the [parallel] mesh
// describes one node (dp_replicate = 1: the nodes are the replicas), the
// optimizer (DiLoCo with or without streaming, DeMo or MT-DAO) synchronizes
// through `collective` (the elastic mesh's collectiveAcrossNodes) instead of
// a replica communicator, and each node reads its own shard of the data,
// fixed by its slot. Elastic DiLoCo's metrics lines carry "outer_hash", the
// xxh64 of theta_g, equal on every node at every step (the parameters of
// streaming fragments differ between syncs; theta_g never does).
struct ElasticJobOptions {
  optim::ElasticCollective collective;  // required
  int node = 0;   // this node's slot: it reads data shard node * dp size + dp rank
  int nodes = 1;  // slots in the job (max nodes): node * dp size shards in all
};

// xxh64 over the bytes of every tensor, in order, as 16 hex digits: equal on
// two processes exactly when their tensors are bit-identical (the elastic
// metrics' param_hash and outer_hash).
std::string hashTensors(const std::vector<at::Tensor>& tensors);

// Collective over ctx.world (the mesh splits it; DDP/FSDP broadcast rank 0's
// parameters). Throws ConfigError for a config that does not fit the world.
// `elastic` non-null: one node of an elastic run (see above); metrics are
// appended to (a restarted node keeps its earlier lines).
std::unique_ptr<TrainJob> buildTrainJob(const TrainJobConfig& job, const DistributedContext& ctx,
                                        const std::string& metricsPath, const ElasticJobOptions* elastic = nullptr);

}  // namespace tessera::launcher
