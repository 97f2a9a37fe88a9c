// How tessera-bench's subcommands plug in: each benchmark file defines one
// `add...Command(CLI::App&)` that registers its flags on a subcommand and
// returns what to run; tessera_bench.cc lists them and handles launching.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "tessera/launcher/init.h"

namespace tessera::bench {

struct BenchCommand {
  CLI::App* app = nullptr;        // the subcommand
  int ranks = 0;                  // --ranks: > 1 without a launcher starts itself under tessera-run
  std::string backend = "gloo";   // --backend handed to tessera::init and tessera-run
  // false: runs in this process alone, without tessera::init (run gets null),
  // e.g. single-process kernels or benchmarks that start their own processes.
  bool distributed = true;
  std::function<void()> validate;                    // after parsing; throws InvalidArgument
  std::function<void(DistributedContext* ctx)> run;  // collective over ctx->world when distributed
};

// Adds --ranks and --backend (gloo|mpi) to `command`'s subcommand.
void addLaunchOptions(BenchCommand& command);
// "64MiB", "1M", "4096", "1.5GiB" -> bytes; throws InvalidArgument.
int64_t parseBytes(const std::string& text);

std::unique_ptr<BenchCommand> addAllreduceCommand(CLI::App& app);    // allreduce_bench.cc
std::unique_ptr<BenchCommand> addTrainCommand(CLI::App& app);        // train_bench.cc
std::unique_ptr<BenchCommand> addQuantizeCommand(CLI::App& app);     // quantize_bench.cc
std::unique_ptr<BenchCommand> addCheckpointCommand(CLI::App& app);   // checkpoint_bench.cc
std::unique_ptr<BenchCommand> addConvergenceCommand(CLI::App& app);  // convergence_bench.cc
std::unique_ptr<BenchCommand> addPipelineScheduleCommand(CLI::App& app);  // pipeline_schedule_bench.cc
std::unique_ptr<BenchCommand> addPipelineCommand(CLI::App& app);          // pipeline_bench.cc

}  // namespace tessera::bench
