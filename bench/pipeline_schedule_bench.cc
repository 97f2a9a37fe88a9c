// tessera-bench pipeline-schedule: a pipeline schedule timed by the simulator
// from per-pass costs, in this process alone (no ranks, no tensors).
//
//   tessera-bench pipeline-schedule --schedule zb_v --stages 4 --microbatches 8
//       --cost-f 1 --cost-b 1.5 --cost-w 0.8 --cost-comm 0.05 --png zb_v.png
//
// Prints one JSON object: schedule, stages, microbatches, virtual_stages,
// makespan (the longest rank's time from its first compute action to its
// last), bubble_rate (1 - M (F+B+W) / makespan), peak_memory (per rank, in
// the units of --mem-*: F adds MF, B adds MB, W adds MW), valid (true). The
// costs are those of a whole stage (schedule.h). A schedule the validator
// rejects (e.g. over --mem-limit) prints every problem and exits non-zero.
// With --png, a timeline like the Zero Bubble paper's figures.
#include <cstdio>
#include <sstream>

#include "bench/bench_command.h"
#include "bench/pipeline_timeline.h"
#include "tessera/core/error.h"
#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::bench {
namespace {

namespace pp = parallel::pipeline;

struct PipelineScheduleBenchConfig {
  std::string schedule = "1f1b";
  int stages = 4;
  int microBatches = 8;
  int virtualStages = 2;  // interleaved_1f1b only
  pp::PipelineCosts costs;
  std::string png;  // empty: no picture
};

char blockKind(pp::ActionKind kind) {
  switch (kind) {
    case pp::ActionKind::kForward: return 'F';
    case pp::ActionKind::kBackwardInput: return 'B';
    case pp::ActionKind::kBackwardWeight: return 'W';
    default: return 'X';
  }
}

void runPipelineScheduleBench(const PipelineScheduleBenchConfig& config) {
  const pp::PipelineSchedule schedule = pp::withCommunication(
      pp::makeSchedule(config.schedule, config.stages, config.microBatches, config.virtualStages, config.costs));
  const auto problems = pp::validateSchedule(schedule, config.costs);
  if (!problems.empty()) {
    std::string all;
    for (const auto& p : problems) all += "\n  " + p;
    throw Error("schedule '" + config.schedule + "' is not valid under these costs (" +
                std::to_string(problems.size()) + " problems):" + all);
  }
  const pp::Simulation sim = pp::simulate(schedule, config.costs);
  std::ostringstream memory;
  for (size_t r = 0; r < sim.peakMemory.size(); ++r) memory << (r ? ", " : "") << sim.peakMemory[r];
  std::printf(
      "{\"bench\": \"pipeline-schedule\", \"schedule\": \"%s\", \"stages\": %d, \"microbatches\": %d, "
      "\"virtual_stages\": %d, \"cost_f\": %g, \"cost_b\": %g, \"cost_w\": %g, \"cost_comm\": %g, \"makespan\": %.6g, "
      "\"bubble_rate\": %.6f, \"peak_memory\": [%s], \"mem_limit\": %g, \"valid\": true}\n",
      config.schedule.c_str(), schedule.stages, schedule.microBatches, schedule.chunksPerRank, config.costs.f,
      config.costs.b, config.costs.w, config.costs.comm, sim.makespan, sim.bubbleRate, memory.str().c_str(),
      config.costs.memLimit);
  std::fflush(stdout);
  if (config.png.empty()) return;
  std::vector<TimelineBlock> blocks;
  for (const auto& a : sim.timeline) {
    if (!pp::isComputeKind(a.action.kind)) continue;
    blocks.push_back(TimelineBlock{a.rank, blockKind(a.action.kind), a.action.microBatch, a.action.chunk, a.start, a.end});
  }
  std::ostringstream title;
  title << config.schedule << ": p=" << config.stages << ", M=" << config.microBatches << ", F/B/W/comm = "
        << config.costs.f << "/" << config.costs.b << "/" << config.costs.w << "/" << config.costs.comm
        << ", bubble " << sim.bubbleRate;
  writeTimelinePng(blocks, title.str(), config.png);
}

}  // namespace

std::unique_ptr<BenchCommand> addPipelineScheduleCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("pipeline-schedule", "simulate a pipeline schedule from per-pass costs");
  command->distributed = false;
  auto config = std::make_shared<PipelineScheduleBenchConfig>();
  CLI::App* a = command->app;
  a->add_option("--schedule", config->schedule, "gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zb_v or auto");
  a->add_option("--stages", config->stages, "pipeline stages p")->check(CLI::PositiveNumber);
  a->add_option("--microbatches", config->microBatches, "micro-batches M per pipeline step")->check(CLI::PositiveNumber);
  a->add_option("--virtual-stages", config->virtualStages, "chunks per rank for interleaved_1f1b");
  a->add_option("--cost-f", config->costs.f, "time of F through a whole stage");
  a->add_option("--cost-b", config->costs.b, "time of B (input gradient)");
  a->add_option("--cost-w", config->costs.w, "time of W (weight gradient)");
  a->add_option("--cost-comm", config->costs.comm, "time of one transfer between ranks");
  a->add_option("--mem-f", config->costs.memF, "memory F adds (default 1)");
  a->add_option("--mem-b", config->costs.memB, "memory B adds (default 0)");
  a->add_option("--mem-w", config->costs.memW, "memory W adds (default -1: W frees what F saved)");
  a->add_option("--mem-limit", config->costs.memLimit, "bound on each rank's running memory; 0: none");
  a->add_option("--png", config->png, "write a timeline picture (needs gnuplot)");
  command->validate = [config] {
    const auto& c = config->costs;
    TESSERA_CHECK_ARG(c.f >= 0 && c.b >= 0 && c.w >= 0 && c.comm >= 0,
                      "--cost-f/-b/-w/-comm must be >= 0, got " << c.f << "/" << c.b << "/" << c.w << "/" << c.comm);
    TESSERA_CHECK_ARG(c.f + c.b + c.w > 0, "give a positive --cost-f, --cost-b or --cost-w");
  };
  command->run = [config](DistributedContext*) { runPipelineScheduleBench(*config); };
  return command;
}

}  // namespace tessera::bench
