// tessera-bench: performance measurements printed as JSON lines, each against
// the raw backend in the same run.
//
//   tessera-bench allreduce --backend gloo --ranks 4 --bytes 1MiB,64MiB
//   tessera-bench allreduce --compression int8 --link 100mbit
//   tessera-bench train --config examples/configs/gpt-tiny.toml --ranks 2
//   tessera-bench quantize | checkpoint | convergence   (see each file)
//
// Run it under tessera-run or mpirun, or alone: with --ranks N > 1 and no
// launcher around it, it starts itself under tessera-run with N workers.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <regex>
#include <vector>

#include "bench/bench_command.h"
#include "tessera/core/error.h"

namespace tessera::bench {

// "64MiB", "1M", "4096", "1.5GiB" -> bytes.
int64_t parseBytes(const std::string& text) {
  static const std::regex pattern(R"(^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B?|B)?\s*$)", std::regex::icase);
  std::smatch m;
  if (!std::regex_match(text, m, pattern)) {
    throw InvalidArgument("cannot read '" + text + "' as a size: use e.g. 4096, 1MiB, 64MiB, 1GiB");
  }
  double value = std::stod(m[1]);
  const std::string unit = m[2];
  if (!unit.empty()) {
    const char c = static_cast<char>(std::toupper(unit[0]));
    value *= c == 'K' ? 1024.0 : c == 'M' ? 1024.0 * 1024 : c == 'G' ? 1024.0 * 1024 * 1024 : 1.0;
  }
  return static_cast<int64_t>(value);
}

void addLaunchOptions(BenchCommand& command) {
  command.app->add_option("--ranks", command.ranks, "number of ranks; without a launcher, starts itself under tessera-run")
      ->check(CLI::PositiveNumber);
  command.app->add_option("--backend", command.backend, "gloo or mpi")->check(CLI::IsMember({"gloo", "mpi"}));
}

namespace {


bool launchedByAnything() {
  for (const char* var : {"RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMI_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

std::string findTesseraRun() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n > 0) {
    buf[n] = '\0';
    std::string dir(buf);
    dir = dir.substr(0, dir.rfind('/'));
    if (access((dir + "/tessera-run").c_str(), X_OK) == 0) return dir + "/tessera-run";
  }
  if (access(TESSERA_RUN_BUILD_PATH, X_OK) == 0) return TESSERA_RUN_BUILD_PATH;
  return "tessera-run";  // from PATH
}

// Replaces this process with `tessera-run --nproc-per-node N <this program> <args>`.
[[noreturn]] void relaunchUnderTesseraRun(int ranks, const std::string& backend, int argc, char** argv) {
  std::vector<std::string> args = {findTesseraRun(), "--nproc-per-node", std::to_string(ranks), "--master-port",
                                   "0", "--backend", backend, "/proc/self/exe"};
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = '\0';
    args.back() = self;
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  std::fprintf(stderr, "tessera-bench: starting %d ranks with %s\n", ranks, args[0].c_str());
  execvp(cargs[0], cargs.data());
  std::fprintf(stderr, "tessera-bench: cannot run %s: %s (put tessera-run on PATH)\n", args[0].c_str(),
               std::strerror(errno));
  std::exit(2);
}

int run(int argc, char** argv) {
  CLI::App app{"tessera-bench: performance measurements as JSON lines, against the raw backend in the same run"};
  app.require_subcommand(1);
  std::vector<std::unique_ptr<BenchCommand>> commands;
  for (auto add : {addAllreduceCommand, addTrainCommand, addQuantizeCommand, addCheckpointCommand,
                   addConvergenceCommand, addPipelineScheduleCommand, addPipelineCommand}) {
    commands.push_back(add(app));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  BenchCommand* command = nullptr;
  for (auto& c : commands) {
    if (c->app->parsed()) command = c.get();
  }
  if (command->validate) command->validate();
  if (!command->distributed) {
    command->run(nullptr);
    return 0;
  }

  if (command->ranks > 1 && !launchedByAnything()) relaunchUnderTesseraRun(command->ranks, command->backend, argc, argv);
  InitOptions options;
  options.backend = command->backend;
  DistributedContext ctx = init(options);
  if (command->ranks > 0 && command->ranks != ctx.world->size()) {
    throw InvalidArgument("--ranks " + std::to_string(command->ranks) + " but the launcher started " +
                          std::to_string(ctx.world->size()) + " ranks; drop --ranks or make them agree");
  }
  command->run(&ctx);
  ctx.world->barrier();
  return 0;
}

}  // namespace
}  // namespace tessera::bench

int main(int argc, char** argv) {
  try {
    return tessera::bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-bench: %s\n", e.what());
    return 1;
  }
}
