// FSDP tests. Layout and argument checks run in-process over a single-rank
// communicator; everything else runs real Gloo (and, when available, MPI)
// processes. The references are independent of FSDP: each worker also trains
// a plain copy of the model on the whole global batch (N ranks x b rows) with
// no communication, and a DDP copy on the same per-rank slices; FSDP's
// parameters must match both after k steps, and its gradient norm must match
// the single process's at every step. For the MoE GPT and the GPT with
// dropout, whose loss depends on each forward's tokens (expert capacity, the
// aux loss) or on its random key, the single process instead runs each rank's
// batch as its own forward (with that rank's key) and averages; then the
// loss, every gradient and every parameter must match at every step.
#include <gtest/gtest.h>

#include <torch/nn.h>
#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/ddp.h"
#include "tessera/parallel/device_mesh.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/checks.h"

namespace tessera::parallel {
namespace {

using testing::expectPerCommSumsToTotal;

constexpr double kRelTolerance = 1e-5;

// ---- Models, data, optimizers ----------------------------------------------

// Sizes chosen so no unit divides evenly: unit "0" has 6*9+9 = 63 parameters,
// unit "1" 9*9+9 = 90, the root ("2": Linear 9 -> 3) 30.
constexpr int64_t kIn = 6;
constexpr int64_t kHidden = 9;
constexpr int64_t kOut = 3;

// tanh(linear(x)): one FSDP unit of the Sequential test model.
struct TanhLayerImpl : torch::nn::Module {
  TanhLayerImpl(int64_t in, int64_t out) : linear(register_module("linear", torch::nn::Linear(in, out))) {}
  at::Tensor forward(const at::Tensor& x) { return torch::tanh(linear(x)); }
  torch::nn::Linear linear;
};
TORCH_MODULE(TanhLayer);

torch::nn::Sequential makeSequential(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(TanhLayer(kIn, kHidden), TanhLayer(kHidden, kHidden), torch::nn::Linear(kHidden, kOut));
}

// Units "0" and "1" (Linear + Tanh each); the last Linear is the root.
std::vector<FsdpUnitSpec> sequentialUnits(const torch::nn::Sequential& model) {
  std::vector<FsdpUnitSpec> units;
  for (size_t i = 0; i < 2; ++i) {
    auto unit = model->ptr<TanhLayerImpl>(i);
    units.push_back({std::to_string(i), [unit](const at::Tensor& x) { return unit->forward(x); }});
  }
  return units;
}

// Units "0" and "1" whose forward also returns an aux loss: the mean square
// of the unit's output (depends on its parameters and on x).
std::vector<FsdpUnitSpec> sequentialUnitsWithAux(const torch::nn::Sequential& model) {
  std::vector<FsdpUnitSpec> units;
  for (size_t i = 0; i < 2; ++i) {
    auto unit = model->ptr<TanhLayerImpl>(i);
    units.push_back({std::to_string(i), [unit](const at::Tensor& x) {
                       at::Tensor h = unit->forward(x);
                       return FsdpUnitOutput(h, h.pow(2).mean());
                     }});
  }
  return units;
}

at::Tensor forwardSharded(Fsdp& fsdp, const torch::nn::Sequential& model, const at::Tensor& x) {
  at::Tensor h = fsdp.forwardUnit(1, fsdp.forwardUnit(0, x));  // (rows, 9)
  return model->ptr<torch::nn::LinearImpl>(2)->forward(h);     // (rows, 3)
}

// The global batch of a step, identical on every rank: x (rows, 6), y (rows, 3).
std::pair<at::Tensor, at::Tensor> globalBatch(int step, int64_t rows) {
  torch::manual_seed(1000 + step);
  at::Tensor x = torch::randn({rows, kIn});
  at::Tensor y = torch::randn({rows, kOut});
  return {x, y};
}

models::GptConfig tinyGpt(uint64_t seed) {
  models::GptConfig config;
  config.vocab_size = 64;
  config.block_size = 16;
  config.n_layer = 2;
  config.n_head = 4;
  config.d_model = 32;
  config.seed = seed;
  return config;  // tied head: wte.weight is used at both ends (root unit)
}

// Tokens and targets of a step: (rows, 16) int64 each.
std::pair<at::Tensor, at::Tensor> tokenBatch(int step, int64_t rows) {
  torch::manual_seed(2000 + step);
  at::Tensor idx = torch::randint(0, 64, {rows, 16}, torch::kLong);
  at::Tensor targets = torch::randint(0, 64, {rows, 16}, torch::kLong);
  return {idx, targets};
}

std::unique_ptr<torch::optim::Optimizer> makeOptimizer(const std::string& kind, std::vector<at::Tensor> params) {
  if (kind == "sgd") return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
  TESSERA_CHECK_ARG(kind == "adamw", "unknown optimizer '" << kind << "'");
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
}

// ---- Checks -------------------------------------------------------------------

void expectRelClose(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  TESSERA_CHECK(actual.sizes() == expected.sizes(), what << ": shape " << actual.sizes() << " vs " << expected.sizes());
  const double diff = (actual - expected).norm().item<double>();
  const double scale = std::max(expected.norm().item<double>(), 1e-12);
  TESSERA_CHECK(diff / scale <= kRelTolerance, what << " differs by relative " << diff / scale);
}

void expectClose(torch::nn::Module& actual, torch::nn::Module& expected, const std::string& what) {
  const auto a = actual.named_parameters();
  const auto e = expected.named_parameters();
  TESSERA_CHECK_EQ(a.size(), e.size());
  for (size_t i = 0; i < a.size(); ++i) {
    expectRelClose(a[i].value(), e[i].value(), what + ": parameter '" + a[i].key() + "'");
  }
}

void expectRelNear(double actual, double expected, const std::string& what) {
  TESSERA_CHECK(std::abs(actual - expected) <= kRelTolerance * std::max(std::abs(expected), 1e-12),
                what << ": " << actual << " vs " << expected);
}


// `reference`'s parameters grouped as FSDP groups them into units (prefix
// match; the rest is the root, last; empty groups dropped), in registration order.
std::vector<std::vector<std::pair<std::string, at::Tensor>>> unitParameters(
    torch::nn::Module& reference, const std::vector<std::string>& prefixes) {
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> groups(prefixes.size() + 1);
  for (const auto& item : reference.named_parameters()) {
    size_t group = prefixes.size();
    for (size_t u = 0; u < prefixes.size(); ++u) {
      if (item.key().rfind(prefixes[u] + ".", 0) == 0) group = u;
    }
    groups[group].emplace_back(item.key(), item.value());
  }
  groups.erase(std::remove_if(groups.begin(), groups.end(), [](const auto& g) { return g.empty(); }), groups.end());
  return groups;
}

// A parameter's values, or its gradient (zeros when it has none).
at::Tensor valueOrGrad(const at::Tensor& param, bool grad) {
  if (!grad) return param.detach();
  return param.grad().defined() ? param.grad() : torch::zeros_like(param);
}

// The shards FSDP should hold: `reference`'s parameters (or gradients)
// grouped by unit, flattened, zero-padded to a multiple of n, and cut into n
// slices; this returns slice `index`.
std::vector<at::Tensor> expectedShards(torch::nn::Module& reference, const std::vector<std::string>& prefixes,
                                       int64_t n, int64_t index, bool grads = false) {
  std::vector<at::Tensor> out;
  for (const auto& group : unitParameters(reference, prefixes)) {
    std::vector<at::Tensor> flats;
    for (const auto& item : group) flats.push_back(valueOrGrad(item.second, grads).reshape({-1}));
    at::Tensor flat = torch::cat(flats);
    const int64_t padded = (flat.numel() + n - 1) / n * n;
    flat = torch::cat({flat, torch::zeros({padded - flat.numel()})});
    out.push_back(flat.narrow(0, index * (padded / n), padded / n));
  }
  return out;
}

// Parameter by parameter: the part of each parameter (or gradient) this
// rank's shard holds must be within kRelTolerance of the reference's same
// part, relative to the norm of the reference's whole parameter.
void expectShardsMatchEachParameter(const std::vector<at::Tensor>& shards, torch::nn::Module& reference,
                                    const std::vector<std::string>& prefixes, int64_t n, int64_t index, bool grads,
                                    const std::string& what) {
  const auto groups = unitParameters(reference, prefixes);
  TESSERA_CHECK_EQ(shards.size(), groups.size());
  for (size_t u = 0; u < groups.size(); ++u) {
    const at::Tensor shard = grads ? shards[u].grad() : shards[u].detach();
    TESSERA_CHECK(shard.defined(), what << ": unit " << u << "'s shard has no gradient");
    const int64_t begin = index * shard.numel(), end = begin + shard.numel();
    int64_t offset = 0;  // the parameter's start in the unit's flat buffer
    for (const auto& [name, param] : groups[u]) {
      const at::Tensor expected = valueOrGrad(param, grads).reshape({-1});
      const int64_t from = std::max(begin, offset), to = std::min(end, offset + expected.numel());
      if (from < to) {
        const double diff =
            (shard.narrow(0, from - begin, to - from) - expected.narrow(0, from - offset, to - from)).norm().item<double>();
        const double scale = std::max(expected.norm().item<double>(), 1e-12);
        TESSERA_CHECK(diff / scale <= kRelTolerance,
                      what << ": '" << name << "' differs by relative " << diff / scale);
      }
      offset += expected.numel();
    }
  }
}

// Bytes of AdamW's exp_avg and exp_avg_sq over every parameter it has stepped.
int64_t adamStateBytes(torch::optim::Optimizer& optimizer) {
  int64_t bytes = 0;
  for (const auto& entry : optimizer.state()) {
    const auto& state = static_cast<const torch::optim::AdamWParamState&>(*entry.second);
    bytes += state.exp_avg().nbytes() + state.exp_avg_sq().nbytes();
  }
  return bytes;
}

int64_t numelOf(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// Parameters + AdamW state per rank must be 1/N of the unsharded amount, plus
// at most one padding element per unit (for the parameter and both moments),
// and the module itself must hold no parameter storage after the step.
void expectShardedMemory(int64_t heldBytes, int64_t adamBytes, int64_t fullNumel, int64_t units, int64_t n,
                         torch::nn::Module& module) {
  const int64_t unsharded = fullNumel * 4 * 3;  // parameters + exp_avg + exp_avg_sq
  const int64_t sharded = heldBytes + adamBytes;
  TESSERA_CHECK(sharded * n >= unsharded && sharded <= unsharded / n + units * 3 * 4,
                "per-rank bytes " << sharded << " vs unsharded " << unsharded << " / " << n);
  for (const auto& p : module.parameters()) TESSERA_CHECK_EQ(p.numel(), 0);
  std::printf("parameters + optimizer state: %lld bytes per rank, %lld unsharded (N = %lld)\n",
              static_cast<long long>(sharded), static_cast<long long>(unsharded), static_cast<long long>(n));
}

// ---- Workers ----------------------------------------------------------------

// Sequential model, units "0" and "1" plus a root: FSDP on N ranks vs DDP vs
// one process with the whole batch. Args: optim (sgd|adamw).
TESSERA_WORKER(fsdp_sequential) {
  const comm::CommPtr comm = ctx.world();
  const int n = comm->size();
  const int rank = comm->rank();
  constexpr int64_t kRows = 4;
  constexpr int kSteps = 4;

  torch::nn::Sequential reference = makeSequential(1);
  torch::nn::Sequential ddpModel = makeSequential(1);
  torch::nn::Sequential model = makeSequential(1 + rank);  // the broadcast must fix ranks > 0
  Fsdp fsdp(*model, sequentialUnits(model), comm);
  Ddp ddp(*ddpModel, comm);
  const auto layout = fsdp.layout();
  TESSERA_CHECK_EQ(layout.size(), 3u);
  TESSERA_CHECK_EQ(layout[0].numel, kIn * kHidden + kHidden);
  TESSERA_CHECK_EQ(layout[2].name, "<root>");
  for (const auto& unit : layout) TESSERA_CHECK_EQ(unit.paddedNumel, (unit.numel + n - 1) / n * n);

  auto optimizer = makeOptimizer(ctx.arg("optim"), fsdp.shards());
  auto ddpOptimizer = makeOptimizer(ctx.arg("optim"), ddpModel->parameters());
  auto referenceOptimizer = makeOptimizer(ctx.arg("optim"), reference->parameters());
  for (int step = 0; step < kSteps; ++step) {
    const auto [x, y] = globalBatch(step, n * kRows);
    const at::Tensor xs = x.narrow(0, rank * kRows, kRows), ys = y.narrow(0, rank * kRows, kRows);
    optimizer->zero_grad();
    fsdp.beforeForward();
    torch::mse_loss(forwardSharded(fsdp, model, xs), ys).backward();
    fsdp.finishGradientSync();
    const double norm = fsdp.gradNorm();
    optimizer->step();

    ddpOptimizer->zero_grad();
    torch::mse_loss(ddpModel->forward(xs), ys).backward();
    ddp.finishGradientSync();
    ddpOptimizer->step();

    referenceOptimizer->zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    expectRelNear(norm, localGradNorm(reference->parameters()), "gradNorm at step " + std::to_string(step));
    referenceOptimizer->step();
  }
  if (ctx.arg("optim") == "adamw") {
    expectShardedMemory(fsdp.heldParameterBytes(), adamStateBytes(*optimizer), numelOf(reference->parameters()),
                        3, n, *model);
  }
  fsdp.unshard();
  expectClose(*model, *reference, ctx.arg("optim") + " vs single process");
  expectClose(*model, *ddpModel, ctx.arg("optim") + " vs DDP");
  const DataParallelStats stats = fsdp.stats();
  TESSERA_CHECK(stats.bytes > 0 && stats.commSeconds > 0, "no communication was recorded");
  TESSERA_CHECK(stats.exposedSeconds >= 0, "exposed " << stats.exposedSeconds);
}

// Tiny GPT through the DataParallel interface (the training loop's view):
// FSDP over the world, or hybrid dp_replicate(2) x dp_shard(2) from a
// DeviceMesh. Args: optim (sgd|adamw), hybrid (0|1).
TESSERA_WORKER(fsdp_gpt) {
  const comm::CommPtr world = ctx.world();
  const int ranks = world->size();
  const int rank = world->rank();  // = the data-parallel index (dp_replicate outermost)
  const bool hybrid = ctx.arg("hybrid") == "1";
  constexpr int64_t kRows = 2;
  constexpr int kSteps = 3;

  comm::CommPtr shardComm = world, replicateComm;
  std::unique_ptr<DeviceMesh> mesh;
  if (hybrid) {
    MeshShape shape;
    shape.dp_replicate = 2;
    shape.dp_shard = ranks / 2;
    mesh = std::make_unique<DeviceMesh>(world, shape);
    shardComm = mesh->comm(MeshAxis::kDpShard);
    replicateComm = mesh->comm(MeshAxis::kDpReplicate);
  }

  models::Gpt reference(tinyGpt(5));
  models::Gpt ddpModel(tinyGpt(5));
  models::Gpt model(tinyGpt(5 + rank));  // the broadcast must fix ranks > 0
  auto dp = makeFsdpDataParallel(*model, shardComm, replicateComm);
  auto ddp = makeDdpDataParallel(*ddpModel, world);
  TESSERA_CHECK_EQ(dp->name(), hybrid ? "hybrid" : "fsdp");

  auto optimizer = makeOptimizer(ctx.arg("optim"), dp->optimizerParameters());
  auto ddpOptimizer = makeOptimizer(ctx.arg("optim"), ddp->optimizerParameters());
  auto referenceOptimizer = makeOptimizer(ctx.arg("optim"), reference->parameters());
  for (int step = 0; step < kSteps; ++step) {
    const auto [idx, targets] = tokenBatch(step, ranks * kRows);
    const at::Tensor mine = idx.narrow(0, rank * kRows, kRows), myTargets = targets.narrow(0, rank * kRows, kRows);
    for (auto* run : {dp.get(), ddp.get()}) {
      auto& opt = run == dp.get() ? *optimizer : *ddpOptimizer;
      auto& net = run == dp.get() ? model : ddpModel;
      opt.zero_grad();
      run->beforeForward();
      net->loss(mine, myTargets).backward();
      run->finishGradientSync();
      const double norm = run->gradNorm();
      if (run == dp.get()) {
        referenceOptimizer->zero_grad();
        reference->loss(idx, targets).backward();
        expectRelNear(norm, localGradNorm(reference->parameters()), "gradNorm at step " + std::to_string(step));
      }
      opt.step();
    }
    referenceOptimizer->step();
  }
  // FSDP's shards vs the same slices of the single-process and DDP models.
  const std::vector<std::string> prefixes = {"blocks.0", "blocks.1"};
  const auto shards = dp->optimizerParameters();
  const auto fromReference = expectedShards(*reference, prefixes, shardComm->size(), shardComm->rank());
  const auto fromDdp = expectedShards(*ddpModel, prefixes, shardComm->size(), shardComm->rank());
  TESSERA_CHECK_EQ(shards.size(), fromReference.size());
  for (size_t u = 0; u < shards.size(); ++u) {
    expectRelClose(shards[u].detach(), fromReference[u], "shard " + std::to_string(u) + " vs single process");
    expectRelClose(shards[u].detach(), fromDdp[u], "shard " + std::to_string(u) + " vs DDP");
  }
  if (ctx.arg("optim") == "adamw") {
    expectShardedMemory(numelOf(shards) * 4, adamStateBytes(*optimizer), numelOf(reference->parameters()), 3,
                        shardComm->size(), *model);
  }
  const DataParallelStats stats = dp->stats();
  TESSERA_CHECK(stats.bytes > 0 && stats.commSeconds > 0, "no communication was recorded");
  expectPerCommSumsToTotal(stats);
  TESSERA_CHECK_EQ(stats.bytesByComm.size(), hybrid ? 2u : 1u);  // dp_shard (and dp_replicate)
  std::printf("rank %d: %s comm %.6f s, exposed %.6f s, %lld bytes\n", rank, dp->name().c_str(), stats.commSeconds,
              stats.exposedSeconds, static_cast<long long>(stats.bytes));
}

// Two micro-batches per step, the first inside noSync(): equals one big
// batch, and the noSync micro-batch reduce-scatters nothing.
TESSERA_WORKER(fsdp_no_sync) {
  const comm::CommPtr comm = ctx.world();
  const int n = comm->size();
  const int rank = comm->rank();
  constexpr int64_t kRows = 3;
  constexpr int kMicro = 2;
  constexpr int kSteps = 3;

  torch::nn::Sequential reference = makeSequential(7);
  torch::nn::Sequential model = makeSequential(7);
  Fsdp fsdp(*model, sequentialUnits(model), comm);
  torch::optim::SGD optimizer(fsdp.shards(), torch::optim::SGDOptions(0.1));
  torch::optim::SGD referenceOptimizer(reference->parameters(), torch::optim::SGDOptions(0.1));

  for (int step = 0; step < kSteps; ++step) {
    const auto [x, y] = globalBatch(step, kMicro * n * kRows);
    // Micro-batch m of rank r: rows [(m*N + r)*b, +b).
    auto microLoss = [&, &x = x, &y = y](int micro) {
      const int64_t start = (micro * n + rank) * kRows;
      fsdp.beforeForward();
      return torch::mse_loss(forwardSharded(fsdp, model, x.narrow(0, start, kRows)), y.narrow(0, start, kRows)) /
             kMicro;
    };
    optimizer.zero_grad();
    const uint64_t callsBefore = comm->stats().of(comm::OpKind::kReduceScatter).calls;
    {
      auto noSync = fsdp.noSync();
      microLoss(0).backward();
      fsdp.finishGradientSync();  // inside noSync: does nothing
    }
    TESSERA_CHECK_EQ(comm->stats().of(comm::OpKind::kReduceScatter).calls, callsBefore);
    microLoss(1).backward();
    fsdp.finishGradientSync();
    TESSERA_CHECK_EQ(comm->stats().of(comm::OpKind::kReduceScatter).calls, callsBefore + 3);  // 2 units + root
    optimizer.step();

    referenceOptimizer.zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    referenceOptimizer.step();
  }
  fsdp.unshard();
  expectClose(*model, *reference, "noSync accumulation");
}

// Per-unit communicators on 2 ranks: unit "0" is sharded over a single-rank
// comm of its own (so its gradient is this rank's, not averaged), unit "1"
// and the root over the world. Also the traffic split per communicator.
TESSERA_WORKER(fsdp_unit_comms) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  constexpr int64_t kRows = 3;
  const comm::CommPtr solo = comm::makeSingleRankCommunicator("solo");

  torch::nn::Sequential local = makeSequential(3);   // reference: this rank's rows
  torch::nn::Sequential global = makeSequential(3);  // reference: every rank's rows
  torch::nn::Sequential model = makeSequential(3);
  std::vector<FsdpUnitSpec> units = sequentialUnits(model);
  units[0].shardComm = solo;
  Fsdp fsdp(*model, units, world);
  const auto layout = fsdp.layout();
  TESSERA_CHECK_EQ(layout[0].paddedNumel, layout[0].numel);  // one rank: no padding

  const auto [x, y] = globalBatch(0, n * kRows);
  fsdp.beforeForward();
  torch::mse_loss(forwardSharded(fsdp, model, x.narrow(0, rank * kRows, kRows)), y.narrow(0, rank * kRows, kRows))
      .backward();
  fsdp.finishGradientSync();
  torch::mse_loss(local->forward(x.narrow(0, rank * kRows, kRows)), y.narrow(0, rank * kRows, kRows)).backward();
  torch::mse_loss(global->forward(x), y).backward();

  const auto shards = fsdp.shards();
  expectRelClose(shards[0].grad(), expectedShards(*local, {"0", "1"}, 1, 0, /*grads=*/true)[0],
                 "unit 0 (solo) vs this rank's gradient");
  const auto fromGlobal = expectedShards(*global, {"0", "1"}, n, rank, /*grads=*/true);
  expectRelClose(shards[1].grad(), fromGlobal[1], "unit 1 vs the global gradient");
  expectRelClose(shards[2].grad(), fromGlobal[2], "root vs the global gradient");

  // Unit 0 counts once (solo), unit 1 and the root over the world.
  const double soloSquares = shards[0].grad().pow(2).sum().item<double>();
  const double worldSquares = fromGlobal[1].pow(2).sum().item<double>() + fromGlobal[2].pow(2).sum().item<double>();
  at::Tensor worldTotal = torch::full({1}, worldSquares, torch::kDouble);
  world->allReduce(worldTotal, comm::ReduceOp::kSum);
  expectRelNear(fsdp.gradNorm(), std::sqrt(soloSquares + worldTotal.item<double>()), "gradNorm over two comms");

  const DataParallelStats stats = fsdp.stats();
  expectPerCommSumsToTotal(stats);
  // Unit 0: one gather in forward, one in backward, one reduce-scatter.
  TESSERA_CHECK_EQ(stats.bytesByComm.at("solo"), 3 * layout[0].paddedNumel * 4);
  TESSERA_CHECK_EQ(stats.bytesByComm.at(world->name()), stats.bytes - 3 * layout[0].paddedNumel * 4);
}

// An MoE GPT (aux loss included) or a GPT with dropout on 2 ranks vs one
// process that runs each rank's batch as its own forward, with that rank's
// random key, and averages: loss, every gradient and gradNorm at every step,
// every parameter after the last of several AdamW steps. Args: variant (moe|dropout).
TESSERA_WORKER(fsdp_gpt_variant) {
  const comm::CommPtr world = ctx.world();
  const int n = world->size();
  const int rank = world->rank();
  constexpr int64_t kRows = 2;
  constexpr int kSteps = 3;

  models::GptConfig config = tinyGpt(11);
  if (ctx.arg("variant") == "moe") {
    config.use_moe = true;
    config.moe.num_experts = 4;
    config.moe.top_k = 2;
    config.moe.capacity_factor = 1.0;  // capacity per forward: tokens are dropped
    config.moe.aux_loss_weight = 0.1;  // large enough that a lost aux gradient shows
  } else {
    TESSERA_CHECK_EQ(ctx.arg("variant"), "dropout");
    config.dropout = 0.2;
  }
  models::Gpt reference(config);
  models::Gpt model(config);
  auto dp = makeFsdpDataParallel(*model, world);
  auto optimizer = makeOptimizer("adamw", dp->optimizerParameters());
  auto referenceOptimizer = makeOptimizer("adamw", reference->parameters());
  const std::vector<std::string> prefixes = {"blocks.0", "blocks.1"};

  for (int step = 0; step < kSteps; ++step) {
    const auto [idx, targets] = tokenBatch(step, n * kRows);
    const std::string when = " at step " + std::to_string(step);
    // Micro-batch number = the data-parallel rank (one micro-batch per step):
    // each rank draws its own masks (DropoutKey's contract).
    optimizer->zero_grad();
    model->setRandomKey(step, rank);
    dp->beforeForward();
    const at::Tensor loss = model->loss(idx.narrow(0, rank * kRows, kRows), targets.narrow(0, rank * kRows, kRows));
    loss.backward();
    dp->finishGradientSync();
    const double norm = dp->gradNorm();

    referenceOptimizer->zero_grad();
    double rankLoss = 0;
    for (int r = 0; r < n; ++r) {
      reference->setRandomKey(step, r);
      const at::Tensor l = reference->loss(idx.narrow(0, r * kRows, kRows), targets.narrow(0, r * kRows, kRows));
      (l / n).backward();
      if (r == rank) rankLoss = l.item<double>();
    }
    expectRelNear(loss.item<double>(), rankLoss, "loss" + when);
    expectShardsMatchEachParameter(dp->optimizerParameters(), *reference, prefixes, n, rank, /*grads=*/true,
                                   "gradient" + when);
    expectRelNear(norm, localGradNorm(reference->parameters()), "gradNorm" + when);
    optimizer->step();
    referenceOptimizer->step();
  }
  expectShardsMatchEachParameter(dp->optimizerParameters(), *reference, prefixes, n, rank, /*grads=*/false,
                                 "parameter after " + std::to_string(kSteps) + " AdamW steps");
}

testing::RunOptions options(int ranks, std::map<std::string, std::string> args, std::string backend = "gloo") {
  testing::RunOptions run;
  run.ranks = ranks;
  run.backend = std::move(backend);
  run.deadline = std::chrono::seconds(60);
  run.args = std::move(args);
  return run;
}

// ---- In-process tests ---------------------------------------------------------

TEST(FsdpLayout, UnitsPaddingAndEmptyModuleParameters) {
  torch::nn::Sequential model = makeSequential(1);
  Fsdp fsdp(*model, sequentialUnits(model), comm::makeSingleRankCommunicator());
  const auto layout = fsdp.layout();
  ASSERT_EQ(layout.size(), 3u);
  EXPECT_EQ(layout[0].name, "0");
  EXPECT_EQ(layout[0].numel, 63);
  EXPECT_EQ(layout[1].numel, 90);
  EXPECT_EQ(layout[2].name, "<root>");
  EXPECT_EQ(layout[2].numel, 30);
  for (const auto& p : model->parameters()) EXPECT_EQ(p.numel(), 0);
  EXPECT_EQ(fsdp.heldParameterBytes(), (63 + 90 + 30) * 4);
  fsdp.unshard();
  EXPECT_EQ(fsdp.heldParameterBytes(), 2 * (63 + 90 + 30) * 4);
  torch::nn::Sequential fresh = makeSequential(1);
  expectClose(*model, *fresh, "after unshard");
  fsdp.reshard();
  EXPECT_EQ(fsdp.heldParameterBytes(), (63 + 90 + 30) * 4);
}

TEST(FsdpLayout, SingleRankStepMatchesPlainModel) {
  torch::nn::Sequential reference = makeSequential(2);
  torch::nn::Sequential model = makeSequential(2);
  Fsdp fsdp(*model, sequentialUnits(model), comm::makeSingleRankCommunicator());
  const auto [x, y] = globalBatch(0, 5);
  fsdp.beforeForward();
  torch::mse_loss(forwardSharded(fsdp, model, x), y).backward();
  fsdp.finishGradientSync();
  torch::mse_loss(reference->forward(x), y).backward();
  EXPECT_NEAR(fsdp.gradNorm(), localGradNorm(reference->parameters()), 1e-6);
  EXPECT_EQ(fsdp.heldParameterBytes(), (63 + 90 + 30) * 4);  // the root was freed again
}

TEST(FsdpLayout, RejectsBadArguments) {
  torch::nn::Sequential model = makeSequential(1);
  EXPECT_THROW(Fsdp(*model, sequentialUnits(model), nullptr), InvalidArgument);
  std::vector<FsdpUnitSpec> unknown = {{"nope", [](const at::Tensor& x) { return x; }}};
  EXPECT_THROW(Fsdp(*model, unknown, comm::makeSingleRankCommunicator()), InvalidArgument);
  // forwardUnit() would drop an aux loss's gradient: it refuses.
  Fsdp fsdp(*model, sequentialUnitsWithAux(model), comm::makeSingleRankCommunicator());
  EXPECT_THROW(fsdp.forwardUnit(0, torch::randn({2, kIn})), InvalidArgument);
}

// A unit's aux loss carries gradient into the unit: FSDP (one rank) vs the
// plain model with the same loss mse + aux_0 + aux_1.
TEST(FsdpLayout, AuxLossGradientReachesTheUnit) {
  torch::nn::Sequential reference = makeSequential(4);
  torch::nn::Sequential model = makeSequential(4);
  Fsdp fsdp(*model, sequentialUnitsWithAux(model), comm::makeSingleRankCommunicator());
  const auto [x, y] = globalBatch(0, 5);
  fsdp.beforeForward();
  const FsdpUnitOutput first = fsdp.forwardUnitWithAux(0, x);
  const FsdpUnitOutput second = fsdp.forwardUnitWithAux(1, first.x);
  ASSERT_TRUE(first.aux.defined() && second.aux.defined());
  const at::Tensor out = model->ptr<torch::nn::LinearImpl>(2)->forward(second.x);
  (torch::mse_loss(out, y) + first.aux + second.aux).backward();
  fsdp.finishGradientSync();

  const at::Tensor h0 = reference->ptr<TanhLayerImpl>(0)->forward(x);
  const at::Tensor h1 = reference->ptr<TanhLayerImpl>(1)->forward(h0);
  (torch::mse_loss(reference->ptr<torch::nn::LinearImpl>(2)->forward(h1), y) + h0.pow(2).mean() + h1.pow(2).mean())
      .backward();
  expectShardsMatchEachParameter(fsdp.shards(), *reference, {"0", "1"}, 1, 0, /*grads=*/true, "aux gradient");
}

// ---- Multi-process tests ------------------------------------------------------

TEST(Fsdp, SequentialSgdMatchesDdpAndSingleProcess) {
  const auto result = testing::runWorkers("fsdp_sequential", options(2, {{"optim", "sgd"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, SequentialAdamWMatchesDdpAndSingleProcess) {
  const auto result = testing::runWorkers("fsdp_sequential", options(2, {{"optim", "adamw"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

// Every unit needs padding on 4 ranks (63, 90, 30 elements).
TEST(Fsdp, SequentialAdamWPaddedUnits4Ranks) {
  const auto result = testing::runWorkers("fsdp_sequential", options(4, {{"optim", "adamw"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, NoSyncAccumulationMatchesBigBatch) {
  const auto result = testing::runWorkers("fsdp_no_sync", options(2, {}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, GptAdamWMatchesDdpAndSingleProcess) {
  const auto result = testing::runWorkers("fsdp_gpt", options(2, {{"optim", "adamw"}, {"hybrid", "0"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, GptSgdMatchesDdpAndSingleProcess) {
  const auto result = testing::runWorkers("fsdp_gpt", options(2, {{"optim", "sgd"}, {"hybrid", "0"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, HybridGpt2x2AdamWMatchesDdpAndSingleProcess) {
  const auto result = testing::runWorkers("fsdp_gpt", options(4, {{"optim", "adamw"}, {"hybrid", "1"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, PerUnitCommunicators) {
  const auto result = testing::runWorkers("fsdp_unit_comms", options(2, {}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, MoeGptWithAuxLossMatchesPerRankForwards) {
  const auto result = testing::runWorkers("fsdp_gpt_variant", options(2, {{"variant", "moe"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, DropoutGptMatchesPerRankForwardsWithTheirKeys) {
  const auto result = testing::runWorkers("fsdp_gpt_variant", options(2, {{"variant", "dropout"}}));
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(Fsdp, GptAdamWOnMpi) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "MPI not built or mpirun not on PATH";
  const auto result = testing::runWorkers("fsdp_gpt", options(2, {{"optim", "adamw"}, {"hybrid", "0"}}, "mpi"));
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::parallel
