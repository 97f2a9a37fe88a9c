#include "bench/allreduce_bench.h"

#include <ATen/ops/empty.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>

#include <algorithm>
#include <cstdio>
#include <functional>

#include "comm/gloo/gloo_communicator.h"
#include "bench/bench_command.h"
#include "tessera/core/config.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"

#ifdef TESSERA_BENCH_HAVE_MPI
#include <mpi.h>
#endif

namespace tessera::bench {
namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// The backend's own all-reduce of `buffer` (float32 sum), bypassing tessera.
std::function<void()> rawAllreduce(comm::Communicator& world, at::Tensor buffer) {
  if (world.backend() == "gloo") {
    auto* gloo = dynamic_cast<comm::detail::GlooCommunicator*>(&world);
    TESSERA_CHECK(gloo != nullptr, "gloo backend without a GlooCommunicator");
    auto context = gloo->context();
    return [context, buffer] {
      gloo::AllreduceOptions opts(context);
      opts.setOutput(buffer.data_ptr<float>(), static_cast<size_t>(buffer.numel()));
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
      opts.setTag(0x7fffffff);  // away from tessera's per-operation tags
      gloo::allreduce(opts);
    };
  }
#ifdef TESSERA_BENCH_HAVE_MPI
  if (world.backend() == "mpi") {
    return [buffer] {
      MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr<float>(), static_cast<int>(buffer.numel()), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    };
  }
#endif
  throw NotSupported("no raw all-reduce to compare with for backend '" + world.backend() + "'");
}

}  // namespace

void AllreduceBenchConfig::validate() const {
  TESSERA_CHECK_CONFIG(!bytes.empty(), "bytes", "give at least one size");
  for (int64_t b : bytes) {
    TESSERA_CHECK_CONFIG(b >= 4 && b % 4 == 0, "bytes", "sizes must be positive multiples of 4 (float32), got " << b);
  }
  TESSERA_CHECK_CONFIG(iterations >= 1, "iterations", "must be >= 1, got " << iterations);
  TESSERA_CHECK_CONFIG(warmup >= 0, "warmup", "must be >= 0, got " << warmup);
}

void runAllreduceBench(DistributedContext& ctx, const AllreduceBenchConfig& config) {
  config.validate();
  comm::Communicator& world = *ctx.world;
  const int n = world.size();
  for (const int64_t bytes : config.bytes) {
    auto buffer = at::empty({bytes / 4}, at::kFloat).fill_(1.0f);
    auto raw = rawAllreduce(world, buffer);
    auto ours = [&] { world.allReduce(buffer, comm::ReduceOp::kSum); };
    for (int i = 0; i < config.warmup; ++i) {
      ours();
      raw();
    }
    std::vector<double> oursSeconds, rawSeconds;
    for (int i = 0; i < config.iterations; ++i) {
      // Alternate the order so neither always runs right after the other's cache warm-up.
      for (int k = 0; k < 2; ++k) {
        const bool oursNow = (i + k) % 2 == 0;
        world.barrier();
        Stopwatch watch;
        oursNow ? ours() : raw();
        (oursNow ? oursSeconds : rawSeconds).push_back(watch.seconds());
      }
    }
    // Every rank's time counts: the collective ends when its slowest rank ends.
    auto slowest = [&](std::vector<double>& times) {
      auto t = at::empty({static_cast<int64_t>(times.size())}, at::kDouble);
      std::copy(times.begin(), times.end(), t.data_ptr<double>());
      world.allReduce(t, comm::ReduceOp::kMax);
      return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    };
    const double oursMedian = median(slowest(oursSeconds));
    const double rawMedian = median(slowest(rawSeconds));
    const double busFactor = n > 1 ? 2.0 * (n - 1) / n : 1.0;
    if (world.rank() != 0) continue;
    MetricsRecord record;
    record.add("bench", "allreduce")
        .add("backend", world.backend())
        .add("ranks", n)
        .add("bytes", bytes)
        .add("dtype", "float32")
        .add("iterations", config.iterations)
        .add("tessera_median_s", oursMedian)
        .add("tessera_algbw_gbps", bytes / oursMedian / 1e9)
        .add("tessera_busbw_gbps", bytes / oursMedian / 1e9 * busFactor)
        .add("raw", world.backend() == "gloo" ? "gloo::allreduce(RING)" : "MPI_Allreduce")
        .add("raw_median_s", rawMedian)
        .add("raw_algbw_gbps", bytes / rawMedian / 1e9)
        .add("raw_busbw_gbps", bytes / rawMedian / 1e9 * busFactor)
        .add("ratio_vs_raw", rawMedian / oursMedian);
    std::printf("%s\n", record.toJson().c_str());
    std::fflush(stdout);
  }
}

std::unique_ptr<BenchCommand> addAllreduceCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("allreduce", "tessera's allReduce vs the backend's own, float32 sum");
  addLaunchOptions(*command);
  auto config = std::make_shared<AllreduceBenchConfig>();
  auto sizes = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"1MiB", "16MiB", "64MiB"});
  command->app->add_option("--bytes", *sizes, "buffer sizes, e.g. 1MiB,64MiB")->delimiter(',');
  command->app->add_option("--iters", config->iterations, "timed iterations per size")->check(CLI::PositiveNumber);
  command->app->add_option("--warmup", config->warmup, "untimed iterations per size")->check(CLI::NonNegativeNumber);
  command->validate = [config, sizes] {
    config->bytes.clear();
    for (const auto& s : *sizes) config->bytes.push_back(parseBytes(s));
    config->validate();
  };
  command->run = [config](DistributedContext* ctx) { runAllreduceBench(*ctx, *config); };
  return command;
}

}  // namespace tessera::bench
