// tessera-bench checkpoint: what an asynchronous checkpoint costs, each
// figure next to its baseline measured in the same run on the same bytes.
//
//   blocked_s        inside save() (training is blocked)  vs  memcpy_s of the bytes
//   write_gbps       background encode + write + fsync     vs  plain_write_gbps
//                    (write + fsync of the same bytes to a file in the same dir)
//   ... zstd         the same with compression on, plus the ratio
//   load_gbps        load() of this rank's share, checksums verified
//   ratio on trained weights: --weights-from CHECKPOINT (any tessera checkpoint)
//   or --train-config TOML --train-steps N (trains first, then compresses the
//   parameters); else reported for the random weights only.
//
// The state is --tensors fp32 tensors of --bytes in total (random normal,
// std 0.02, like an initialized model); with --ranks N each rank holds a flat
// 1/N slice of each, so every rank writes its own file.
//   tessera-bench checkpoint --bytes 256MiB --tensors 32 [--ranks 2]
#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <torch/nn/module.h>

#include "bench/bench_command.h"
#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"

namespace tessera::bench {
namespace {

struct CheckpointBenchConfig {
  std::string bytesText = "256MiB";
  int tensors = 32;
  int saves = 3;
  int zstdLevel = 3;
  int threads = 0;
  std::string dir;                 // default: a scratch dir under /tmp
  std::string weightsFrom;
  std::string trainConfig;
  int trainSteps = 300;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double maxOverRanks(comm::Communicator& world, double value) {
  auto t = at::full({1}, value, at::kDouble);
  world.allReduce(t, comm::ReduceOp::kMax);
  return t.item<double>();
}

double sumOverRanks(comm::Communicator& world, double value) {
  auto t = at::full({1}, value, at::kDouble);
  world.allReduce(t, comm::ReduceOp::kSum);
  return t.item<double>();
}

// This rank's share of the synthetic model: a flat slice of every tensor.
StateDict syntheticState(int64_t totalBytes, int tensors, int rank, int ranks) {
  StateDict state;
  const int64_t numel = std::max<int64_t>(ranks, totalBytes / 4 / tensors / ranks * ranks);
  at::manual_seed(1234 + rank);
  for (int i = 0; i < tensors; ++i) {
    const int64_t share = numel / ranks;
    StateTensor t{{numel}, {StatePiece{at::randn({share}) * 0.02, TensorSlice::flatRange({numel}, share * rank, share)}},
                  ranks == 1};
    state.tensors["model/layer" + std::to_string(i) + ".weight"] = std::move(t);
  }
  return state;
}

// Best of 3: memcpy of the same bytes into an already-touched buffer.
double memcpySeconds(const StateDict& state) {
  const int64_t bytes = state.localBytes();
  std::vector<uint8_t> dst(static_cast<size_t>(bytes), 1);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    Stopwatch watch;
    size_t at = 0;
    for (const auto& [name, t] : state.tensors) {
      for (const StatePiece& p : t.pieces) {
        const size_t n = p.local.numel() * p.local.element_size();
        std::memcpy(dst.data() + at, p.local.data_ptr(), n);
        at += n;
      }
    }
    best = std::min(best, watch.seconds());
  }
  return best;
}

// write(2) in 8 MiB pieces + fsync of the same bytes: what the disk gives.
double plainWriteSeconds(const StateDict& state, const std::string& path) {
  Stopwatch watch;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  TESSERA_CHECK(fd >= 0, "cannot create " << path << ": " << std::strerror(errno));
  for (const auto& [name, t] : state.tensors) {
    for (const StatePiece& p : t.pieces) {
      const auto* data = static_cast<const uint8_t*>(p.local.data_ptr());
      const size_t n = p.local.numel() * p.local.element_size();
      for (size_t at = 0; at < n;) {
        const ssize_t w = ::write(fd, data + at, std::min<size_t>(8 << 20, n - at));
        TESSERA_CHECK(w > 0, "write " << path << ": " << std::strerror(errno));
        at += static_cast<size_t>(w);
      }
    }
  }
  ::fsync(fd);
  ::close(fd);
  const double seconds = watch.seconds();
  std::filesystem::remove(path);
  return seconds;
}

struct SaveFigures {
  double blocked = 0, write = 0, total = 0;
  int64_t bytes = 0, fileBytes = 0;
};

// --saves saves after one warm-up (which maps the snapshot buffer); medians.
SaveFigures measureSaves(comm::CommPtr world, const StateDict& state, const std::string& dir, int level, int saves,
                         int threads) {
  std::filesystem::remove_all(dir);
  checkpoint::CheckpointOptions options;
  options.dir = dir;
  options.zstdLevel = level;
  options.keep = 1;
  options.compressionThreads = threads;
  checkpoint::Checkpointer ckpt(options, world);
  ckpt.save(0, state);
  ckpt.wait();
  std::vector<double> blocked, write, total;
  SaveFigures f;
  for (int i = 1; i <= saves; ++i) {
    world->barrier();
    Stopwatch watch;
    ckpt.save(i, state);
    blocked.push_back(watch.seconds());
    ckpt.wait();
    total.push_back(watch.seconds());
    write.push_back(ckpt.lastStats().writeSeconds);
    f.bytes = ckpt.lastStats().bytes;
    f.fileBytes = ckpt.lastStats().fileBytes;
  }
  f.blocked = maxOverRanks(*world, median(blocked));
  f.write = maxOverRanks(*world, median(write));
  f.total = maxOverRanks(*world, median(total));
  f.bytes = static_cast<int64_t>(sumOverRanks(*world, static_cast<double>(f.bytes)));
  f.fileBytes = static_cast<int64_t>(sumOverRanks(*world, static_cast<double>(f.fileBytes)));
  return f;
}

// Compressed/uncompressed ratio of a state's zstd checkpoint (one rank).
std::pair<double, int64_t> zstdRatio(const StateDict& state, const std::string& dir, int level) {
  std::filesystem::remove_all(dir);
  checkpoint::CheckpointOptions options;
  options.dir = dir;
  options.zstdLevel = level;
  checkpoint::Checkpointer ckpt(options, comm::makeSingleRankCommunicator());
  ckpt.save(0, state);
  ckpt.wait();
  const auto stats = ckpt.lastStats();
  std::filesystem::remove_all(dir);
  return {static_cast<double>(stats.bytes) / static_cast<double>(stats.fileBytes), stats.bytes};
}

StateDict weightsOfCheckpoint(const std::string& path) {
  const checkpoint::CheckpointIndex index = checkpoint::readIndex(checkpoint::resolveCheckpoint(path));
  std::vector<checkpoint::LoadRequest> requests;
  for (const auto& [name, t] : index.tensors) {
    at::ScalarType dtype = at::kFloat;
    if (t.dtype == "bfloat16") dtype = at::kBFloat16;
    else if (t.dtype == "float16") dtype = at::kHalf;
    else if (t.dtype == "float64") dtype = at::kDouble;
    else if (t.dtype != "float32") continue;  // floating-point state only
    requests.push_back(checkpoint::LoadRequest{name, t.globalShape, dtype, std::nullopt});  // whole tensors
  }
  return checkpoint::load(path, requests, {});
}

StateDict trainedWeights(DistributedContext& ctx, const CheckpointBenchConfig& config) {
  const launcher::TrainJobConfig job = launcher::loadTrainJobConfig(
      config.trainConfig, {"train.steps=" + std::to_string(config.trainSteps), "train.eval_batches=0",
                           "train.progress=false"});
  auto built = launcher::buildTrainJob(job, ctx, "");
  Trainer trainer(built->parts, job.train);
  trainer.run();
  StateDict state;
  for (const auto& p : built->model->module().named_parameters()) {
    state.putReplicated("model/" + p.key(), p.value().detach().clone());
  }
  return state;
}

void runCheckpointBench(DistributedContext& ctx, const CheckpointBenchConfig& config) {
  comm::CommPtr world = ctx.world;
  const int rank = world->rank(), ranks = world->size();
  const std::string root = config.dir.empty() ? "/tmp/tessera-bench-checkpoint-" + std::to_string(::getppid()) : config.dir;
  const StateDict state = syntheticState(parseBytes(config.bytesText), config.tensors, rank, ranks);
  const double localBytes = static_cast<double>(state.localBytes());
  const double totalBytes = sumOverRanks(*world, localBytes);

  const double memcpyS = maxOverRanks(*world, memcpySeconds(state));
  std::filesystem::create_directories(root);
  world->barrier();
  const double plainS = maxOverRanks(*world, plainWriteSeconds(state, root + "/plain-" + std::to_string(rank) + ".bin"));
  const SaveFigures raw = measureSaves(world, state, root + "/raw", 0, config.saves, config.threads);
  world->barrier();
  const double plainS2 = maxOverRanks(*world, plainWriteSeconds(state, root + "/plain-" + std::to_string(rank) + ".bin"));
  const SaveFigures zstd = measureSaves(world, state, root + "/zstd", config.zstdLevel, config.saves, config.threads);

  // load(): this rank's share back, from the zstd checkpoint.
  std::vector<checkpoint::LoadRequest> requests;
  for (const auto& [name, t] : state.tensors) {
    requests.push_back(checkpoint::LoadRequest{name, t.globalShape, at::kFloat, t.pieces[0].slice});
  }
  world->barrier();
  Stopwatch loadWatch;
  const StateDict loaded = checkpoint::load(root + "/zstd", requests);
  const double loadS = maxOverRanks(*world, loadWatch.seconds());

  std::string weights = "random normal std 0.02 (compresses poorly)";
  double realRatio = 0;
  int64_t realBytes = 0;
  if (!config.weightsFrom.empty() || !config.trainConfig.empty()) {
    StateDict real;
    if (!config.weightsFrom.empty()) {
      real = weightsOfCheckpoint(config.weightsFrom);
      weights = "floating-point tensors of " + config.weightsFrom;
    } else {
      real = trainedWeights(ctx, config);
      weights = config.trainConfig + " trained " + std::to_string(config.trainSteps) + " steps";
    }
    if (rank == 0) std::tie(realRatio, realBytes) = zstdRatio(real, root + "/real", config.zstdLevel);
  }
  world->barrier();
  if (rank == 0) std::filesystem::remove_all(root);
  if (rank != 0) return;
  const double plainGbps = totalBytes / std::min(plainS, plainS2) / 1e9;
  MetricsRecord record;
  record.add("bench", "checkpoint")
      .add("ranks", ranks)
      .add("bytes", static_cast<int64_t>(totalBytes))
      .add("tensors", config.tensors)
      .add("saves", config.saves)
      .add("memcpy_s", memcpyS)
      .add("blocked_s", raw.blocked)
      .add("blocked_over_memcpy", raw.blocked / memcpyS)
      .add("blocked_zstd_s", zstd.blocked)
      .add("plain_write_gbps", plainGbps)
      .add("write_gbps", totalBytes / raw.write / 1e9)
      .add("write_over_plain", totalBytes / raw.write / 1e9 / plainGbps)
      .add("save_total_s", raw.total)
      .add("zstd_level", config.zstdLevel)
      .add("zstd_write_gbps", totalBytes / zstd.write / 1e9)
      .add("zstd_over_plain", totalBytes / zstd.write / 1e9 / plainGbps)
      .add("zstd_ratio", static_cast<double>(zstd.bytes) / static_cast<double>(zstd.fileBytes))
      .add("zstd_save_total_s", zstd.total)
      .add("load_gbps", totalBytes / loadS / 1e9)
      .add("weights", weights)
      .add("weights_bytes", realBytes)
      .add("weights_zstd_ratio", realRatio);
  std::printf("%s\n", record.toJson().c_str());
  std::fflush(stdout);
}

}  // namespace

std::unique_ptr<BenchCommand> addCheckpointCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("checkpoint", "async HDF5+zstd checkpoints: blocked time vs memcpy, write vs "
                                                  "plain write+fsync, zstd ratio, load");
  addLaunchOptions(*command);
  auto config = std::make_shared<CheckpointBenchConfig>();
  command->app->add_option("--bytes", config->bytesText, "state size over all ranks, e.g. 256MiB");
  command->app->add_option("--tensors", config->tensors, "fp32 tensors in the state")->check(CLI::PositiveNumber);
  command->app->add_option("--saves", config->saves, "timed saves per setting (medians)")->check(CLI::PositiveNumber);
  command->app->add_option("--zstd-level", config->zstdLevel, "zstd level of the compressed runs")
      ->check(CLI::Range(1, 19));
  command->app->add_option("--threads", config->threads, "compression threads (0: hardware threads)");
  command->app->add_option("--dir", config->dir, "scratch directory (default /tmp/tessera-bench-checkpoint-*)");
  command->app->add_option("--weights-from", config->weightsFrom, "a checkpoint whose weights give the zstd ratio");
  command->app->add_option("--train-config", config->trainConfig, "train this tessera-train config first; its "
                                                                  "parameters give the zstd ratio");
  command->app->add_option("--train-steps", config->trainSteps, "steps for --train-config")->check(CLI::PositiveNumber);
  command->validate = [config] { parseBytes(config->bytesText); };
  command->run = [config](DistributedContext* ctx) { runCheckpointBench(*ctx, *config); };
  return command;
}

}  // namespace tessera::bench
