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

#include <cstdio>
#include <memory>

#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "tessera/core/logging.h"
#include "tessera/core/training/trainer.h"
#include "tessera/launcher/init.h"

namespace tessera::launcher {
namespace {

int runJob(const TrainJobConfig& job, const DistributedContext& ctx, const std::string& metricsPath) {
  const std::unique_ptr<TrainJob> built = buildTrainJob(job, ctx, metricsPath);  // collective
  if (ctx.rank() == 0) {
    TESSERA_LOG(kInfo) << "training " << job.model.kind << " (" << built->numParameters << " parameters) for "
                       << job.train.steps << " steps: " << job.parallel.strategy << " on "
                       << job.parallel.mesh.describe() << ", " << built->threads << " threads per rank";
  }
  Trainer trainer(built->parts, job.train);
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
