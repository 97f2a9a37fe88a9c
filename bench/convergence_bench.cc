// The convergence benchmark: the same GPT, data and token budget trained with
// synchronous DDP AdamW and with each communication-light method, side by
// side in one run, reporting the final validation loss against the bytes each
// rank sent.
//
//   tessera-bench convergence --ranks 4 --config examples/configs/gpt-tiny.toml --steps 600
//
// Layout (4 ranks): DDP replicates over all 4 ranks; every other method runs
// 2 replicas (dp_replicate, the "slow link") x 2 ranks inside each replica
// (FSDP for DiLoCo -- the INTELLECT-1 hybrid -- DDP for DeMo and MT-DAO, which
// work on whole parameters). Every rank draws the same per-rank batch, so the
// global batch per step, the schedule and the token budget are identical for
// every method. DDP is the honest baseline: the tiny config's tuned AdamW.
//
// bytes_per_inner_step counts what one rank sent over the cross-replica
// (dp_replicate) communicator per optimizer step -- the traffic a slow
// inter-node link carries; for DDP that is its whole gradient all-reduce.
// Traffic inside a replica is reported separately (intra_replica_bytes_total).
// Rank 0 prints one JSON line per method, writes the loss curves as a
// tab-separated file and, when gnuplot is installed, a PNG whose path it
// prints.
#include <unistd.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "bench/bench_command.h"
#include "launcher/train_config.h"
#include "launcher/train_job.h"
#include "tessera/core/config.h"
#include "tessera/core/logging.h"
#include "tessera/core/metrics.h"
#include "tessera/core/models/precision.h"
#include "tessera/core/timer.h"
#include "tessera/parallel/memory_accounting.h"

namespace tessera::bench {
namespace {

struct ConvergenceBenchConfig {
  std::string configPath;
  std::vector<std::string> overrides;   // applied to every method, before the method's own
  int64_t steps = 600;                  // optimizer (inner) steps per method
  int64_t batchPerRank = 0;             // 0: 64 / ranks (a global batch of 64 sequences)
  int64_t evalEvery = 50;
  int64_t evalBatches = 16;             // per rank
  std::vector<std::string> methods = {"ddp",          "diloco-h10", "diloco-h25",       "diloco-h50",
                                      "diloco-h50-int8", "diloco-h100", "diloco-h100-int8", "demo", "mt-dao"};
  std::string outDir = "bench-out/convergence";
  double demoLr = 1e-3;                 // DeMo's sign updates need their own rate
  double mtDaoLr = 3e-3;
};

// The overrides that make `method` out of the base config, for `ranks` ranks.
std::vector<std::string> methodOverrides(const std::string& method, int ranks) {
  const int replicas = ranks >= 2 && ranks % 2 == 0 ? 2 : 1;
  const std::string inside = std::to_string(ranks / replicas);
  const std::vector<std::string> twoLevel = {"parallel.dp_replicate=" + std::to_string(replicas),
                                             "parallel.dp_shard=" + inside};
  auto with = [&](std::vector<std::string> extra, const std::string& strategy) {
    extra.insert(extra.end(), twoLevel.begin(), twoLevel.end());
    extra.push_back("parallel.strategy=\"" + (inside == "1" ? std::string("none") : strategy) + "\"");
    return extra;
  };
  if (method == "ddp") {
    return {"optim.name=\"adamw\"", "parallel.strategy=\"ddp\"", "parallel.dp_replicate=" + std::to_string(ranks),
            "parallel.dp_shard=1"};
  }
  if (method.rfind("diloco-h", 0) == 0) {
    const std::string rest = method.substr(8);
    const auto dash = rest.find('-');
    const std::string h = rest.substr(0, dash);
    const std::string suffix = dash == std::string::npos ? "" : rest.substr(dash + 1);
    TESSERA_CHECK_CONFIG(!h.empty() && h.find_first_not_of("0123456789") == std::string::npos &&
                             (suffix.empty() || suffix == "int8"),
                         "methods", "cannot read '" << method << "' (expected diloco-h<H> or diloco-h<H>-int8)");
    return with({"optim.name=\"diloco\"", "diloco.inner_steps=" + h,
                 std::string("diloco.compression=\"") + (suffix == "int8" ? "int8" : "none") + "\""},
                "fsdp");
  }
  // Precision (issue 18): DDP AdamW over every rank as "ddp", computed in
  // bf16 or FP8 at an MS-AMP level (delayed scaling unless a recipe is named:
  // fp8-o1-tensorwise). fp8-o3 shards its optimizer over whole tensors
  // (strategy "fsdp" under O3).
  if (method == "fp32" || method == "bf16" || method.rfind("fp8-o", 0) == 0) {
    std::vector<std::string> out = {"optim.name=\"adamw\"", "parallel.dp_replicate=1",
                                    "parallel.dp_shard=" + std::to_string(ranks)};
    if (method == "fp32" || method == "bf16") {
      out.push_back("precision.mode=\"" + method + "\"");
      out.push_back("parallel.strategy=\"" + std::string(ranks > 1 ? "ddp" : "none") + "\"");
      if (ranks > 1) out[1] = "parallel.dp_replicate=" + std::to_string(ranks), out[2] = "parallel.dp_shard=1";
      return out;
    }
    const std::string rest = method.substr(5);  // "1", "2-rowwise", ...
    const std::string level = rest.substr(0, 1);
    const std::string recipe = rest.size() > 2 && rest[1] == '-' ? rest.substr(2) : "delayed";
    TESSERA_CHECK_CONFIG((level == "1" || level == "2" || level == "3") && (rest.size() == 1 || rest[1] == '-'),
                         "methods", "cannot read '" << method << "' (expected fp8-o<1|2|3>[-<recipe>])");
    out.push_back("precision.mode=\"fp8\"");
    out.push_back("precision.level=\"O" + level + "\"");
    out.push_back("precision.fp8_recipe=\"" + recipe + "\"");
    if (level == "3" && ranks > 1) {
      out.push_back("parallel.strategy=\"fsdp\"");  // O3: ZeRO over whole tensors
    } else {
      out.push_back("parallel.strategy=\"" + std::string(ranks > 1 ? "ddp" : "none") + "\"");
      if (ranks > 1) out[1] = "parallel.dp_replicate=" + std::to_string(ranks), out[2] = "parallel.dp_shard=1";
    }
    return out;
  }
  if (method == "demo") return with({"optim.name=\"demo\""}, "ddp");
  if (method == "mt-dao") return with({"optim.name=\"mt-dao\""}, "ddp");
  throw ConfigError("methods", "unknown method '" + method +
                                     "' (valid: ddp, diloco-h<H>[-int8], demo, mt-dao, fp32, bf16, fp8-o<1|2|3>[-<recipe>])");
}

struct MethodResult {
  std::string method;
  std::string layout;        // e.g. "2 replicas x 2 ranks (fsdp)"
  double valLoss = 0;
  double trainLoss = 0;
  int64_t tokens = 0;
  uint64_t crossBytes = 0;   // this rank, over dp_replicate
  uint64_t insideBytes = 0;  // this rank, over dp_shard
  double wallSeconds = 0;
  std::vector<std::pair<int64_t, double>> curve;  // (tokens, val loss)
  parallel::MemoryReport memory;  // rank 0's, after the last step (gradients still held)
};

uint64_t bytesSent(const comm::CommPtr& comm) { return comm ? comm->stats().totalBytesSent() : 0; }
uint64_t bytesSent(const std::vector<comm::CommPtr>& comms) {
  uint64_t total = 0;
  for (const auto& c : comms) total += bytesSent(c);
  return total;
}

MethodResult runMethod(DistributedContext& ctx, const ConvergenceBenchConfig& c, const std::string& method) {
  std::vector<std::string> overrides = c.overrides;
  const std::vector<std::string> own = methodOverrides(method, ctx.worldSize());
  overrides.insert(overrides.end(), own.begin(), own.end());
  const int64_t batch = c.batchPerRank > 0 ? c.batchPerRank : std::max<int64_t>(1, 64 / ctx.worldSize());
  overrides.push_back("data.batch_size=" + std::to_string(batch));
  overrides.push_back("train.steps=" + std::to_string(c.steps));
  overrides.push_back("train.eval_every=" + std::to_string(c.evalEvery));
  overrides.push_back("train.eval_batches=" + std::to_string(c.evalBatches));
  overrides.push_back("train.log_every=" + std::to_string(c.steps));
  overrides.push_back("train.progress=false");
  if (method == "demo") overrides.push_back("optim.lr=" + std::to_string(c.demoLr));
  if (method == "mt-dao") overrides.push_back("optim.lr=" + std::to_string(c.mtDaoLr));
  const launcher::TrainJobConfig job = launcher::loadTrainJobConfig(c.configPath, overrides);

  ctx.world->barrier();
  const Stopwatch wall;
  auto built = launcher::buildTrainJob(job, ctx, "");  // collective
  // Cross-replica traffic: the dp_replicate axis, plus any communicator the
  // optimizer split off it (streaming DiLoCo's background all-reduces).
  std::vector<comm::CommPtr> cross = {built->mesh->comm(parallel::MeshAxis::kDpReplicate)};
  for (const comm::CommPtr& c : built->optimizer->communicators()) {
    if (c != cross.front()) cross.push_back(c);
  }
  const comm::CommPtr inside = built->mesh->comm(parallel::MeshAxis::kDpShard);
  const uint64_t crossStart = bytesSent(cross);
  const uint64_t insideStart = bytesSent(inside);
  Trainer trainer(built->parts, job.train);
  MethodResult result;
  result.method = method;
  result.layout = std::to_string(job.parallel.mesh.dp_replicate) + " replicas x " +
                  std::to_string(job.parallel.mesh.dp_shard) + " ranks (" + job.parallel.strategy + ")";
  trainer.callbacks().afterStep.push_back([&](const StepReport& r) {
    if (r.valLoss) result.curve.emplace_back(r.tokens, *r.valLoss);
  });
  const StepReport last = trainer.run();  // collective
  {
    parallel::MemoryOptions options;
    options.logicalParameters = built->numParameters;
    options.scales.push_back(models::fp8ScalingState(built->model->module()));  // the size of what the layers hold
    result.memory = parallel::measureMemory(built->model->module(), *built->optimizer, *built->dp, options);
  }
  result.crossBytes = bytesSent(cross) - crossStart;
  result.insideBytes = bytesSent(inside) - insideStart;
  result.valLoss = last.valLoss ? *last.valLoss : trainer.evaluate();  // collective only when needed
  result.trainLoss = last.loss;
  result.tokens = last.tokens;
  result.wallSeconds = wall.seconds();
  return result;
}

std::string plotCurves(const ConvergenceBenchConfig& c, const std::vector<MethodResult>& results) {
  const std::string data = c.outDir + "/convergence.tsv";
  {
    std::ofstream out(data);
    out << "# method\ttokens\tval_loss\n";
    for (const auto& r : results) {
      out << "\n\n# " << r.method << "\n";
      for (const auto& [tokens, loss] : r.curve) out << r.method << "\t" << tokens << "\t" << loss << "\n";
    }
  }
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) return "";
  const std::string png = c.outDir + "/convergence.png";
  const std::string script = c.outDir + "/convergence.gp";
  {
    std::ofstream gp(script);
    gp << "set terminal png size 1100,700\nset output '" << png << "'\n"
       << "set title 'validation loss vs tokens (" << c.steps << " steps)'\n"
       << "set xlabel 'tokens'\nset ylabel 'validation loss (nats/byte)'\nset key top right\nset grid\n"
       << "plot ";
    for (size_t i = 0; i < results.size(); ++i) {
      gp << (i ? ", " : "") << "'" << data << "' index " << i << " using 2:3 with linespoints title '"
         << results[i].method << "'";
    }
    gp << "\n";
  }
  if (std::system(("gnuplot '" + script + "' 2>/dev/null").c_str()) != 0) return "";
  return png;
}

void runConvergenceBench(DistributedContext& ctx, const ConvergenceBenchConfig& c) {
  at::set_num_threads(1);
  std::vector<MethodResult> results;
  const MethodResult* ddp = nullptr;
  for (const std::string& method : c.methods) {
    if (ctx.rank() == 0) {
      TESSERA_LOG(kInfo) << "convergence: training " << method << " for " << c.steps << " steps";
    }
    results.push_back(runMethod(ctx, c, method));
  }
  const MethodResult* fp32 = nullptr;
  for (const auto& r : results) {
    if (r.method == "ddp") ddp = &r;
    if (r.method == "fp32") fp32 = &r;
  }
  if (ctx.rank() != 0) return;
  for (const auto& r : results) {
    MetricsRecord line;
    line.add("bench", "convergence");
    line.add("method", r.method);
    line.add("ranks", ctx.worldSize());
    line.add("layout", r.layout);
    line.add("steps", c.steps);
    line.add("tokens", r.tokens);
    line.add("val_loss", r.valLoss);
    line.add("train_loss", r.trainLoss);
    line.add("bytes_total", static_cast<int64_t>(r.crossBytes));
    line.add("bytes_per_inner_step", static_cast<double>(r.crossBytes) / static_cast<double>(c.steps));
    line.add("intra_replica_bytes_total", static_cast<int64_t>(r.insideBytes));
    if (ddp != nullptr && r.method != "ddp") {
      // One replica sends nothing across replicas: no ratio to report.
      if (r.crossBytes > 0) line.add("bytes_ratio_vs_ddp", static_cast<double>(ddp->crossBytes) / r.crossBytes);
      line.add("val_gap_vs_ddp", r.valLoss / ddp->valLoss - 1.0);
    }
    if (fp32 != nullptr && r.method != "fp32") {  // precision methods: same tokens, same layout
      line.add("val_gap_vs_fp32", r.valLoss / fp32->valLoss - 1.0);
      if (r.crossBytes > 0) line.add("bytes_ratio_vs_fp32", static_cast<double>(fp32->crossBytes) / r.crossBytes);
    }
    // Bytes per parameter this rank holds after a step (parallel/memory_accounting.h: storage summed, not a formula).
    const parallel::MemoryBytes& m = r.memory.bytes;
    line.add("mem_weights_bpp", r.memory.perParameter(m.weights));
    line.add("mem_master_bpp", r.memory.perParameter(m.masterWeights));
    line.add("mem_grads_bpp", r.memory.perParameter(m.gradients));
    line.add("mem_optimizer_bpp", r.memory.perParameter(m.optimizerState));
    line.add("mem_scales_bpp", r.memory.perParameter(m.scales));
    line.add("mem_total_bpp", r.memory.perParameter(m.total()));
    if (fp32 != nullptr && r.method != "fp32" && fp32->memory.bytes.total() > 0) {
      line.add("mem_vs_fp32", static_cast<double>(m.total()) / static_cast<double>(fp32->memory.bytes.total()) - 1.0);
    }
    line.add("wall_s", r.wallSeconds);
    std::printf("%s\n", line.toJson().c_str());
  }
  std::fflush(stdout);
  std::filesystem::create_directories(c.outDir);
  const std::string png = plotCurves(c, results);
  if (!png.empty()) {
    std::printf("{\"bench\": \"convergence\", \"plot\": \"%s\"}\n", png.c_str());
  } else {
    std::fprintf(stderr, "tessera-bench convergence: gnuplot not found; curves in %s/convergence.tsv\n",
                 c.outDir.c_str());
  }
  std::fflush(stdout);
}

}  // namespace

std::unique_ptr<BenchCommand> addConvergenceCommand(CLI::App& app) {
  auto command = std::make_unique<BenchCommand>();
  command->app = app.add_subcommand(
      "convergence", "DDP vs DiLoCo (H, int8), DeMo, MT-DAO: final val loss vs bytes sent, same token budget");
  addLaunchOptions(*command);
  auto c = std::make_shared<ConvergenceBenchConfig>();
  command->app->add_option("--config", c->configPath, "tessera-train TOML file (the GPT and data)")->required();
  command->app->add_option("--set", c->overrides, "override one key for every method (repeatable)");
  command->app->add_option("--steps", c->steps, "optimizer steps per method")->check(CLI::PositiveNumber);
  command->app->add_option("--batch-per-rank", c->batchPerRank, "sequences per rank per step (default 64 / ranks)");
  command->app->add_option("--eval-every", c->evalEvery, "steps between validation points of the curves");
  command->app->add_option("--eval-batches", c->evalBatches, "validation batches per rank");
  command->app->add_option("--methods", c->methods, "ddp, diloco-h<H>[-int8], demo, mt-dao; precision: fp32, bf16, fp8-o<1|2|3>[-<recipe>]")
      ->delimiter(',');
  command->app->add_option("--demo-lr", c->demoLr, "DeMo's learning rate (sign updates)");
  command->app->add_option("--mt-dao-lr", c->mtDaoLr, "MT-DAO's learning rate");
  command->app->add_option("--out", c->outDir, "directory for the curves (TSV) and the PNG plot");
  command->validate = [c] {
    TESSERA_CHECK_CONFIG(!c->configPath.empty(), "config", "give a tessera-train TOML file with --config");
    TESSERA_CHECK_CONFIG(!c->methods.empty(), "methods", "name at least one method");
    for (const auto& m : c->methods) methodOverrides(m, 4);  // throws for an unknown name
  };
  command->run = [c](DistributedContext* ctx) { runConvergenceBench(*ctx, *c); };
  return command;
}

}  // namespace tessera::bench
