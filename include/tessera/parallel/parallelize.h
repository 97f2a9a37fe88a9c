// parallelize(): the one place that turns a model, a DeviceMesh and the
// [parallel] config into the parallel job -- used by tessera-train,
// `tessera-bench train` / `convergence` and examples/train_gpt.cc alike.
//
// Composition order (torchtitan's; later issues extend it in place, never in
// a second copy):
//   0. device              (train.device)  the model's parameters and buffers moved to it
//   1. pipeline split      (pp)            the model cut into stages; each rank keeps its stage
//   2. tensor parallel     (tp)            per stage: column/row/vocabulary-parallel layers
//   3. expert parallel     (ep)            per stage: experts over ep (TED: tp inside experts)
//   3b. precision          (precision.h)   per stage: bf16 / FP8 Linears, after TP/EP split them
//   4. FSDP / DDP          (dp_shard,      inside a replica: shard over dp_shard (FSDP, hybrid)
//                           dp_replicate)  or replicate over dp_replicate (DDP, hybrid)
//   5. DiLoCo / elastic    (dp_replicate)  across replicas: the communication-light optimizers
//                                          (optim/) average over replicaComm, built after this
// Step 3 is expert_parallel.h (the experts split over ep, the all-to-all
// exchange; with ep > 1 the ep axis is data-parallel for every dense
// parameter, see DataParallelPlan). Step 1 is pipeline/ (stage.h, executor.h): the caller builds the
// model as this rank's part (pipelinePart) before parallelize(), which then
// runs it with the pipeline executor. Step 2 is tensor_parallel.h. Step 5 is the optimizer's (it needs the strategy's
// tensors): parallelize() hands it replicaComm.
//
// The strategy string and the degrees are reconciled once, in
// ParallelConfig::resolve(); everything downstream reads the resolved plan.
#pragma once

#include <c10/core/Device.h>

#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/core/trainable.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/device_mesh.h"
#include "tessera/parallel/pipeline/post_validation.h"
#include "tessera/parallel/precision.h"
#include "tessera/parallel/pipeline/stage.h"
#include "tessera/parallel/step_executor.h"

namespace tessera::parallel {

// How data parallelism runs on the mesh, decided once from the config.
struct DataParallelPlan {
  std::string strategy;                // "none", "ddp", "fsdp", "hybrid"
  bool localUpdates = false;           // the optimizer replicates over dp_replicate itself
  // The axes gradients are averaged over by the strategy (empty: none), and
  // the axes data is sharded over (the "data ranks": losses are averaged and
  // tokens counted over them). Ranks that differ only along tp/pp read the
  // same batch. ep is a data axis (ranks along ep read different batches)
  // and a gradient axis of the dense parameters.
  std::vector<MeshAxis> gradientAxes;
  std::vector<MeshAxis> dataAxes;
  // Expert parameters (expert_parallel.h): each ep rank holds other experts,
  // so their gradients are reduced over gradientAxes without ep (the ranks
  // holding the same experts), summed there and divided by the whole data
  // size: averaged over those axes, then times expertGradientScale = 1/ep.
  std::vector<MeshAxis> expertGradientAxes;
  double expertGradientScale = 1.0;
};

// [pipeline]: how a pp > 1 job runs its stages. Plain struct; read from TOML.
struct PipelineConfig {
  // gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zb_v, auto (pipeline/schedule.h).
  std::string schedule = "1f1b";
  // M: micro-batches per pipeline step, splitting the per-rank batch
  // (data.batch_size must divide by it). 0: one per stage (M = pp).
  int microbatches = 0;
  // Chunks per rank for interleaved_1f1b (>= 2 there; zb_v always uses 2, the others 1).
  int virtual_stages = 2;
  // Blocks per chunk (pp * chunks-per-rank entries summing to model.n_layer); empty: balanced.
  std::vector<int64_t> layers_per_stage;
  // "auto": the steps run with zb_h1 to measure T_F, T_B, T_W before the schedule is built.
  int auto_profile_steps = 2;
  // Activation offload (PipeOffload): "none", "all", "selective" (up to offload_budget_mb resident).
  std::string offload = "none";
  double offload_budget_mb = 0;
  // Count the saved activation bytes resident per stage even without offload
  // (tessera-bench pipeline's baseline); offload counts them anyway.
  bool measure_activations = false;

  int microBatchesFor(int pp) const { return microbatches > 0 ? microbatches : pp; }
  // The chunks each rank holds under `schedule` (1, 2 for zb_v, virtual_stages for interleaved).
  int chunksPerRank() const;
  // Throws ConfigError naming prefix + key and the valid choices.
  void validate(int pp, const std::string& prefix = "pipeline.") const;
};

// [parallel]: the mesh degrees and how data parallelism runs on them. Plain
// struct; read from TOML by the launcher.
struct ParallelConfig {
  MeshShape mesh;                     // dp_replicate, dp_shard, tp, pp, ep; product = world size
  // "none" (one replica), "ddp" (replicate over dp_replicate), "fsdp" (shard
  // over dp_shard) or "hybrid" (shard within dp_shard, replicate across dp_replicate).
  std::string strategy = "ddp";
  double bucket_mb = 25;              // DDP gradient bucket size in MiB; > 0
  // Communicator: "auto", "gloo", "mpi" or "nccl" (see InitOptions::backend). "nccl" needs
  // train.device = "cuda" and a build with NCCL (validateDevice); "auto" on a CUDA device is NCCL.
  std::string backend = "auto";
  // With tp > 1: split the activations between TP blocks along the sequence
  // (Megatron's sequence parallelism); the sequence length must divide by tp.
  // No effect with tp = 1.
  bool sequence_parallel = false;
  PipelineConfig pipeline;            // used when mesh.pp > 1
  // With tp > 1 and MoE: DeepSpeed-TED's duplicate-token dropping -- each tp
  // rank sends 1/tp of the dispatched slots over ep (expert_parallel.h).
  // Same outputs and gradients; all-to-all bytes divided by tp.
  bool moe_dtd = false;
  // Gradient communication of DDP / FSDP: "fp32", "bf16" or "fp8" (the FP8
  // ring, comm/compression.h). "" (unset): fp32, or fp8 under precision.mode
  // = "fp8", which implies it (precision.h: setting it there is an error).
  std::string grad_comm;
  // [precision]: resolved by resolvePrecision (precision.h) inside
  // parallelize(); the launcher reads the same plan for the optimizer.
  PrecisionConfig precision;

  // The single validation of the section: keys, degrees against worldSize
  // (MeshShape::validate with this prefix), and the strategy against the
  // degrees. `localUpdates`: the optimizer (DiLoCo, DeMo, MT-DAO) replicates
  // over dp_replicate; the strategy then runs inside each replica, over
  // dp_shard: "none" (dp_shard = 1), "ddp" or "fsdp". Throws ConfigError
  // naming prefix + key ("parallel.dp_shard") and the fix.
  DataParallelPlan resolve(int worldSize, bool localUpdates = false, const std::string& prefix = "parallel.") const;
  // resolve()'s strategy part: the plan's axes before ep is added. Local.
  DataParallelPlan resolveDataAxes(bool localUpdates, const std::string& prefix) const;
  // What runs with the model on a CUDA device (cuda = true), checked before
  // any collective: strategy none / ddp, adamw / sgd (optimizer: the stepping
  // one), grad_comm fp32 / bf16, precision fp32 / bf16, and backend auto or
  // nccl. Refused, each with a ConfigError naming its key and why: fsdp /
  // hybrid (flat shards are CPU buffers), tp / pp / ep > 1 (the logical norm
  // and the cross-stage norm reduce CPU tensors), local-update optimizers
  // (localUpdates: DiLoCo's outer copies, DeMo's and MT-DAO's codecs are
  // host-side; key optim.name), grad_comm / precision.mode fp8 (CPU FP8 ring
  // and codecs), and backend gloo / mpi (CPU tensors only). With cuda =
  // false: backend "nccl" is refused (it moves CUDA tensors; set
  // `deviceKey` = "cuda"). Backend "nccl" in a build without NCCL is refused
  // either way. Local.
  void validateDevice(bool cuda, bool localUpdates, const std::string& optimizer = "adamw",
                      const std::string& deviceKey = "train.device", const std::string& prefix = "parallel.") const;
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
  PrecisionPlan precision;  // what [precision] resolved to (applied to the layers and the strategy)
  // Pipelines (pp > 1): this rank's chunks as the executor drives them, and
  // the sum of the gradient norm over the stages for the Trainer
  // (TrainerParts::stageNorm). Null otherwise.
  // Declared before the executor, which refers to it (members are destroyed in reverse).
  std::unique_ptr<pipeline::StageModel> stage;
  std::shared_ptr<pipeline::CrossStageNorm> stageNorm;
  std::unique_ptr<DataParallel> dp;         // the strategy; its optimizerParameters() feed the optimizer
  std::unique_ptr<StepExecutor> executor;   // forward + backward of a step (the Trainer's seam)
  comm::CommPtr dataComm;                   // over plan.dataAxes: averages losses; null for one data rank
  int dataRank = 0;                         // this rank's data shard: index in dataComm
  int dataRanks = 1;                        // data shards in all
  comm::CommPtr replicaComm;                // across replicas, for local-update optimizers; else null
  int replica = 0;                          // this rank's dp_replicate coordinate (local updates)
  int replicas = 1;                         // replicas whose parameters differ between syncs (local updates)
  std::vector<NamedComm> traffic;           // every communicator the strategy and the loop use
  // O3 with strategy "fsdp" (precision.h): the ranks the optimizer shards
  // whole tensors over (the dense gradient group). Null otherwise.
  comm::CommPtr wholeTensorShardComm;
  // Where the model's parameters, buffers and the strategy's buffers live
  // (parallelize()'s `device`): the Trainer moves each batch here (TrainerParts::device).
  c10::Device device = c10::Device(c10::kCPU);
  // True on the one rank that writes metrics: the rank that has the loss
  // with every data, tp and ep coordinate 0 (world rank 0 until pipelines).
  bool reportsMetrics = false;
};

// Collective over mesh.world() (DDP and FSDP broadcast rank 0's parameters;
// hybrid and local updates flatten dp axes). Applies the composition order
// above to `model`, after moving its parameters and buffers to `device`
// (step 0: every strategy buffer is then allocated there; the mesh's
// communicators must take tensors on it -- NCCL for CUDA). Throws
// ConfigError as ParallelConfig::resolve and validateDevice do, and for a
// strategy the model cannot run ("fsdp" needs a GPT); CommError /
// TimeoutError from the comms.
// `optimizer` (optim.name) is what resolvePrecision checks the levels against.
ParallelModel parallelize(TrainableModel& model, DeviceMesh& mesh, const ParallelConfig& config,
                          bool localUpdates, const std::string& optimizer = "adamw",
                          c10::Device device = c10::Device(c10::kCPU));

// The part of the GPT that pipeline rank `ppRank` builds under `config`
// (the whole model when mesh.pp == 1). Local; throws ConfigError as
// PipelineConfig::validate and pipeline::planStage do.
models::GptPart pipelinePart(const models::GptConfig& model, const ParallelConfig& config, int ppRank);

}  // namespace tessera::parallel
