// parallelize(): the [parallel] config reconciled once, then the composition
// order of parallelize.h applied to a model.
#include "tessera/parallel/parallelize.h"

#include <torch/nn/module.h>

#include <algorithm>

#include "tessera/comm/nccl.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/precision.h"
#include "tessera/parallel/expert_parallel.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/logical_norm.h"
#include "tessera/parallel/pipeline/executor.h"
#include "tessera/parallel/pipeline/schedule.h"
#include "tessera/parallel/tensor_parallel.h"

namespace tessera::parallel {

DataParallelPlan ParallelConfig::resolve(int worldSize, bool localUpdates, const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(strategy == "none" || strategy == "ddp" || strategy == "fsdp" || strategy == "hybrid",
                       prefix + "strategy", "got '" << strategy << "' (valid: none, ddp, fsdp, hybrid)");
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "gloo" || backend == "mpi" || backend == "nccl",
                       prefix + "backend", "got '" << backend << "' (valid: auto, gloo, mpi, nccl)");
  TESSERA_CHECK_CONFIG(bucket_mb > 0, prefix + "bucket_mb", "must be > 0, got " << bucket_mb);
  mesh.validate(worldSize, prefix);
  if (mesh.pp > 1) pipeline.validate(mesh.pp);
  DataParallelPlan plan = resolveDataAxes(localUpdates, prefix);
  // ep is data-parallel for the dense parameters; experts reduce over the
  // same axes without it, and divide by the whole data size (1/ep more).
  if (mesh.ep > 1) {
    TESSERA_CHECK_CONFIG(!plan.gradientAxes.empty(), prefix + "strategy",
                         "\"none\" syncs no gradients, but ranks along parallel.ep ("
                             << mesh.ep << ") read different batches and share the dense parameters "
                             << "(valid with ep > 1: ddp, fsdp" << (localUpdates ? "" : ", hybrid") << ")");
    plan.expertGradientAxes = plan.gradientAxes;
    plan.gradientAxes.push_back(MeshAxis::kEp);
    plan.expertGradientScale = 1.0 / mesh.ep;
  }
  return plan;
}

DataParallelPlan ParallelConfig::resolveDataAxes(bool localUpdates, const std::string& prefix) const {
  DataParallelPlan plan;
  plan.strategy = strategy;
  plan.localUpdates = localUpdates;
  plan.dataAxes = {MeshAxis::kDpReplicate, MeshAxis::kDpShard, MeshAxis::kEp};
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

void ParallelConfig::validateDevice(bool cuda, bool localUpdates, const std::string& optimizer,
                                    const std::string& deviceKey, const std::string& prefix) const {
  const std::string backendKey = prefix + "backend";
  if (backend == "nccl") {
    TESSERA_CHECK_CONFIG(cuda, backendKey,
                         "\"nccl\" moves CUDA tensors, but " << deviceKey << " is the CPU: set " << deviceKey
                             << " = \"cuda\", or use " << backendKey << " = \"gloo\" (or \"auto\") on the CPU");
    TESSERA_CHECK_CONFIG(comm::ncclBackendBuilt(), backendKey,
                         "\"nccl\", but this build of tessera has no NCCL: install the CUDA toolkit and NCCL and "
                         "reconfigure with -DTESSERA_WITH_NCCL=ON (or set CUDAToolkit_ROOT)");
  }
  if (!cuda) return;
  const std::string why = " on " + deviceKey + " = \"cuda\"";
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "nccl", backendKey,
                       "\"" << backend << "\" moves CPU tensors only; with " << deviceKey
                             << " = \"cuda\" use \"nccl\" or \"auto\"");
  TESSERA_CHECK_CONFIG(strategy == "none" || strategy == "ddp", prefix + "strategy",
                       "\"" << strategy << "\" keeps its flat shards in CPU buffers; valid" << why
                             << ": none, ddp");
  for (MeshAxis axis : {MeshAxis::kTp, MeshAxis::kPp, MeshAxis::kEp}) {
    TESSERA_CHECK_CONFIG(mesh.degree(axis) == 1, prefix + toString(axis),
                         "must be 1" << why << " (got " << mesh.degree(axis)
                                     << "): the gradient norm over tensor-, pipeline- and expert-parallel ranks "
                                        "reduces CPU tensors; use " << prefix << "dp_replicate for more GPUs");
  }
  TESSERA_CHECK_CONFIG(!localUpdates, "optim.name",
                       "DiLoCo, DeMo and MT-DAO keep host-side copies and codecs; use \"adamw\" or \"sgd\"" << why);
  TESSERA_CHECK_CONFIG(optimizer == "adamw" || optimizer == "sgd", "optim.name",
                       "got '" << optimizer << "'; valid" << why << ": adamw, sgd");
  TESSERA_CHECK_CONFIG(precision.mode != "fp8", "precision.mode",
                       "\"fp8\" runs FP8 codecs and the FP8 gradient ring on the CPU; valid" << why << ": fp32, bf16");
  TESSERA_CHECK_CONFIG(grad_comm != "fp8", prefix + "grad_comm",
                       "\"fp8\" runs the FP8 ring over CPU tensors; valid" << why << ": fp32, bf16");
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
// communicator when one axis other than ep is split, else a flattened group
// named `name` (collective over the world: every rank flattens in the same
// order). The ep axis's own communicator carries only the experts'
// all-to-alls, so their bytes can be told apart: a group over ep alone is
// flattened too. *groupName receives the name the metrics use for it.
comm::CommPtr groupOver(DeviceMesh& mesh, const std::vector<MeshAxis>& axes, const std::string& name,
                        std::string* groupName) {
  std::vector<MeshAxis> split;
  for (MeshAxis axis : axes) {
    if (mesh.shape().degree(axis) > 1) split.push_back(axis);
  }
  if (split.empty()) return nullptr;
  if (split.size() == 1 && split.front() != MeshAxis::kEp) {
    *groupName = toString(split.front());
    return mesh.comm(split.front());
  }
  *groupName = name;
  return mesh.hasGroup(name) ? mesh.comm(name) : mesh.flatten(split, name);
}

// "dp_shard+ep": the name of a gradient group over several axes.
std::string joinedName(const std::vector<MeshAxis>& axes) {
  std::string name;
  for (MeshAxis axis : axes) name += (name.empty() ? "" : "+") + std::string(toString(axis));
  return name;
}

// The communicator a strategy reduces `axes` over: the data group when it
// spans the same split axes (no second flattened copy), else groupOver; a
// single-rank communicator (the dp_shard axis's, of degree 1) when no axis
// is split, so strategies always get one. *groupName: its metrics name.
comm::CommPtr gradientGroup(DeviceMesh& mesh, const DataParallelPlan& plan, const NamedComm& data,
                            const std::vector<MeshAxis>& axes, std::string* groupName) {
  auto splitOf = [&mesh](const std::vector<MeshAxis>& list) {
    std::vector<MeshAxis> split;
    for (MeshAxis axis : kMeshAxes) {
      if (mesh.shape().degree(axis) > 1 && std::find(list.begin(), list.end(), axis) != list.end()) split.push_back(axis);
    }
    return split;
  };
  const std::vector<MeshAxis> split = splitOf(axes);
  if (split.empty()) {
    for (MeshAxis axis : axes) {
      if (axis != MeshAxis::kEp) return mesh.comm(axis);  // degree 1: no collective ever leaves the rank
    }
    return mesh.comm(MeshAxis::kDpShard);
  }
  if (data.comm && split == splitOf(plan.dataAxes)) {
    *groupName = data.name;
    return data.comm;
  }
  return groupOver(mesh, axes, joinedName(axes), groupName);
}

// Step 4 of the composition order: the data-parallel strategy inside a
// replica. Dense parameters reduce over plan.gradientAxes, experts over
// plan.expertGradientAxes (scaled); *used receives every communicator it
// reduces over, with its metrics name.
struct StrategyComms {
  comm::CommPtr dense;             // dense gradients (FSDP: the dense shard group)
  comm::CommPtr expert;            // expert gradients (FSDP: the expert shard group); null without experts
  std::vector<NamedComm> used;     // every communicator it reduces over, with its metrics name
};

// FSDP's flat shards: strategy fsdp / hybrid, except under O3, whose "fsdp"
// is the optimizer's whole-tensor ZeRO over DDP replicas (precision.h).
bool shardsFlat(const DataParallelPlan& plan, const PrecisionPlan& precision) {
  return (plan.strategy == "fsdp" || plan.strategy == "hybrid") && !precision.wholeTensorZero;
}

std::unique_ptr<DataParallel> makeStrategy(const DataParallelPlan& plan, const ParallelConfig& config,
                                           const PrecisionPlan& precision, torch::nn::Module& module,
                                           DeviceMesh& mesh, const NamedComm& data, StrategyComms* comms) {
  std::vector<NamedComm>* used = &comms->used;
  if (plan.strategy == "none") return makeNoDataParallel(module);
  const bool experts = !plan.expertGradientAxes.empty();
  std::string denseName, expertName;
  const bool fsdp = shardsFlat(plan, precision);
  // FSDP replicates over dp_replicate (hybrid) outside its shard group: the
  // shard group is the gradient axes without dp_replicate.
  std::vector<MeshAxis> denseAxes, expertAxes;
  for (MeshAxis axis : plan.gradientAxes) {
    if (!fsdp || axis != MeshAxis::kDpReplicate) denseAxes.push_back(axis);
  }
  for (MeshAxis axis : plan.expertGradientAxes) {
    if (!fsdp || axis != MeshAxis::kDpReplicate) expertAxes.push_back(axis);
  }
  const comm::CommPtr dense = gradientGroup(mesh, plan, data, denseAxes, &denseName);
  if (!denseName.empty()) used->push_back(NamedComm{denseName, dense});
  comm::CommPtr expert;
  if (experts) {
    expert = gradientGroup(mesh, plan, data, expertAxes, &expertName);
    if (!expertName.empty()) used->push_back(NamedComm{expertName, expert});
  }
  comms->dense = dense;
  comms->expert = expert;
  if (!fsdp) {
    DdpConfig ddp;
    ddp.bucketCapBytes = static_cast<int64_t>(config.bucket_mb * 1024 * 1024);
    ddp.gradComm = precision.gradientComm;
    ddp.fp8Scaling = precision.fp8AutoScaling ? Fp8Scaling::kAuto : Fp8Scaling::kSafe;
    if (!experts) return makeDdpDataParallel(module, dense, ddp);
    std::vector<DdpGroup> groups;
    groups.push_back(DdpGroup{expert, isExpertParameter, plan.expertGradientScale});
    groups.push_back(DdpGroup{dense, {}, 1.0});
    return makeDdpDataParallel(module, std::move(groups), ddp);
  }
  // fsdp / hybrid: every GPT block (dense, MoE or with dropout) is an FSDP
  // unit, and with expert parallelism each MoE block's experts one more.
  auto* gpt = dynamic_cast<models::GptImpl*>(&module);
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.strategy",
                       "\"" << plan.strategy << "\" shards GPT blocks; model.kind = \"mlp\" supports none, ddp");
  const comm::CommPtr replicate = plan.strategy == "hybrid" ? mesh.comm(MeshAxis::kDpReplicate) : nullptr;
  if (replicate && replicate->size() > 1) used->push_back(NamedComm{toString(MeshAxis::kDpReplicate), replicate});
  FsdpConfig fsdpConfig;
  fsdpConfig.gradComm = precision.gradientComm;
  fsdpConfig.fp8Scaling = precision.fp8AutoScaling ? Fp8Scaling::kAuto : Fp8Scaling::kSafe;
  if (!experts) return makeFsdpDataParallel(*gpt, dense, replicate, nullptr, fsdpConfig);
  FsdpExpertUnits expertUnits{expert, replicate, plan.expertGradientScale};
  return makeFsdpDataParallel(*gpt, dense, replicate, &expertUnits, fsdpConfig);
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
                          bool localUpdates, const std::string& optimizer, c10::Device device) {
  ParallelModel out;
  out.plan = config.resolve(mesh.world()->size(), localUpdates);  // the same error on every rank, before any collective
  config.validateDevice(device.is_cuda(), localUpdates, optimizer);
  out.precision = resolvePrecision(config.precision, config.grad_comm, out.plan.strategy, optimizer);
  const DataParallelPlan& plan = out.plan;

  // Step 0: the device, before any step allocates buffers shaped like the
  // parameters (DDP's buckets take their options). On the CPU to() keeps
  // the same tensors.
  out.device = device;
  model.module().to(device);

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
  // Step 2: tensor parallelism, before any strategy sees the parameters.
  const comm::CommPtr tpComm = config.mesh.tp > 1 ? mesh.comm(MeshAxis::kTp) : nullptr;
  std::set<std::string> tpSharded;
  if (tpComm) {
    applyTensorParallel(model, tpComm, config.sequence_parallel);
    tpSharded = tensorParallelParameters(model.module());
  }
  // Step 3: expert parallelism (after TP: TED's experts are already split).
  const comm::CommPtr epComm = config.mesh.ep > 1 ? mesh.comm(MeshAxis::kEp) : nullptr;
  if (epComm || (tpComm && config.moe_dtd)) {
    applyExpertParallel(model, epComm ? epComm : mesh.comm(MeshAxis::kEp), config.moe_dtd);
  }
  // Step 3b: precision, on the layers as TP / EP left them (a sharded
  // layer's FP8 weight scale reduces over its shard group).
  if (out.precision.layers != models::Precision::kDefault) {
    models::setPrecision(model.module(), out.precision.layers, out.precision.recipe);
  }
  // Step 4: data parallelism inside a replica.
  std::string dataGroupName;
  out.dataComm = groupOver(mesh, plan.dataAxes, "dp", &dataGroupName);  // collective when several data axes are split
  out.dataRank = out.dataComm ? out.dataComm->rank() : 0;
  out.dataRanks = out.dataComm ? out.dataComm->size() : 1;
  StrategyComms strategyComms;
  out.dp = makeStrategy(plan, config, out.precision, model.module(), mesh, NamedComm{dataGroupName, out.dataComm},
                        &strategyComms);  // collective: broadcasts
  const bool fsdp = shardsFlat(plan, out.precision);
  if (out.precision.wholeTensorZero) {
    TESSERA_CHECK_CONFIG(plan.expertGradientAxes.empty(), "precision.level",
                         "O3's whole-tensor ZeRO shards over the dense gradient group, which expert parameters "
                         "(parallel.ep > 1) do not share; use precision.level = \"O2\" or parallel.ep = 1");
    out.wholeTensorShardComm = strategyComms.dense;
  }
  const comm::CommPtr denseShards = fsdp ? strategyComms.dense : nullptr;  // holds distinct dense shards
  if (tpComm || epComm) {
    out.dp = withLogicalNorm(std::move(out.dp), std::move(tpSharded), tpComm, epComm, denseShards,
                             fsdp ? strategyComms.expert : nullptr);
  }
  if (ppComm) {
    // Megatron's embedding group: the first and last ranks' copies of a tied wte.
    auto* gpt = dynamic_cast<models::GptImpl*>(&model.module());
    const bool tied = gpt->config().tie_weights && schedule.chunkOwner.front() != schedule.chunkOwner.back();
    const bool end = gpt->part().embedding || gpt->part().head;
    const comm::CommPtr embeddingComm =
        tied ? ppComm->split(end ? 0 : comm::Communicator::kNoColor, ppComm->rank(), "embedding") : nullptr;  // collective over pp
    out.dp = pipeline::withPipelineStage(std::move(out.dp), model.module(), gpt->holdsTiedCopy(), embeddingComm, tpComm,
                                         denseShards);
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

  for (const NamedComm& c : strategyComms.used) addTraffic(out.traffic, c.name, c.comm);
  if (out.replicaComm && out.replicas > 1) addTraffic(out.traffic, toString(MeshAxis::kDpReplicate), out.replicaComm);
  addTraffic(out.traffic, dataGroupName, out.dataComm);  // the loop averages losses over it
  if (tpComm) addTraffic(out.traffic, toString(MeshAxis::kTp), tpComm);
  if (ppComm) addTraffic(out.traffic, toString(MeshAxis::kPp), ppComm);
  if (epComm) addTraffic(out.traffic, toString(MeshAxis::kEp), epComm);  // the experts' all-to-alls only

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
