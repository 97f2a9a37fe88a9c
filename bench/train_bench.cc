#include "bench/train_bench.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "bench/bench_command.h"
#include "bench/ep_traffic_model.h"
#include "bench/tp_traffic_model.h"
#include "tessera/core/config.h"
#include "tessera/core/metrics.h"
#include "tessera/core/timer.h"

namespace tessera::bench {
namespace {

// Best-of-5 FLOP/s of a 1024^3 float32 matmul with this rank's intra-op
// threads. Every rank measures at once, as they will train at once, so the
// sum over ranks is the peak the job can reach on this machine.
double sgemmPeakFlopsPerSecond() {
  constexpr int64_t n = 1024;
  auto a = at::randn({n, n});
  auto b = at::randn({n, n});
  at::mm(a, b);  // warm-up: page in, spin up threads
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    Stopwatch watch;
    auto c = at::mm(a, b);
    const double seconds = watch.seconds();
    best = std::max(best, 2.0 * n * n * n / seconds);
  }
  return best;
}

// Training FLOPs per token (per example for the classifier): 6 per parameter
// (forward 2, backward 4), plus attention's score and value matmuls for the
// GPT, 12 * n_layer * d_model * T (the PaLM appendix B estimate).
// A mixture of experts counts the parameters a token passes through: each
// token visits top_k of the E experts (capacity slack and dropped tokens
// aside), so the other experts' parameters are left out.
double flopsPerToken(const launcher::TrainJobConfig& job, int64_t parameters) {
  double active = static_cast<double>(parameters);
  if (job.model.kind == "gpt" && job.model.gpt.use_moe) {
    const auto& gpt = job.model.gpt;
    const double M = static_cast<double>(gpt.d_model);
    const double H = static_cast<double>(gpt.mlp_ratio) * M;
    const double expert = 2 * M * H + H + M;  // fc and proj with biases
    active -= static_cast<double>(gpt.n_layer * (gpt.moe.num_experts - gpt.moe.top_k)) * expert;
  }
  double flops = 6.0 * active;
  if (job.model.kind == "gpt") {
    flops += 12.0 * job.model.gpt.n_layer * job.model.gpt.d_model * job.data.seq_len;
  }
  return flops;
}

double sumOverRanks(comm::Communicator& world, double value) {
  auto t = at::full({1}, value, at::kDouble);
  world.allReduce(t, comm::ReduceOp::kSum);
  return t.item<double>();
}

}  // namespace

void TrainBenchConfig::validate() const {
  TESSERA_CHECK_CONFIG(!configPath.empty(), "config", "give a tessera-train TOML file with --config");
  TESSERA_CHECK_CONFIG(steps >= 1, "steps", "must be >= 1, got " << steps);
}

void runTrainBench(DistributedContext& ctx, const TrainBenchConfig& config) {
  config.validate();
  std::vector<std::string> overrides = config.overrides;
  // One untimed warm-up step, then the timed ones; no evaluation, one metrics line.
  for (const std::string& o : {"train.steps=" + std::to_string(config.steps + 1), std::string("train.eval_batches=0"),
                               std::string("train.progress=false")}) {
    overrides.push_back(o);
  }
  const launcher::TrainJobConfig job = launcher::loadTrainJobConfig(config.configPath, overrides);
  auto built = launcher::buildTrainJob(job, ctx, "");  // collective
  comm::Communicator& world = *ctx.world;
  const double peak = sumOverRanks(world, sgemmPeakFlopsPerSecond());

  Trainer trainer(built->parts, job.train);
  int64_t tokensAtWarmup = 0;
  double secondsAtWarmup = 0, computeAtWarmup = 0, commAtWarmup = 0;
  parallel::DataParallelStats dpAtWarmup;
  std::map<std::string, CommTraffic> perCommAtWarmup;
  uint64_t bytesAtWarmup = 0;
  trainer.callbacks().afterStep.push_back([&](const StepReport& r) {
    if (r.step != 1) return;
    perCommAtWarmup = r.comm;
    bytesAtWarmup = r.commBytes;
    tokensAtWarmup = r.tokens;
    secondsAtWarmup = r.timeSeconds;
    computeAtWarmup = r.computeSeconds;
    commAtWarmup = r.commSeconds;
    dpAtWarmup = built->dp->stats();
  });
  world.barrier();
  const StepReport last = trainer.run();  // collective
  const parallel::DataParallelStats dp = built->dp->stats();

  const double seconds = last.timeSeconds - secondsAtWarmup;
  const double tokens = static_cast<double>(last.tokens - tokensAtWarmup);  // all dp ranks
  const double modelFlops = flopsPerToken(job, built->numParameters) * tokens / seconds;
  const double commTotal = dp.commSeconds - dpAtWarmup.commSeconds;
  const double commExposed = dp.exposedSeconds - dpAtWarmup.exposedSeconds;
  if (world.rank() != 0) return;
  // Bytes sent and exposed seconds per communicator over the timed steps (they sum to comm_bytes / comm_exposed_s).
  MetricsRecord perComm;
  for (const auto& [name, traffic] : last.comm) {
    const CommTraffic before = perCommAtWarmup.count(name) ? perCommAtWarmup.at(name) : CommTraffic{};
    perComm.add(name, MetricsRecord()
                          .add("bytes", static_cast<int64_t>(traffic.bytesSent - before.bytesSent))
                          .add("exposed_s", traffic.exposedSeconds - before.exposedSeconds));
  }
  // Bytes communicator `name` sent per timed step (0 when it does not exist).
  auto timedBytesPerStep = [&](const std::string& name) {
    const auto it = last.comm.find(name);
    if (it == last.comm.end()) return 0.0;
    const double before = perCommAtWarmup.count(name) ? static_cast<double>(perCommAtWarmup.at(name).bytesSent) : 0;
    return (static_cast<double>(it->second.bytesSent) - before) / static_cast<double>(config.steps);
  };
  MetricsRecord record;
  record.add("bench", "train")
      .add("config", config.configPath)
      .add("ranks", world.size())
      .add("strategy", job.parallel.strategy)
      .add("threads_per_rank", built->threads)
      .add("parameters", built->numParameters)
      .add("steps", config.steps)
      .add("tokens_per_s", tokens / seconds)
      .add("step_s", seconds / config.steps)
      .add("compute_s", last.computeSeconds - computeAtWarmup)
      .add("comm_exposed_s", last.commSeconds - commAtWarmup)
      .add("comm_total_s", commTotal)
      // Below a millisecond of communication (a world of 1) the fraction is noise.
      .add("overlap_fraction", commTotal > 1e-3 ? std::max(0.0, 1.0 - commExposed / commTotal) : 0.0)
      .add("comm_bytes", static_cast<int64_t>(last.commBytes - bytesAtWarmup))  // over the timed steps, like comm
      .add("comm", perComm)
      .add("model_flops_per_s", modelFlops)
      .add("sgemm_peak_flops_per_s", peak)
      .add("mfu", modelFlops / peak);
  if (job.parallel.mesh.tp > 1 && job.model.kind == "gpt") {
    // The tp communicator's measured bytes per step beside the analytic model (tp_traffic_model.h).
    const TpTrafficModel model = tensorParallelTrafficPerStep(job);
    const double measured = timedBytesPerStep("tp");
    MetricsRecord terms;
    for (const auto& [name, bytes] : model.termBytes) terms.add(name, bytes);
    record.add("tp", MetricsRecord()
                         .add("degree", job.parallel.mesh.tp)
                         .add("sequence_parallel", job.parallel.sequence_parallel)
                         .add("bytes_per_step", measured)
                         .add("model_bytes_per_step", model.totalBytes)
                         .add("measured_over_model", model.totalBytes > 0 ? measured / model.totalBytes : 0.0)
                         .add("model_terms", terms));
  }
  if (job.model.kind == "gpt" && job.model.gpt.use_moe && (job.parallel.mesh.ep > 1 || job.parallel.moe_dtd)) {
    // The ep communicator's measured bytes per step (the experts' all-to-alls)
    // beside the model (ep_traffic_model.h); with DTD, the reduction against
    // the model's bytes without it (target: the tp degree).
    const EpTrafficModel model = expertParallelTrafficPerStep(job);
    const double measured = timedBytesPerStep("ep");
    MetricsRecord terms;
    for (const auto& [name, bytes] : model.termBytes) terms.add(name, bytes);
    MetricsRecord ep;
    ep.add("degree", model.ep)
        .add("dtd", model.dtd)
        .add("tp", model.tp)
        .add("moe_layers", model.moeLayers)
        .add("tokens_per_forward", model.tokensPerForward)
        .add("capacity", model.capacity)
        .add("bytes_per_step", measured)
        .add("model_bytes_per_step", model.totalBytes)
        .add("measured_over_model", model.totalBytes > 0 ? measured / model.totalBytes : 0.0)
        .add("model_terms", terms);
    if (model.dtd) {
      ep.add("model_bytes_per_step_without_dtd", model.totalBytesWithoutDtd)
          .add("reduction_measured", measured > 0 ? model.totalBytesWithoutDtd / measured : 0.0)
          .add("reduction_model", model.totalBytes > 0 ? model.totalBytesWithoutDtd / model.totalBytes : 0.0);
    }
    record.add("ep", ep);
  }
  std::printf("%s\n", record.toJson().c_str());
  std::fflush(stdout);
}

std::unique_ptr<BenchCommand> addTrainCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand("train", "a tessera-train config: tokens/s, compute vs comm, overlap, MFU");
  addLaunchOptions(*command);
  auto config = std::make_shared<TrainBenchConfig>();
  command->app->add_option("--config", config->configPath, "tessera-train TOML file")->required();
  command->app->add_option("--set", config->overrides, "override one key: section.key=value (repeatable)");
  command->app->add_option("--steps", config->steps, "timed steps")->check(CLI::PositiveNumber);
  command->validate = [config] { config->validate(); };
  command->run = [config](DistributedContext* ctx) { runTrainBench(*ctx, *config); };
  return command;
}

}  // namespace tessera::bench
