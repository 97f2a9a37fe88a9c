// tessera-train: runs the training job a TOML file describes.
//
//   tessera-run --nproc-per-node 2 tessera-train --config examples/configs/gpt-tiny.toml
//       [--set section.key=value ...] [--metrics out.jsonl]
//       [--checkpoint-dir DIR --checkpoint-every N [--checkpoint-keep K] [--checkpoint-level L]]
//       [--resume DIR]
//
// Reads and validates the config before any communication (a typo fails at
// once on every rank with the same message), joins the job (tessera::init,
// which resolves train.device -- "cuda" is cuda:LOCAL_RANK -- and makes the
// NCCL world when the backend is nccl), builds mesh -> model (moved to the
// device) -> data-parallel strategy -> optimizer -> data, and hands them to
// tessera::Trainer. The rank that has the loss (rank 0 today)
// writes the metrics file.
//
// Checkpoints: every N steps (after the step's evaluation) and after the last
// step the whole training state (checkpoint/training_state.h) is saved
// asynchronously under DIR; the run waits for the last save before it exits.
// --resume DIR (a checkpoint directory, or a root whose `latest` names one)
// restores parameters, optimizer, data position and RNG after the job is
// built and before training, on any world size or strategy: on the same one
// the continued run's losses equal the uninterrupted run's bit for bit.
// Exit codes: 0 done, 1 a runtime error, 2 a bad command line or config.
#include <CLI/CLI.hpp>

#include <ATen/ATen.h>

#include <cstdio>
#include <csignal>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "launcher/elastic_train.h"
#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/comm/fault.h"
#include "tessera/core/timer.h"
#include "tessera/core/logging.h"
#include "tessera/train/trainer.h"
#include "tessera/launcher/init.h"

namespace tessera::launcher {
namespace {

// The command line's checkpoint options.
struct CheckpointFlags {
  std::string dir;    // "" : no checkpoints
  int64_t every = 0;  // steps between saves; 0: only at the end
  int keep = 3;
  int level = 3;       // zstd level; 0: uncompressed
  std::string resume;  // "" : start fresh
};

// What goes into every checkpoint's meta besides the state itself: the
// config as given, so a checkpoint says what produced it.
std::map<std::string, std::string> describeRun(const TrainJobConfig& job, const std::string& configPath,
                                               const std::vector<std::string>& overrides, int worldSize) {
  std::map<std::string, std::string> meta;
  std::ifstream in(configPath);
  std::ostringstream text;
  text << in.rdbuf();
  meta["config/text"] = text.str();
  std::string joined;
  for (const std::string& o : overrides) joined += o + "\n";
  meta["config/overrides"] = joined;
  meta["parallel/mesh"] = job.parallel.mesh.describe();
  meta["parallel/world_size"] = std::to_string(worldSize);
  meta["config/model_kind"] = job.model.kind;
  return meta;
}

int runJob(const TrainJobConfig& job, DistributedContext ctx, const std::string& metricsPath,
           const CheckpointFlags& flags, const std::map<std::string, std::string>& runMeta, const std::string& faultFlag) {
  // A fault plan ([faults] plan, --fault, TESSERA_FAULT_PLAN) wraps the world
  // (every mesh group is split off it, so its faults reach them all) and
  // drives the step-level kills and slow-downs.
  const comm::FaultPlan plan = runFaultPlan(job, faultFlag);
  if (!plan.empty()) ctx.world = comm::injectFaults(ctx.world, plan, ctx.rank());
  const std::unique_ptr<TrainJob> built = buildTrainJob(job, ctx, metricsPath);  // collective
  if (ctx.rank() == 0) {
    TESSERA_LOG(kInfo) << "training " << job.model.kind << " (" << built->numParameters << " parameters) for "
                       << job.train.steps << " steps: " << job.parallel.strategy << " on "
                       << job.parallel.mesh.describe()
                       << (job.parallel.mesh.tp > 1 && job.parallel.sequence_parallel ? " with sequence parallelism" : "")
                       << (job.parallel.mesh.pp > 1 ? ", pipeline schedule " + job.parallel.pipeline.schedule + " with " +
                                                          std::to_string(job.parallel.pipeline.microBatchesFor(
                                                              job.parallel.mesh.pp)) + " micro-batches"
                                                    : std::string())
                       << ", " << built->threads << " threads per rank"
                       << (built->parts.device.is_cuda() ? " on " + built->parts.device.str() : std::string());
  }
  Trainer trainer(built->parts, job.train);
  comm::StepFaults stepFaults(plan, ctx.rank());
  if (stepFaults.active()) {
    auto stepTimer = std::make_shared<Stopwatch>();
    trainer.callbacks().beforeStep.push_back([&stepFaults, stepTimer](int64_t step) {
      stepFaults.beforeStep(step);
      stepTimer->restart();
    });
    trainer.callbacks().afterStep.push_back(
        [&stepFaults, stepTimer](const StepReport&) { stepFaults.afterStep(stepTimer->seconds()); });
  }
  checkpoint::TrainingParts state;
  state.trainer = &trainer;
  state.model = &built->model->module();
  state.dp = built->dp;
  state.optimizer = built->optimizer.get();
  state.replica = checkpoint::ReplicaInfo{built->replica, built->replicas};
  state.rank = ctx.rank();             // each rank saves and restores its own generator row
  state.worldSize = ctx.worldSize();
  if (!built->wholeModel.empty()) state.wholeModel = &built->wholeModel;  // a pipeline stage

  // The step this run last saved: the final state is saved unless it was
  // just saved (a resumed run with nothing left to train saves the restored
  // state: how a checkpoint is resharded to this world size).
  int64_t lastSaved = -1;
  if (!flags.resume.empty()) {
    // Local, but ranks must agree: an FSDP rank sees only its own pieces, so
    // one rank may find a problem another does not; all stop together.
    std::exception_ptr failure;
    int64_t step = 0;
    try {
      step = checkpoint::restoreTrainingStateFromCheckpoint(state, flags.resume);
    } catch (const std::exception&) {
      failure = std::current_exception();
    }
    at::Tensor failed = at::full({1}, failure ? 1.0f : 0.0f);
    ctx.host()->allReduce(failed, comm::ReduceOp::kMax);  // collective; a CPU flag
    if (failure) std::rethrow_exception(failure);
    if (failed.item<float>() > 0) throw Error("another rank could not restore " + flags.resume + " (see its message)");
    if (ctx.rank() == 0) {
      TESSERA_LOG(kInfo) << "resumed from " << checkpoint::resolveCheckpoint(flags.resume) << " at step " << step;
    }
  }

  std::unique_ptr<checkpoint::Checkpointer> checkpointer;
  if (!flags.dir.empty()) {
    checkpoint::CheckpointOptions options;
    options.dir = flags.dir;
    options.keep = flags.keep;
    options.zstdLevel = flags.level;
    // Its agreements exchange CPU tensors: the host world (checkpoint/ copies device tensors to the host).
    checkpointer = std::make_unique<checkpoint::Checkpointer>(options, ctx.host());  // collective
    if (flags.every > 0) {
      trainer.callbacks().afterStep.push_back([&](const StepReport& report) {
        if (report.step % flags.every != 0) return;
        checkpointer->save(report.step, checkpoint::collectTrainingState(state, runMeta));  // collective
        lastSaved = report.step;
      });
    }
  }

  const StepReport last = trainer.run();  // collective
  if (checkpointer) {
    const int64_t finalStep = trainer.step();
    if (lastSaved != finalStep) checkpointer->save(finalStep, checkpoint::collectTrainingState(state, runMeta));
    checkpointer->wait();  // collective; throws the save's error
    if (ctx.rank() == 0) {
      TESSERA_LOG(kInfo) << "checkpoint " << checkpointer->lastCommitted();
    }
  }
  if (ctx.rank() == 0 && last.step == 0) {
    TESSERA_LOG(kInfo) << "done: nothing left to train (train.steps = " << job.train.steps << ")";
  } else if (ctx.rank() == 0) {
    TESSERA_LOG(kInfo) << "done: " << last.step << " steps in " << last.timeSeconds << " s, loss " << last.loss
                       << ", val_loss " << (last.valLoss ? std::to_string(*last.valLoss) : std::string("-"));
  }
  ctx.world->barrier();  // rank 0 may host the store: keep it until every rank is done
  return 0;
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  // A peer that died (or a healed partition resetting old connections) must
  // surface as an error on that socket, not kill this process: Gloo writes
  // without MSG_NOSIGNAL.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"tessera-train: run the training job a TOML config describes"};
  std::string configPath;
  std::vector<std::string> overrides;
  std::string metricsPath;
  app.add_option("--config", configPath, "TOML file with [model] [data] [optim] [train] [parallel]")->required();
  app.add_option("--set", overrides, "override one key: section.key=value (repeatable)");
  app.add_option("--metrics", metricsPath, "write JSON-lines metrics here (rank 0; \"-\" for stdout)");
  tessera::launcher::CheckpointFlags flags;
  auto* dirOption = app.add_option("--checkpoint-dir", flags.dir, "save checkpoints under this directory");
  app.add_option("--checkpoint-every", flags.every, "save every N steps (and always after the last step)")
      ->check(CLI::NonNegativeNumber)
      ->needs(dirOption);
  app.add_option("--checkpoint-keep", flags.keep, "complete checkpoints kept (default 3)")
      ->check(CLI::PositiveNumber)
      ->needs(dirOption);
  app.add_option("--checkpoint-level", flags.level, "zstd level 1..19; 0 stores uncompressed (default 3)")
      ->check(CLI::Range(0, 19))
      ->needs(dirOption);
  app.add_option("--resume", flags.resume, "restore a checkpoint (its directory, or a root with `latest`) first");
  std::string faultPlan;
  app.add_option("--fault", faultPlan,
                 "inject faults (comm/fault.h), e.g. \"kill:rank=1,step=30;slow:rank=0,factor=2\"");
  CLI11_PARSE(app, argc, argv);

  tessera::launcher::TrainJobConfig job;
  try {
    job = tessera::launcher::loadTrainJobConfig(configPath, overrides);
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 2;
  }
  const char* elastic = std::getenv("TESSERA_ELASTIC");
  if (elastic != nullptr && std::string(elastic) == "1") {
    if (job.train.device != "cpu") {
      const tessera::ConfigError e("train.device", "is \"" + job.train.device +
                                                       "\", but elastic runs (tessera-run --nnodes MIN:MAX) form Gloo "
                                                       "groups of CPU tensors: set train.device = \"cpu\"");
      std::fprintf(stderr, "tessera-train: %s\n", e.what());
      return 2;
    }
    // Elastic checkpoints: the leader node saves at outer-step boundaries;
    // founders resume from the latest in the directory (elastic_train.h).
    tessera::launcher::ElasticCheckpoints checkpoints;
    checkpoints.dir = flags.dir;
    checkpoints.every = flags.every;
    checkpoints.keep = flags.keep;
    checkpoints.level = flags.level;
    checkpoints.resume = flags.resume;
    if (!flags.dir.empty()) checkpoints.meta = tessera::launcher::describeRun(job, configPath, overrides, 0);
    return tessera::launcher::runElasticNode(job, metricsPath, faultPlan, checkpoints);
  }
  try {
    tessera::InitOptions options;
    options.backend = job.parallel.backend;
    options.device = job.train.device;  // "cuda": this process's LOCAL_RANK-th GPU
    options.backendKey = "parallel.backend";
    options.deviceKey = "train.device";
    const tessera::DistributedContext ctx = tessera::init(options);
    return tessera::launcher::runJob(job, ctx, metricsPath, flags,
                                     tessera::launcher::describeRun(job, configPath, overrides, ctx.worldSize()),
                                     faultPlan);
  } catch (const tessera::ConfigError& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-train: %s\n", e.what());
    return 1;
  }
}
