// Placeholder: the checkpoint benchmark is being written.
#include "bench/bench_command.h"
#include "tessera/core/error.h"

namespace tessera::bench {

std::unique_ptr<BenchCommand> addCheckpointCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("checkpoint", "not built yet");
  command->distributed = false;
  command->run = [](DistributedContext*) { throw NotSupported("tessera-bench checkpoint: not built yet"); };
  return command;
}

}  // namespace tessera::bench
