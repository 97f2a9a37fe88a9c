// `tessera-bench pipeline`: the pipeline schedules measured on real stage
// processes, side by side in one run, each beside what the simulator
// predicts from the costs measured in that same run.
//
// For each micro-batch count M and schedule S, the tessera-train config runs
// with pipeline.schedule = S, pipeline.microbatches = M for one untimed
// warm-up step (plus the profiling steps of `auto`), then `--steps` timed
// steps. Reported per run: step time and tokens/s; the mean F, B and W time
// per micro-batch through a stage (the executor's own timestamps, max over
// the stages) and the one-way time of an activation (a ping-pong); the
// measured bubble
// 1 - M (F + B + W) / makespan, the mean over the timed steps (makespan: first compute
// start to last compute end over every stage, one clock for all processes of
// this machine); the bubble and makespan the simulator predicts for S from
// those costs, and the measured makespan over the predicted one;
// and peak resident activation bytes per stage when offload is on. With
// --png-dir, the last step's measured timeline per run (bench/pipeline_timeline.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>

#include "bench/bench_command.h"
#include "bench/pipeline_timeline.h"
#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "tessera/core/config.h"
#include "tessera/core/metrics.h"
#include "tessera/parallel/pipeline/executor.h"

namespace tessera::bench {
namespace {

struct PipelineBenchConfig {
  std::string configPath;
  std::vector<std::string> overrides;
  std::vector<std::string> schedules = {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_h2", "zb_v", "auto"};
  std::vector<int> microBatches = {4, 8};
  std::vector<std::string> offloads = {"none"};
  int64_t steps = 5;
  std::string pngDir;
};

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// Every rank's rows of `values` ([n, width] doubles), concatenated in rank order on every rank.
at::Tensor gatherRows(comm::Communicator& world, const at::Tensor& values, int64_t width) {
  at::Tensor count = at::full({1}, values.size(0), at::kLong);
  at::Tensor counts = at::empty({world.size()}, at::kLong);
  world.allGather(count, counts);
  std::vector<int64_t> sizes;
  int64_t total = 0;
  for (int r = 0; r < world.size(); ++r) {
    sizes.push_back(counts[r].item<int64_t>() * width);
    total += sizes.back();
  }
  at::Tensor all = at::empty({total}, at::kDouble);
  world.allGather(values.reshape({-1}).contiguous(), all, sizes);
  return all.view({-1, width});
}

double secondsSinceEpoch(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

// Every rank's compute actions of the executor's last step, on one clock:
// rows (rank, kind, micro-batch, chunk, start, end), concatenated in rank
// order on every rank. Collective over `world`.
at::Tensor gatherTimeline(comm::Communicator& world, const parallel::pipeline::PipelineExecutor& executor) {
  const auto& timeline = executor.timeline();
  const double origin = secondsSinceEpoch(executor.timelineOrigin());
  at::Tensor rows = at::empty({static_cast<int64_t>(timeline.size()), 6}, at::kDouble);
  for (size_t i = 0; i < timeline.size(); ++i) {
    const auto& t = timeline[i];
    rows[static_cast<int64_t>(i)].copy_(at::tensor({static_cast<double>(world.rank()),
                                                    static_cast<double>(static_cast<int>(t.action.kind)),
                                                    static_cast<double>(t.action.microBatch),
                                                    static_cast<double>(t.action.chunk), origin + t.start,
                                                    origin + t.end},
                                                   at::kDouble));
  }
  return gatherRows(world, rows, 6);
}

// First compute start to last compute end over every stage.
double makespanOf(const at::Tensor& rows) {
  if (rows.size(0) == 0) return 0;
  return rows.select(1, 5).max().item<double>() - rows.select(1, 4).min().item<double>();
}

MetricsRecord runOne(DistributedContext& ctx, const PipelineBenchConfig& config, const std::string& schedule, int M,
                     const std::string& offload) {
  std::vector<std::string> overrides = config.overrides;
  const int64_t warmup = schedule == "auto" ? 3 : 1;  // auto: one warm-up, then the profiling steps
  for (const std::string& o : std::vector<std::string>{"pipeline.schedule=\"" + schedule + "\"", "pipeline.microbatches=" + std::to_string(M),
        "pipeline.auto_profile_steps=2", "train.steps=" + std::to_string(config.steps + warmup),
        std::string("train.eval_batches=0"), std::string("train.progress=false"),
        "pipeline.offload=\"" + offload + "\"", std::string("pipeline.measure_activations=true")}) {
    overrides.push_back(o);
  }
  const launcher::TrainJobConfig job = launcher::loadTrainJobConfig(config.configPath, overrides);
  auto built = launcher::buildTrainJob(job, ctx, "");  // collective
  auto* executor = dynamic_cast<parallel::pipeline::PipelineExecutor*>(built->parallel.executor.get());
  TESSERA_CHECK_CONFIG(executor != nullptr, "parallel.pp", "tessera-bench pipeline needs parallel.pp > 1 in the config");
  comm::Communicator& world = *ctx.world;

  Trainer trainer(built->parts, job.train);
  double timedFrom = 0;
  int64_t tokensFrom = 0;
  double makespanSum = 0;  // over the timed steps
  trainer.callbacks().afterStep.push_back([&](const StepReport& r) {
    if (r.step > warmup) makespanSum += makespanOf(gatherTimeline(world, *executor));  // collective
    if (r.step != warmup) return;
    timedFrom = r.timeSeconds;
    tokensFrom = r.tokens;
    executor->resetMeasurements();
  });
  world.barrier();
  const StepReport last = trainer.run();  // collective
  const double stepSeconds = (last.timeSeconds - timedFrom) / static_cast<double>(config.steps);

  // Costs: max over the stages (the slowest stage paces the pipeline); comm: a ping-pong of one activation.
  executor->measureTransfer();  // collective over pp
  const parallel::pipeline::PipelineCosts mine = executor->measuredCosts();
  at::Tensor costs = at::tensor({mine.f, mine.b, mine.w, mine.comm}, at::kDouble);
  world.allReduce(costs, comm::ReduceOp::kMax);
  parallel::pipeline::PipelineCosts measured;
  measured.f = costs[0].item<double>();
  measured.b = costs[1].item<double>();
  measured.w = costs[2].item<double>();
  measured.comm = costs[3].item<double>();

  // The last step's timeline of every stage on one clock.
  const at::Tensor all = gatherTimeline(world, *executor);
  const double begin = all.size(0) > 0 ? all.select(1, 4).min().item<double>() : 0;
  const double makespan = makespanSum / static_cast<double>(config.steps);  // mean over the timed steps
  const double work = M * (measured.f + measured.b + measured.w);
  const double bubble = makespan > 0 ? 1.0 - work / makespan : 0;
  const parallel::pipeline::Simulation predicted = parallel::pipeline::simulate(executor->schedule(), measured);

  // Peak resident saved-activation bytes of the last step, per rank.
  at::Tensor peak = at::full({1}, static_cast<double>(executor->peakActivationBytes()), at::kDouble);
  at::Tensor peaks = at::empty({world.size()}, at::kDouble);
  world.allGather(peak, peaks);
  MetricsRecord peakBytes;  // {"<rank>": bytes}
  for (int r = 0; r < world.size(); ++r) {
    peakBytes.add(std::to_string(r), static_cast<int64_t>(peaks[r].item<double>()));
  }

  MetricsRecord record;
  record.add("schedule", schedule)
      .add("offload", offload)
      .add("activation_peak_bytes", peakBytes)
      .add("ran", executor->schedule().name)
      .add("microbatches", M)
      .add("step_s", stepSeconds)
      .add("tokens_per_s", static_cast<double>(last.tokens - tokensFrom) / (stepSeconds * config.steps))
      .add("f_ms", measured.f * 1e3)
      .add("b_ms", measured.b * 1e3)
      .add("w_ms", measured.w * 1e3)
      .add("comm_ms", measured.comm * 1e3)
      .add("makespan_s", makespan)
      .add("bubble", bubble)
      .add("predicted_bubble", predicted.bubbleRate)
      .add("predicted_makespan_s", predicted.makespan)
      .add("makespan_over_predicted", predicted.makespan > 0 ? makespan / predicted.makespan : 0.0);
  if (world.rank() == 0 && !config.pngDir.empty()) {
    std::vector<TimelineBlock> blocks;
    for (int64_t i = 0; i < all.size(0); ++i) {
      const auto kind = static_cast<parallel::pipeline::ActionKind>(static_cast<int>(all[i][1].item<double>()));
      const char letter = kind == parallel::pipeline::ActionKind::kForward         ? 'F'
                          : kind == parallel::pipeline::ActionKind::kBackwardWeight ? 'W'
                          : kind == parallel::pipeline::ActionKind::kBackward       ? 'X'
                                                                                    : 'B';
      blocks.push_back(TimelineBlock{static_cast<int>(all[i][0].item<double>()), letter,
                                     static_cast<int>(all[i][2].item<double>()),
                                     static_cast<int>(all[i][3].item<double>()), all[i][4].item<double>() - begin,
                                     all[i][5].item<double>() - begin});
    }
    const std::string png = config.pngDir + "/pipeline-" + schedule + "-m" + std::to_string(M) +
                            (offload == "none" ? "" : "-offload-" + offload) + ".png";
    writeTimelinePng(blocks, "measured " + schedule + ", " + std::to_string(M) + " micro-batches", png);
    record.add("png", png);
  }
  return record;
}

}  // namespace

std::unique_ptr<BenchCommand> addPipelineCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand(
      "pipeline", "pipeline schedules on real stages: step time, F/B/W, measured vs simulated bubble, timelines");
  addLaunchOptions(*command);
  auto config = std::make_shared<PipelineBenchConfig>();
  auto schedules = std::make_shared<std::string>("gpipe,1f1b,interleaved_1f1b,zb_h1,zb_h2,zb_v,auto");
  auto microBatches = std::make_shared<std::string>("4,8");
  auto offloads = std::make_shared<std::string>("none");
  command->app->add_option("--config", config->configPath, "tessera-train TOML file with parallel.pp > 1")->required();
  command->app->add_option("--set", config->overrides, "override one key: section.key=value (repeatable)");
  command->app->add_option("--schedules", *schedules, "comma-separated schedule names");
  command->app->add_option("--microbatches", *microBatches, "comma-separated micro-batch counts");
  command->app->add_option("--offload", *offloads, "comma-separated pipeline.offload values (none, all, selective)");
  command->app->add_option("--steps", config->steps, "timed steps per run")->check(CLI::PositiveNumber);
  command->app->add_option("--png-dir", config->pngDir, "write each run's measured timeline here");
  command->validate = [config, schedules, microBatches, offloads] {
    config->schedules = split(*schedules);
    config->offloads = split(*offloads);
    config->microBatches.clear();
    for (const std::string& m : split(*microBatches)) config->microBatches.push_back(std::stoi(m));
    TESSERA_CHECK_CONFIG(!config->schedules.empty(), "schedules", "give at least one schedule");
    TESSERA_CHECK_CONFIG(!config->microBatches.empty(), "microbatches", "give at least one micro-batch count");
  };
  command->run = [config](DistributedContext* ctx) {
    std::vector<MetricsRecord> runs;
    for (int M : config->microBatches) {
      for (const std::string& s : config->schedules) {
        for (const std::string& o : config->offloads) runs.push_back(runOne(*ctx, *config, s, M, o));
      }
    }
    if (ctx->world->rank() != 0) return;
    std::printf("{\"bench\": \"pipeline\", \"config\": \"%s\", \"ranks\": %d, \"runs\": [", config->configPath.c_str(),
                ctx->world->size());
    for (size_t i = 0; i < runs.size(); ++i) std::printf("%s%s", i ? ", " : "", runs[i].toJson().c_str());
    std::printf("]}\n");
    std::fflush(stdout);
  };
  return command;
}

}  // namespace tessera::bench
