// tessera-train: runs the training job a TOML file describes.
//
//   tessera-run --nproc-per-node 2 tessera-train --config examples/configs/gpt-tiny.toml
//       [--set section.key=value ...] [--metrics out.jsonl]
//
// Reads and validates the config before any communication (a typo fails at
// once on every rank with the same message), joins the job (tessera::init),
// builds mesh -> model -> data-parallel strategy -> optimizer -> data, and
// hands them to tessera::Trainer. Rank 0 writes the metrics file.
// Exit codes: 0 done, 1 a runtime error, 2 a bad command line or config.
#include <CLI/CLI.hpp>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <thread>

#include "launcher/train_config.h"
#include "tessera/core/data/byte_corpus.h"
#include "tessera/core/data/fashion_mnist.h"
#include "tessera/core/logging.h"
#include "tessera/core/training/trainer.h"
#include "tessera/launcher/init.h"
#include "tessera/optim/lr_schedule.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/device_mesh.h"
// FSDP landed alongside this tool; the guard keeps tessera-train building
// (rejecting fsdp/hybrid) in a tree without it.
#if __has_include("tessera/parallel/fsdp.h")
#include "tessera/parallel/fsdp.h"
#define TESSERA_TRAIN_HAS_FSDP 1
#else
#define TESSERA_TRAIN_HAS_FSDP 0
#endif

namespace tessera::launcher {
namespace {

// The data-parallel strategy [parallel] names, over the mesh's dp axes.
std::unique_ptr<parallel::DataParallel> makeDataParallel(const ParallelSection& p, torch::nn::Module& module,
                                                         const parallel::DeviceMesh& mesh) {
  using parallel::MeshAxis;
  if (p.strategy == "none") return parallel::makeNoDataParallel(module);
  if (p.strategy == "ddp") {
    parallel::DdpConfig ddp;
    ddp.bucketCapBytes = static_cast<int64_t>(p.bucket_mb * 1024 * 1024);
    return parallel::makeDdpDataParallel(module, mesh.comm(MeshAxis::kDpReplicate), ddp);
  }
  // fsdp / hybrid: every GPT block is an FSDP unit.
  auto* gpt = dynamic_cast<models::GptImpl*>(&module);
  TESSERA_CHECK_CONFIG(gpt != nullptr, "parallel.strategy",
                       "\"" << p.strategy << "\" shards GPT blocks; model.kind = \"mlp\" supports none, ddp");
#if TESSERA_TRAIN_HAS_FSDP
  return parallel::makeFsdpDataParallel(*gpt, mesh.comm(MeshAxis::kDpShard),
                                        p.strategy == "hybrid" ? mesh.comm(MeshAxis::kDpReplicate) : nullptr);
#else
  throw NotSupported("parallel.strategy = \"" + p.strategy + "\" is not built yet (no parallel/fsdp.h); use ddp or none");
#endif
}

// The group gradients are averaged over (reported losses too, and the
// sampler's shards): null for one replica. Collective for hybrid (flattens).
comm::CommPtr dataParallelComm(const ParallelSection& p, parallel::DeviceMesh& mesh) {
  using parallel::MeshAxis;
  if (p.strategy == "ddp") return mesh.comm(MeshAxis::kDpReplicate);
  if (p.strategy == "fsdp") return mesh.comm(MeshAxis::kDpShard);
  if (p.strategy == "hybrid") return mesh.flatten({MeshAxis::kDpReplicate, MeshAxis::kDpShard}, "dp");
  return nullptr;
}

// The communicators whose bytes comm_bytes counts.
std::vector<comm::CommPtr> trafficComms(const ParallelSection& p, const parallel::DeviceMesh& mesh) {
  using parallel::MeshAxis;
  if (p.strategy == "ddp") return {mesh.comm(MeshAxis::kDpReplicate)};
  if (p.strategy == "fsdp") return {mesh.comm(MeshAxis::kDpShard)};
  if (p.strategy == "hybrid") return {mesh.comm(MeshAxis::kDpShard), mesh.comm(MeshAxis::kDpReplicate), mesh.comm("dp")};
  return {};
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

std::unique_ptr<TrainableModel> buildModel(const TrainJobConfig& job) {
  if (job.model.kind == "gpt") return makeTrainable(models::Gpt(job.model.gpt));
  return makeTrainable(models::MlpClassifier(job.model.mlp));
}

int runJob(const TrainJobConfig& job, const DistributedContext& ctx, const std::string& metricsPath) {
  job.parallel.validate(ctx.worldSize());  // every rank throws the same error before any collective
  const int threads = job.train.threads > 0
                          ? job.train.threads
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / ctx.info.localWorldSize);
  at::set_num_threads(threads);

  parallel::DeviceMesh mesh(ctx.world, job.parallel.mesh);  // collective
  const comm::CommPtr dpComm = dataParallelComm(job.parallel, mesh);  // collective for hybrid
  std::unique_ptr<TrainableModel> model = buildModel(job);
  int64_t numParameters = 0;  // counted before FSDP empties the module's parameters
  for (const auto& p : model->module().parameters()) numParameters += p.numel();
  std::unique_ptr<parallel::DataParallel> dp = makeDataParallel(job.parallel, model->module(), mesh);  // collective
  std::unique_ptr<optim::Optimizer> optimizer = optim::makeOptimizer(job.optim, dp->optimizerParameters(), job.schedule.lr);
  JobData data = loadData(job, dpComm ? dpComm->rank() : 0, dpComm ? dpComm->size() : 1);
  std::unique_ptr<MetricsWriter> metrics;
  if (ctx.rank() == 0 && !metricsPath.empty()) metrics = std::make_unique<MetricsWriter>(metricsPath);

  if (ctx.rank() == 0) {
    TESSERA_LOG(kInfo) << "training " << job.model.kind << " (" << numParameters << " parameters) for "
                       << job.train.steps << " steps: " << job.parallel.strategy << " on "
                       << job.parallel.mesh.describe() << ", " << threads << " threads per rank";
  }
  TrainerParts parts;
  parts.model = model.get();
  parts.dp = dp.get();
  parts.optimizer = optimizer.get();
  parts.schedule = optim::makeLrSchedule(job.schedule, job.train.steps);
  parts.train = data.train.get();
  parts.val = data.val.get();
  parts.dpComm = dpComm;
  parts.trafficComms = trafficComms(job.parallel, mesh);
  parts.metrics = metrics.get();
  parts.isRank0 = ctx.rank() == 0;
  Trainer trainer(std::move(parts), job.train);
  const StepReport last = trainer.run();  // collective
  if (ctx.rank() == 0) {
    TESSERA_LOG(kInfo) << "done: " << last.step << " steps in " << last.timeSeconds << " s, loss " << last.loss
                       << ", val_loss " << (last.valLoss ? std::to_string(*last.valLoss) : std::string("-"));
  }
  ctx.world->barrier();  // rank 0 may host the store: keep it until every rank is done
  return 0;
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  CLI::App app{"tessera-train: run the training job a TOML config describes"};
  std::string configPath;
  std::vector<std::string> overrides;
  std::string metricsPath;
  app.add_option("--config", configPath, "TOML file with [model] [data] [optim] [train] [parallel]")->required();
  app.add_option("--set", overrides, "override one key: section.key=value (repeatable)");
  app.add_option("--metrics", metricsPath, "write JSON-lines metrics here (rank 0; \"-\" for stdout)");
  CLI11_PARSE(app, argc, argv);

  tessera::launcher::TrainJobConfig job;
  try {
    job = tessera::launcher::loadTrainJobConfig(configPath, overrides);
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 2;
  }
  try {
    tessera::InitOptions options;
    options.backend = job.parallel.backend;
    const tessera::DistributedContext ctx = tessera::init(options);
    return tessera::launcher::runJob(job, ctx, metricsPath);
  } catch (const tessera::ConfigError& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 1;
  }
}
