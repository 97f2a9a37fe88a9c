// parallelize(): the [parallel] config reconciled once, then the composition
// order of parallelize.h applied to a model.
#include "tessera/parallel/parallelize.h"

#include <torch/nn/module.h>

#include <algorithm>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/pipeline/executor.h"
#include "tessera/parallel/pipeline/schedule.h"
#include "tessera/parallel/tensor_parallel.h"

namespace tessera::parallel {

DataParallelPlan ParallelConfig::resolve(int worldSize, bool localUpdates, const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(strategy == "none" || strategy == "ddp" || strategy == "fsdp" || strategy == "hybrid",
                       prefix + "strategy", "got '" << strategy << "' (valid: none, ddp, fsdp, hybrid)");
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "gloo" || backend == "mpi", prefix + "backend",
                       "got '" << backend << "' (valid: auto, gloo, mpi)");
  TESSERA_CHECK_CONFIG(bucket_mb > 0, prefix + "bucket_mb", "must be > 0, got " << bucket_mb);
  mesh.validate(worldSize, prefix);
  TESSERA_CHECK_CONFIG(mesh.ep == 1, prefix + "ep",
                       "axis ep has degree " << mesh.ep << " in " << mesh.describe()
                                             << ", but tessera does not run expert parallelism yet (valid: 1)");
  if (mesh.pp > 1) pipeline.validate(mesh.pp);
  DataParallelPlan plan;
  plan.strategy = strategy;
  plan.localUpdates = localUpdates;
  plan.dataAxes = {MeshAxis::kDpReplicate, MeshAxis::kDpShard};
  if (localUpdates) {
    // The optimizer replicates over dp_replicate; the strategy works inside a replica.
    TESSERA_CHECK_CONFIG(strategy != "hybrid", prefix + "strategy",
                         "\"hybrid\" replicates over dp_replicate, which DiLoCo/DeMo/MT-DAO already do (valid "
                         "with them: none, ddp, fsdp -- over dp_shard inside each replica)");
    TESSERA_CHECK_CONFIG(strategy != "none" || mesh.dp_shard == 1, prefix + "dp_shard",
                         "strategy \"none\" runs one rank per replica; dp_shard must be 1, got "
                             << mesh.dp_shard << " (use ddp or fsdp inside each replica)");
    if (strategy != "none") plan.gradientAxes = {MeshAxis::kDpShard};
    return plan;
  }
  if (strategy == "none") {
    TESSERA_CHECK_CONFIG(mesh.dp_replicate * mesh.dp_shard == 1, prefix + "strategy",
                         "\"none\" trains one replica, but dp_replicate(" << mesh.dp_replicate << ") x dp_shard("
                             << mesh.dp_shard << ") = " << mesh.dp_replicate * mesh.dp_shard
                             << " (valid: ddp, fsdp, hybrid; or degrees 1)");
  } else if (strategy == "ddp") {
    TESSERA_CHECK_CONFIG(mesh.dp_shard == 1, prefix + "dp_shard",
                         "strategy \"ddp\" replicates over dp_replicate; dp_shard must be 1, got "
                             << mesh.dp_shard << " (use strategy = \"fsdp\" or \"hybrid\" to shard)");
    plan.gradientAxes = {MeshAxis::kDpReplicate};
  } else if (strategy == "fsdp") {
    TESSERA_CHECK_CONFIG(mesh.dp_replicate == 1, prefix + "dp_replicate",
                         "strategy \"fsdp\" shards over dp_shard; dp_replicate must be 1, got "
                             << mesh.dp_replicate << " (use strategy = \"hybrid\" to also replicate)");
    plan.gradientAxes = {MeshAxis::kDpShard};
  } else {
    plan.gradientAxes = {MeshAxis::kDpReplicate, MeshAxis::kDpShard};
  }
  return plan;
}

int PipelineConfig::chunksPerRank() const {
  if (schedule == "zb_v") return 2;
  if (schedule == "interleaved_1f1b") return virtual_stages;
  return 1;
}

void PipelineConfig::validate(int pp, const std::string& prefix) const {
  const std::vector<std::string>& names = pipeline::scheduleNames();
  if (std::find(names.begin(), names.end(), schedule) == names.end()) {
    std::string valid;
    for (const std::string& n : names) valid += (valid.empty() ? "" : ", ") + n;
    throw ConfigError(prefix + "schedule", "got '" + schedule + "' (valid: " + valid + ")");
  }
  TESSERA_CHECK_CONFIG(microbatches >= 0, prefix + "microbatches",
                       "must be >= 1 (or 0: one per stage), got " << microbatches);
  TESSERA_CHECK_CONFIG(virtual_stages >= 1, prefix + "virtual_stages", "must be >= 1, got " << virtual_stages);
  TESSERA_CHECK_CONFIG(schedule != "interleaved_1f1b" || virtual_stages >= 2, prefix + "virtual_stages",
                       "interleaved_1f1b needs >= 2 chunks per rank, got " << virtual_stages
                                                                           << " (or use schedule = \"1f1b\")");
  TESSERA_CHECK_CONFIG(auto_profile_steps >= 1, prefix + "auto_profile_steps",
                       "must be >= 1, got " << auto_profile_steps);
  TESSERA_CHECK_CONFIG(offload == "none" || offload == "all" || offload == "selective", prefix + "offload",
                       "got '" << offload << "' (valid: none, all, selective)");
  TESSERA_CHECK_CONFIG(offload_budget_mb >= 0, prefix + "offload_budget_mb", "must be >= 0, got " << offload_budget_mb);
  const int chunks = pp * chunksPerRank();
  TESSERA_CHECK_CONFIG(layers_per_stage.empty() || static_cast<int>(layers_per_stage.size()) == chunks,
                       prefix + "layers_per_stage",
                       "has " << layers_per_stage.size() << " entries, but " << schedule << " over pp = " << pp
                              << " cuts the model into " << chunks << " chunks (give one count per chunk)");
  // The schedule's own limits (micro-batches it needs), as a ConfigError naming the key.
  pipeline::makeSchedule(schedule == "auto" ? "zb_h1" : schedule, pp, microBatchesFor(pp), chunksPerRank(),
                         pipeline::PipelineCosts{});
}

namespace {

// The schedule the executor starts with ("auto" measures under zb_h1 first).
pipeline::PipelineSchedule initialSchedule(const PipelineConfig& config, int pp) {
  const std::string name = config.schedule == "auto" ? "zb_h1" : config.schedule;
  return pipeline::withCommunication(
      pipeline::makeSchedule(name, pp, config.microBatchesFor(pp), config.chunksPerRank(), pipeline::PipelineCosts{}));
}

// The group over `axes`: null when it has one rank, the axis's own
// communicator when one axis is split, else a flattened group named `name`
// (collective: every rank flattens in the same order).
// *groupName receives the name the metrics use for it.
comm::CommPtr groupOver(DeviceMesh& mesh, const std::vector<MeshAxis>& axes, const std::string& name,
                        std::string* groupName) {
  std::vector<MeshAxis> split;
  for (MeshAxis axis : axes) {
    if (mesh.shape().degree(axis) > 1) split.push_back(axis);
  }
  if (split.empty()) return nullptr;
  if (split.size() == 1) {
    *groupName = toString(split.front());
    return mesh.comm(split.front());
  }
  *groupName = name;
  return mesh.hasGroup(name) ? mesh.comm(name) : mesh.flatten(split, name);
}

// Step 4 of the composition order: the data-parallel strategy inside a replica.
std::unique_ptr<DataParallel> makeStrategy(const DataParallelPlan& plan, const ParallelConfig& config,
                                           torch::nn::Module& module, DeviceMesh& mesh) {
  if (plan.strategy == "none") return makeNoDataParallel(module);
  if (plan.strategy == "ddp") {
    DdpConfig ddp;
    ddp.bucketCapBytes = static_cast<int64_t>(config.bucket_mb * 1024 * 1024);
    return makeDdpDataParallel(module, mesh.comm(plan.gradientAxes.front()), ddp);
  }
  // fsdp / hybrid: every GPT block (dense, MoE or with dropout) is an FSDP unit.
  auto* gpt = dynamic_cast<models::GptImpl*>(&module);
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.strategy",
                       "\"" << plan.strategy << "\" shards GPT blocks; model.kind = \"mlp\" supports none, ddp");
  return makeFsdpDataParallel(*gpt, mesh.comm(MeshAxis::kDpShard),
                              plan.strategy == "hybrid" ? mesh.comm(MeshAxis::kDpReplicate) : nullptr);
}

void addTraffic(std::vector<NamedComm>& traffic, const std::string& name, const comm::CommPtr& comm) {
  if (!comm) return;
  for (const NamedComm& known : traffic) {
    if (known.comm == comm) return;
  }
  traffic.push_back(NamedComm{name, comm});
}

}  // namespace

ParallelModel parallelize(TrainableModel& model, DeviceMesh& mesh, const ParallelConfig& config,
                          bool localUpdates) {
  ParallelModel out;
  out.plan = config.resolve(mesh.world()->size(), localUpdates);  // the same error on every rank, before any collective
  const DataParallelPlan& plan = out.plan;

  // Step 1: the pipeline split. The caller built this rank's part (pipelinePart).
  const int pp = config.mesh.pp;
  const comm::CommPtr ppComm = pp > 1 ? mesh.comm(MeshAxis::kPp) : nullptr;
  pipeline::PipelineSchedule schedule;
  if (ppComm) {
    auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
    TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.pp",
                         "pipeline stages cut GPT blocks; model.kind = \"mlp\" runs with pp = 1");
    schedule = initialSchedule(config.pipeline, pp);
    out.stage = pipeline::makeGptStage(
        model, pipeline::planStage(gpt->config(), schedule.chunkOwner, ppComm->rank(), config.pipeline.layers_per_stage));
  }
  // Step 3 (expert parallelism) is refused by resolve() until it exists.
  // Step 2: tensor parallelism, before any strategy sees the parameters.
  const comm::CommPtr tpComm = config.mesh.tp > 1 ? mesh.comm(MeshAxis::kTp) : nullptr;
  std::set<std::string> tpSharded;
  if (tpComm) {
    applyTensorParallel(model, tpComm, config.sequence_parallel);
    tpSharded = tensorParallelParameters(model.module());
  }
  // Step 4: data parallelism inside a replica.
  std::string dataGroupName;
  out.dataComm = groupOver(mesh, plan.dataAxes, "dp", &dataGroupName);  // collective when both dp axes are split
  out.dataRank = out.dataComm ? out.dataComm->rank() : 0;
  out.dataRanks = out.dataComm ? out.dataComm->size() : 1;
  out.dp = makeStrategy(plan, config, model.module(), mesh);  // collective: broadcasts rank 0's parameters
  if (tpComm) {
    const bool fsdp = plan.strategy == "fsdp" || plan.strategy == "hybrid";
    out.dp = withTensorParallelNorm(std::move(out.dp), std::move(tpSharded), tpComm,
                                    fsdp ? mesh.comm(MeshAxis::kDpShard) : nullptr);
  }
  if (ppComm) {
    // Megatron's embedding group: the first and last ranks' copies of a tied wte.
    auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
    const bool tied = gpt->config().tie_weights && schedule.chunkOwner.front() != schedule.chunkOwner.back();
    const bool end = gpt->part().embedding || gpt->part().head;
    const comm::CommPtr embeddingComm =
        tied ? ppComm->split(end ? 0 : comm::Communicator::kNoColor, ppComm->rank(), "embedding") : nullptr;  // collective over pp
    const bool fsdp = plan.strategy == "fsdp" || plan.strategy == "hybrid";
    out.dp = pipeline::withPipelineStage(std::move(out.dp), model.module(), gpt->holdsTiedCopy(), embeddingComm, tpComm,
                                         fsdp ? mesh.comm(MeshAxis::kDpShard) : nullptr);
    pipeline::ExecutorOptions options;
    options.microBatches = config.pipeline.microBatchesFor(pp);
    options.dataRank = out.dataRank;
    if (config.pipeline.schedule == "auto") options.autoScheduleAfter = config.pipeline.auto_profile_steps;
    options.offload = config.pipeline.offload;
    options.offloadBudgetBytes = config.pipeline.offload_budget_mb * 1024 * 1024;
    options.measureActivations = config.pipeline.measure_activations;
    out.executor = pipeline::makePipelineExecutor(*out.stage, *out.dp, ppComm, std::move(schedule), options);
    out.stageNorm = pipeline::makeCrossStageNorm(ppComm);
  } else {
    out.executor = makeLocalStepExecutor(model, *out.dp, out.dataRank);
  }

  // Step 5 happens in the optimizer; it reduces over the replicas.
  if (localUpdates) {
    out.replicaComm = mesh.comm(MeshAxis::kDpReplicate);
    out.replica = mesh.coordinate(MeshAxis::kDpReplicate);
    out.replicas = config.mesh.dp_replicate;
  }

  for (MeshAxis axis : plan.gradientAxes) {
    if (mesh.shape().degree(axis) > 1) addTraffic(out.traffic, toString(axis), mesh.comm(axis));
  }
  if (out.replicaComm && out.replicas > 1) addTraffic(out.traffic, toString(MeshAxis::kDpReplicate), out.replicaComm);
  addTraffic(out.traffic, dataGroupName, out.dataComm);  // the loop averages losses over it
  if (tpComm) addTraffic(out.traffic, toString(MeshAxis::kTp), tpComm);
  if (ppComm) addTraffic(out.traffic, toString(MeshAxis::kPp), ppComm);

  out.reportsMetrics = out.executor->hasLoss();
  for (MeshAxis axis : kMeshAxes) {
    if (axis != MeshAxis::kPp && mesh.coordinate(axis) != 0) out.reportsMetrics = false;
  }
  return out;
}

models::GptPart pipelinePart(const models::GptConfig& model, const ParallelConfig& config, int ppRank) {
  const int pp = config.mesh.pp;
  if (pp <= 1) return models::GptPart::whole();
  config.pipeline.validate(pp);
  const pipeline::PipelineSchedule schedule = initialSchedule(config.pipeline, pp);
  return pipeline::partOf(pipeline::planStage(model, schedule.chunkOwner, ppRank, config.pipeline.layers_per_stage));
}

}  // namespace tessera::parallel
