// parallelize(): the [parallel] config reconciled once, then the composition
// order of parallelize.h applied to a model.
#include "tessera/parallel/parallelize.h"

#include <torch/nn/module.h>

#include <algorithm>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/parallel/tensor_parallel.h"

namespace tessera::parallel {

DataParallelPlan ParallelConfig::resolve(int worldSize, bool localUpdates, const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(strategy == "none" || strategy == "ddp" || strategy == "fsdp" || strategy == "hybrid",
                       prefix + "strategy", "got '" << strategy << "' (valid: none, ddp, fsdp, hybrid)");
  TESSERA_CHECK_CONFIG(backend == "auto" || backend == "gloo" || backend == "mpi", prefix + "backend",
                       "got '" << backend << "' (valid: auto, gloo, mpi)");
  TESSERA_CHECK_CONFIG(bucket_mb > 0, prefix + "bucket_mb", "must be > 0, got " << bucket_mb);
  mesh.validate(worldSize, prefix);
  for (MeshAxis axis : {MeshAxis::kPp, MeshAxis::kEp}) {
    TESSERA_CHECK_CONFIG(mesh.degree(axis) == 1, prefix + toString(axis),
                         "axis " << toString(axis) << " has degree " << mesh.degree(axis) << " in "
                                 << mesh.describe() << ", but tessera does not run "
                                 << (axis == MeshAxis::kPp ? "pipeline" : "expert") << " parallelism yet (valid: 1)");
  }
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

namespace {

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

  // Steps 1 and 3 (pipeline split, expert parallelism) are refused by resolve() until they exist.
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
  out.executor = makeLocalStepExecutor(model, *out.dp, out.dataRank);

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

  out.reportsMetrics = out.executor->hasLoss();
  for (MeshAxis axis : kMeshAxes) {
    if (axis != MeshAxis::kPp && mesh.coordinate(axis) != 0) out.reportsMetrics = false;
  }
  return out;
}

}  // namespace tessera::parallel
