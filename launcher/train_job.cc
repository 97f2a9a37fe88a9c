#include "launcher/train_job.h"

#include <ATen/Parallel.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "tessera/core/threads.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/core/config.h"
#include "tessera/core/data/byte_corpus.h"
#include "tessera/core/data/fashion_mnist.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/optim/low_precision_adamw.h"
#include "tessera/optim/lr_schedule.h"

namespace tessera::launcher {
namespace {

// The DiLoCo streaming group of each optimizer tensor: its transformer block
// ("blocks.<k>." -> k), everything else (embeddings, final norm) one more
// group, numbered after the whole model's blocks (`blocks`, or this rank's
// highest + 1 when 0) so a pipeline stage's fragments are those of pp = 1.
std::vector<int> layerGroups(const parallel::DataParallel& dp, int blocks = 0) {
  std::vector<int> groups;
  std::vector<std::vector<parallel::ParameterPiece>> layout;
  try {
    layout = dp.parameterLayout();
  } catch (const NotSupported&) {
    return {};  // no names: DiLoCo groups by tensor index
  }
  int maxBlock = -1;
  std::vector<int> blockOf;
  for (const auto& pieces : layout) {
    int block = -1;
    if (!pieces.empty() && pieces.front().name.rfind("blocks.", 0) == 0) {
      block = std::atoi(pieces.front().name.c_str() + 7);
    }
    blockOf.push_back(block);
    maxBlock = std::max(maxBlock, block);
  }
  const int rest = blocks > 0 ? blocks : maxBlock + 1;
  for (int b : blockOf) groups.push_back(b >= 0 ? b : rest);
  return groups;
}

// Elastic runs train with an optimizer that synchronizes replicas now and
// then; the rest synchronize every gradient over a fixed group.
std::string elasticOptimizerMessage(const std::string& name) {
  return "elastic runs (tessera-run --nnodes MIN:MAX) train with \"diloco\", \"demo\" or \"mt-dao\" across nodes "
         "(each node one replica); got \"" + name + "\"";
}


// The optimizer [optim] name selects, over the strategy's tensors. Collective
// for the communication-light ones (they broadcast or split over dp_replicate).
// Step 5 of parallelize.h's composition order: across replicas.
std::unique_ptr<optim::Optimizer> makeJobOptimizer(const TrainJobConfig& job, parallel::DataParallel& dp,
                                                   const parallel::DeviceMesh& mesh,
                                                   const parallel::ParallelModel& parallel,
                                                   const ElasticJobOptions* elastic) {
  using parallel::MeshAxis;
  const comm::CommPtr& replicas = mesh.comm(MeshAxis::kDpReplicate);
  std::vector<at::Tensor> parameters = dp.optimizerParameters();
  // [precision]'s levels O2 / O3 choose how AdamW stores its state (precision.h).
  TrainJobConfig config = job;
  config.optim.states = parallel.precision.optimizerStates;
  config.optim.master = parallel.precision.master;
  if (parallel.wholeTensorShardComm) {  // O3 with strategy "fsdp": ZeRO over whole tensors
    if (elastic) {
      throw ConfigError("precision.level",
                        "O3 with parallel.strategy = \"fsdp\" shards a whole-tensor AdamW inside the node, which an "
                        "elastic run cannot average across nodes; use precision.level = \"O2\" (or strategy \"ddp\") "
                        "with --nnodes MIN:MAX");
    }
    return std::make_unique<optim::LowPrecisionAdamW>(config.optim, parameters, config.schedule.lr,
                                                      optim::WholeTensorShards{parallel.wholeTensorShardComm});
  }
  if (elastic) {  // the nodes are the replicas: every sync runs on the elastic group of its members
    TESSERA_CHECK_ARG(elastic->collective != nullptr, "buildTrainJob: elastic run without an elastic collective");
    if (config.optimizer == "diloco") {
      auto inner = optim::makeOptimizer(config.optim, parameters, config.schedule.lr);
      return optim::makeElasticDiloco(config.diloco, std::move(inner), parameters, elastic->collective,
                                      layerGroups(dp));
    }
    if (config.optimizer == "demo") {
      return optim::makeElasticDemo(config.demo, parameters, elastic->collective, config.schedule.lr,
                                    dp.parameterLayout());
    }
    if (config.optimizer == "mt-dao") {
      return optim::makeElasticMtDao(config.mt_dao, parameters, elastic->collective, config.schedule.lr);
    }
    throw ConfigError("optim.name", elasticOptimizerMessage(config.optimizer));
  }
  if (config.optimizer == "diloco") {
    auto inner = optim::makeOptimizer(config.optim, parameters, config.schedule.lr);
    return optim::makeDiloco(config.diloco, std::move(inner), parameters, replicas,
                             layerGroups(dp, config.model.kind == "gpt" ? static_cast<int>(config.model.gpt.n_layer) : 0));
  }
  if (config.optimizer == "demo") {  // chunked on the logical tensors (TP shards: optim/demo.h)
    return optim::makeDemo(config.demo, parameters, replicas, config.schedule.lr, dp.parameterLayout());
  }
  if (config.optimizer == "mt-dao") return optim::makeMtDao(config.mt_dao, parameters, replicas, config.schedule.lr);
  return optim::makeOptimizer(config.optim, parameters, config.schedule.lr);
}

// The metrics name of a communicator an optimizer uses: the mesh axis it is
// ("dp_replicate"), or its own name relative to the world ("diloco/stream").
std::string optimizerCommName(const parallel::DeviceMesh& mesh, const comm::CommPtr& c) {
  for (parallel::MeshAxis axis : parallel::kMeshAxes) {
    if (mesh.comm(axis) == c) return parallel::toString(axis);
  }
  const std::string prefix = mesh.world()->name() + "/";
  const std::string& name = c->name();
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

struct JobData {
  std::unique_ptr<BatchSource> train;
  std::unique_ptr<BatchSource> val;
};

// This rank's shard of the training split, and of the validation split (in
// file order, so every evaluation sees the same batches).
JobData loadData(const TrainJobConfig& job, int dpRank, int dpSize) {
  data::DistributedSampler::Options options;
  options.batchSize = job.data.batch_size;
  options.dpRank = dpRank;
  options.dpSize = dpSize;
  options.seed = job.data.seed;
  options.shuffle = job.data.shuffle;
  data::DistributedSampler::Options valOptions = options;
  valOptions.shuffle = false;
  JobData out;
  if (job.model.kind == "gpt") {
    const data::LmSplit split = data::splitCorpus(data::ByteCorpus::load(job.data.resolvedDir()), job.data);
    out.train = makeBatchSource(split.train, options);
    out.val = makeBatchSource(split.val, valOptions);
  } else {
    const std::string dir = job.data.resolvedDir();
    out.train = makeBatchSource(data::loadFashionMnist(dir, "train", job.data.normalize), options);
    out.val = makeBatchSource(data::loadFashionMnist(dir, "test", job.data.normalize), valOptions);
  }
  return out;
}

// The model, or under a pipeline this rank's part of it (parallelize.h, step 1).
std::unique_ptr<TrainableModel> buildModel(const TrainJobConfig& job, const parallel::DeviceMesh& mesh) {
  if (job.model.kind == "gpt") {
    return makeTrainable(models::Gpt(
        job.model.gpt, parallel::pipelinePart(job.model.gpt, job.parallel, mesh.coordinate(parallel::MeshAxis::kPp))));
  }
  return makeTrainable(models::MlpClassifier(job.model.mlp));
}

}  // namespace

std::string hashTensors(const std::vector<at::Tensor>& tensors) {
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0);
  for (const at::Tensor& t : tensors) {
    const at::Tensor c = t.detach().cpu().contiguous();
    XXH64_update(state, c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  const XXH64_hash_t hash = XXH64_digest(state);
  XXH64_freeState(state);
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(hash));
  return text;
}

std::unique_ptr<TrainJob> buildTrainJob(const TrainJobConfig& config, const DistributedContext& ctx,
                                        const std::string& metricsPath, const ElasticJobOptions* elastic) {
  const bool localUpdates = config.localUpdates();
  if (elastic) {
    TESSERA_CHECK_CONFIG(config.optimizer == "diloco" || config.optimizer == "demo" || config.optimizer == "mt-dao",
                         "optim.name", elasticOptimizerMessage(config.optimizer));
    TESSERA_CHECK_CONFIG(config.parallel.mesh.dp_replicate == 1, "parallel.dp_replicate",
                         "in an elastic run the nodes are the replicas and [parallel] describes one node: set "
                         "parallel.dp_replicate = 1 (got " << config.parallel.mesh.dp_replicate << ")");
    TESSERA_CHECK_CONFIG(config.parallel.mesh.tp == 1, "parallel.tp",
                         "elastic nodes whose local group is tensor-parallel come with the whole-mesh elastic "
                         "work (issue 19); an elastic run needs parallel.tp = 1 (got " << config.parallel.mesh.tp << ")");
    TESSERA_CHECK_CONFIG(config.parallel.mesh.pp == 1, "parallel.pp",
                         "elastic nodes whose local group is a pipeline come with the whole-mesh elastic work "
                         "(issue 19); an elastic run needs parallel.pp = 1 (got " << config.parallel.mesh.pp << ")");
    TESSERA_CHECK_CONFIG(config.parallel.mesh.ep == 1, "parallel.ep",
                         "elastic nodes whose local group is expert-parallel come with the whole-mesh elastic work "
                         "(issue 19); an elastic run needs parallel.ep = 1 (got " << config.parallel.mesh.ep << ")");
  }
  config.parallel.validate(ctx.worldSize(), localUpdates);  // every rank throws the same error before any collective
  auto job = std::make_unique<TrainJob>();
  job->threads = config.train.threads > 0
                     ? config.train.threads
                     : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / ctx.info.localWorldSize);
  setComputeThreads(job->threads);  // ATen and OpenBLAS alike

  job->mesh = std::make_unique<parallel::DeviceMesh>(ctx.world, config.parallel.mesh);  // collective
  job->model = buildModel(config, *job->mesh);
  if (!config.model.init_from.empty()) {
    // Before parallelize(): FSDP empties the parameters, and DDP/FSDP/DiLoCo broadcast rank 0's values.
    try {
      // A pipeline stage loads its tensors of the whole model's file.
      const auto whole = config.model.kind == "gpt" ? models::gptParameterShapes(config.model.gpt)
                                                    : std::map<std::string, std::vector<int64_t>>{};
      checkpoint::loadSafetensorsInto(job->model->module(), config.model.init_from,
                                      config.parallel.mesh.pp > 1 ? &whole : nullptr);
    } catch (const Error& e) {
      throw ConfigError("model.init_from", e.what());
    }
  }
  for (const auto& p : job->model->module().parameters()) job->numParameters += p.numel();  // before FSDP empties them
  // A pipeline stage holds part of the model, and an ep rank (after
  // parallelize()) part of the experts: count, check and restore the whole one.
  if (config.parallel.mesh.pp > 1 || config.parallel.mesh.ep > 1) {
    job->wholeModel = models::gptParameterShapes(config.model.gpt);
    job->numParameters = 0;
    for (const auto& [name, shape] : job->wholeModel) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      job->numParameters += n;
    }
  }
  // Moves the model to ctx.device (train.device) first, then wraps it.
  job->parallel = parallel::parallelize(*job->model, *job->mesh, config.parallel, localUpdates,
                                        config.steppingOptimizer(), ctx.device);  // collective
  job->dp = job->parallel.dp.get();
  job->dpComm = job->parallel.dataComm;
  job->optimizer = makeJobOptimizer(config, *job->dp, *job->mesh, job->parallel, elastic);  // collective for DiLoCo
  job->replica = job->parallel.replica;
  job->replicas = job->parallel.replicas;
  const int dataRank = job->parallel.dataRank;
  const int dataRanks = job->parallel.dataRanks;
  JobData data = elastic ? loadData(config, elastic->node * dataRanks + dataRank, elastic->nodes * dataRanks)
                         : loadData(config, dataRank, dataRanks);
  job->train = std::move(data.train);
  job->val = std::move(data.val);
  if (job->parallel.reportsMetrics && !metricsPath.empty()) {
    job->metrics = std::make_unique<MetricsWriter>(metricsPath, /*append=*/elastic != nullptr);
  }

  TrainerParts& parts = job->parts;
  parts.model = job->model.get();
  parts.dp = job->dp;
  parts.executor = job->parallel.executor.get();
  parts.optimizer = job->optimizer.get();
  parts.schedule = optim::makeLrSchedule(config.schedule, config.train.steps);
  parts.train = job->train.get();
  parts.val = job->val.get();
  parts.dataComm = job->dpComm;
  for (const parallel::NamedComm& c : job->parallel.traffic) parts.traffic.push_back(TrafficSource{c.name, c.comm, {}, {}});
  for (const comm::CommPtr& c : job->optimizer->communicators()) {  // e.g. streaming DiLoCo's private one
    const bool known = std::any_of(parts.traffic.begin(), parts.traffic.end(),
                                   [&](const TrafficSource& t) { return t.comm == c; });
    if (!known) parts.traffic.push_back(TrafficSource{optimizerCommName(*job->mesh, c), c, {}, {}});
  }
  parts.metrics = job->metrics.get();
  parts.reportsProgress = job->parallel.reportsMetrics;
  parts.stageNorm = job->parallel.stageNorm;
  parts.device = job->parallel.device;  // batches are copied there
  if (config.model.kind == "gpt" && config.model.gpt.use_moe && !elastic) {  // after parallelize(): experts split
    job->moeLoad = std::make_unique<parallel::MoeLoadCollector>(
        job->model->module(), config.model.gpt.n_layer, config.model.gpt.moe.num_experts,
        ctx.hostWorld ? ctx.hostWorld : job->mesh->world());  // CPU tables: NCCL's host group
    parts.extraMetrics = job->moeLoad->metricsHook();  // collective over the world at every logged step
  }
  if (elastic && config.optimizer == "diloco") {
    // theta_g is the same on every node at every step (streaming fragments'
    // parameters are not): "outer_hash" lets a run (and the end-to-end
    // tests) check that a joiner and its peers agree. Local, at log steps.
    optim::Optimizer* optimizer = job->optimizer.get();
    parts.extraMetrics = [inner = std::move(parts.extraMetrics), optimizer](MetricsRecord& record) {
      if (inner) inner(record);
      record.add("outer_hash", hashTensors(optimizer->state().perParameter.at("diloco/outer")));
    };
  }
  if (job->parallel.precision.gradientComm == parallel::GradientComm::kFp8) {
    // FP8 gradient communication: the overflow (saturation) rate of the last
    // synced step and since the start, and FP8-LM's mu range under "auto". Local.
    parallel::DataParallel* dp = job->dp;
    const bool autoScaling = job->parallel.precision.fp8AutoScaling;
    parts.extraMetrics = [inner = std::move(parts.extraMetrics), dp, autoScaling](MetricsRecord& record) {
      if (inner) inner(record);
      const parallel::DataParallelStats stats = dp->stats();
      MetricsRecord fp8;
      fp8.add("scaling", autoScaling ? "auto" : "safe");
      fp8.add("saturated_fraction", stats.fp8LastStep.saturatedFraction());
      fp8.add("saturated_fraction_total", stats.fp8Total.saturatedFraction());
      if (autoScaling) fp8.add("mu_min", stats.fp8LastStep.minMu).add("mu_max", stats.fp8LastStep.maxMu);
      record.add("fp8_comm", fp8);
    };
  }
  return job;
}

}  // namespace tessera::launcher
