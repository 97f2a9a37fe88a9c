// The communication-light optimizers on tensor-parallel shards.
//
// DeMo's chunking of shards (optim/demo.h): in one process, shards holding
// aligned boxes of a logical tensor (three row blocks each, like a tp shard of
// qkv; a cut that only the logical chunk aligns with) step exactly as the
// whole tensor does, and misaligned ones fall back to their own shape.
//
// Through parallelize() on 4 ranks (dp_replicate = 2 x tp = 2, local updates,
// optimizers built as the launcher's makeJobOptimizer builds them): DiLoCo
// (plain and two fragments), DeMo and MT-DAO leave every shard equal to its
// part of the same optimizer at tp = 1 -- which every rank computes beside it
// with a whole GPT over a 2-rank group of the ranks sharing its tp coordinate
// (replica r of the reference reads replica r's batches).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/optim/demo.h"
#include "tessera/optim/diloco.h"
#include "tessera/optim/mt_dao.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/parallelize.h"
#include "tests/harness/multiprocess.h"

namespace tessera::optim {
namespace {

using parallel::ParameterPiece;

// The elements of whole tensor `whole` that `slice` names, flat.
at::Tensor sliceOf(const at::Tensor& whole, const TensorSlice& slice) {
  at::Tensor out = at::empty({slice.numel}, whole.options());
  copyOverlap(TensorSlice::whole(whole.sizes().vec()), whole.detach().contiguous().reshape({-1}), slice, out);
  return out;
}

// What a shard holding `boxes` of `whole` (one after the other) holds, flat, and its layout.
struct Shard {
  at::Tensor values;
  std::vector<ParameterPiece> pieces;
};
Shard shardOf(const at::Tensor& whole, const std::vector<TensorSlice>& boxes) {
  Shard shard;
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (const TensorSlice& box : boxes) {
    parts.push_back(sliceOf(whole, box));
    shard.pieces.push_back(ParameterPiece{"w", whole.sizes().vec(), box, offset});
    offset += box.numel;
  }
  shard.values = at::cat(parts);
  return shard;
}

// Three DeMo steps on one worker (no communicator): the whole tensor, and each
// shard of `cuts` with its layout (or, with `layout` false, as a plain tensor).
// Returns the largest difference between a shard and its boxes of the whole.
double shardsAgainstWhole(const std::vector<int64_t>& shape, int64_t chunk,
                          const std::vector<std::vector<TensorSlice>>& cuts, bool layout) {
  DemoConfig config;
  config.compression_chunk = chunk;
  config.compression_topk = 3;
  config.compression_decay = 0.9;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  at::Tensor whole = at::randn(shape, gen, at::kDouble);
  std::vector<at::Tensor> grads;
  for (int step = 0; step < 3; ++step) grads.push_back(at::randn(shape, gen, at::kDouble));

  std::vector<at::Tensor> shards;
  std::vector<std::vector<ParameterPiece>> pieces;
  for (const auto& boxes : cuts) {
    Shard s = shardOf(whole, boxes);
    shards.push_back(s.values);
    pieces.push_back(s.pieces);
  }
  auto wholeOpt = makeDemo(config, {whole}, nullptr, 0.01);
  std::vector<std::unique_ptr<Optimizer>> shardOpts;
  for (size_t i = 0; i < shards.size(); ++i) {
    shardOpts.push_back(makeDemo(config, {shards[i]}, nullptr, 0.01, layout ? DemoLayout{pieces[i]} : DemoLayout{}));
  }
  for (const at::Tensor& g : grads) {
    whole.mutable_grad() = g;
    wholeOpt->step();
    for (size_t i = 0; i < shards.size(); ++i) {
      shards[i].mutable_grad() = shardOf(g, cuts[i]).values;
      shardOpts[i]->step();
    }
  }
  double err = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    err = std::max(err, (shards[i] - shardOf(whole, cuts[i]).values).abs().max().item<double>());
  }
  return err;
}

TensorSlice box(std::vector<int64_t> offsets, std::vector<int64_t> sizes) {
  return TensorSlice::box(std::move(offsets), std::move(sizes));
}

// A (48, 16) "qkv" split by heads over 2 ranks: each holds rows [8r, 8r + 8) of
// q, k and v. Logical chunks of 8 x 8 (compression_chunk 8) align.
const std::vector<std::vector<TensorSlice>> kQkvCuts = {
    {box({0, 0}, {8, 16}), box({16, 0}, {8, 16}), box({32, 0}, {8, 16})},
    {box({8, 0}, {8, 16}), box({24, 0}, {8, 16}), box({40, 0}, {8, 16})}};

TEST(DemoShards, AlignedRowBlocksStepAsTheWholeTensor) {
  EXPECT_LT(shardsAgainstWhole({48, 16}, 8, kQkvCuts, /*layout=*/true), 1e-12);
}

TEST(DemoShards, AlignedColumnSplitStepsAsTheWholeTensor) {
  const std::vector<std::vector<TensorSlice>> cuts = {{box({0, 0}, {16, 16})}, {box({0, 16}, {16, 16})}};
  EXPECT_LT(shardsAgainstWhole({16, 32}, 8, cuts, /*layout=*/true), 1e-12);
}

// 140 elements with compression_chunk 25: the logical chunk is 20. A shard of
// 120 would chunk itself by 24, so only the layout makes it match the whole.
TEST(DemoShards, ChunksComeFromTheLogicalTensorNotTheShard) {
  const std::vector<std::vector<TensorSlice>> cuts = {{box({0}, {120})}, {box({120}, {20})}};
  EXPECT_LT(shardsAgainstWhole({140}, 25, cuts, /*layout=*/true), 1e-12);
  EXPECT_GT(shardsAgainstWhole({140}, 25, cuts, /*layout=*/false), 1e-3) << "the check has no teeth";
}

// Row blocks of 8 against logical chunks of 16: chunked as the shard's own
// (24, 16) tensor, exactly as with no layout; payload likewise.
TEST(DemoShards, MisalignedPiecesFallBackToTheShardsOwnShape) {
  DemoConfig config;
  config.compression_chunk = 16;
  config.compression_topk = 5;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor whole = at::randn({48, 16}, gen, at::kDouble);
  const Shard shard = shardOf(whole, kQkvCuts[0]);
  at::Tensor withLayout = shard.values.reshape({24, 16}).clone();
  at::Tensor plain = withLayout.clone();
  auto a = makeDemo(config, {withLayout}, nullptr, 0.01, DemoLayout{shard.pieces});
  auto b = makeDemo(config, {plain}, nullptr, 0.01);
  EXPECT_EQ(demo::payloadBytesPerStep(config, {withLayout}, DemoLayout{shard.pieces}),
            demo::payloadBytesPerStep(config, {plain}));
  for (int step = 0; step < 3; ++step) {
    const at::Tensor g = at::randn({24, 16}, gen, at::kDouble);
    withLayout.mutable_grad() = g;
    plain.mutable_grad() = g.clone();
    a->step();
    b->step();
  }
  testing::expectTensorsEqual(withLayout, plain, "misaligned shard vs plain tensor");
  EXPECT_THROW(makeDemo(config, {withLayout, plain}, nullptr, 0.01, DemoLayout{shard.pieces}), InvalidArgument);
}

// --- Through parallelize(): tp = 2 per replica against tp = 1 --------------

// 4 heads of 8 over 2 tp ranks; every dimension a multiple of 16 so that
// DeMo's logical chunks of 8 align with every shard.
models::GptConfig gptConfig() {
  models::GptConfig c;
  c.vocab_size = 64;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 4;
  c.d_model = 32;
  c.mlp_ratio = 2;
  c.tie_weights = true;
  c.seed = 7;
  return c;
}

Batch batchOf(int step, int replica) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + 10 * step + replica);
  const at::Tensor all = at::randint(0, 64, {2, 9}, gen, at::kLong);
  const at::Tensor idx = all.narrow(1, 0, 8).contiguous();
  return Batch{idx, all.narrow(1, 1, 8).contiguous(), idx.numel()};
}

// launcher/train_job.cc's layerGroups: the block index of each optimizer
// tensor, everything else one more group.
std::vector<int> layerGroups(const parallel::DataParallel& dp) {
  std::vector<int> blockOf;
  int maxBlock = -1;
  for (const auto& pieces : dp.parameterLayout()) {
    const std::string& name = pieces.front().name;
    blockOf.push_back(name.rfind("blocks.", 0) == 0 ? std::atoi(name.c_str() + 7) : -1);
    maxBlock = std::max(maxBlock, blockOf.back());
  }
  for (int& b : blockOf) b = b >= 0 ? b : maxBlock + 1;
  return blockOf;
}

// As makeJobOptimizer builds `name` over the strategy's tensors.
std::unique_ptr<Optimizer> jobOptimizer(const std::string& name, int fragments, parallel::DataParallel& dp,
                                        comm::CommPtr replicas) {
  const std::vector<at::Tensor> parameters = dp.optimizerParameters();
  if (name == "diloco") {
    DilocoConfig config;
    config.inner_steps = 2;
    config.fragments = fragments;
    auto inner = makeOptimizer(OptimizerConfig{}, parameters, 1e-2);
    return makeDiloco(config, std::move(inner), parameters, replicas, layerGroups(dp));
  }
  if (name == "demo") {
    DemoConfig config;
    config.compression_chunk = 8;
    config.compression_topk = 4;
    return makeDemo(config, parameters, replicas, 1e-3, dp.parameterLayout());
  }
  MtDaoConfig config;
  config.betas = {0.9};
  config.sync_params = 2;
  config.sync_momenta = {2};
  config.sync_second = 2;
  return makeMtDao(config, parameters, replicas, 1e-2);
}

// One training step as the Trainer takes it (no clipping).
void trainStep(Optimizer& opt, parallel::ParallelModel& pm, int step, int replica) {
  opt.zeroGrad();
  pm.executor->forwardBackward({batchOf(step, replica)}, step);
  pm.dp->finishGradientSync();
  opt.step();
}

// One case: `name` (with `fragments` for DiLoCo) at tp = 2 per replica and at
// tp = 1, 4 steps each, on fresh models; throws naming the case on a mismatch.
// fp64 models: the key bias has a zero gradient in exact arithmetic, and
// AdamW / ADOPT normalize it, so in fp32 rounding noise there becomes a real
// step that differs between layouts. DeMo's sign() still turns that noise
// into +-lr steps whatever the precision, so for DeMo the key bias (rows
// [C, 2C) of qkv.bias; it cannot change the loss) is left out of the check.
void expectTp2MatchesTp1(const comm::CommPtr& world, parallel::DeviceMesh& mesh, const std::string& name,
                         int fragments) {
  parallel::ParallelConfig config;
  config.strategy = "none";
  config.mesh = mesh.shape();
  const int replica = mesh.coordinate(parallel::MeshAxis::kDpReplicate);
  const std::string what = name + (fragments > 1 ? " with " + std::to_string(fragments) + " fragments" : "");

  models::Gpt gpt(gptConfig());
  gpt->to(at::kDouble);
  auto model = makeTrainable(gpt);
  parallel::ParallelModel pm = parallel::parallelize(*model, mesh, config, /*localUpdates=*/true);
  TESSERA_CHECK(pm.replicas == 2 && pm.dataRanks == 2, "2 replicas, 2 data ranks");
  auto opt = jobOptimizer(name, fragments, *pm.dp, pm.replicaComm);

  // tp = 1: the ranks of this tp coordinate, one whole GPT per replica.
  const comm::CommPtr refComm =
      world->split(mesh.coordinate(parallel::MeshAxis::kTp), replica, "tp1_" + name + std::to_string(fragments));
  models::Gpt reference(gptConfig());
  reference->to(at::kDouble);
  auto refModel = makeTrainable(reference);
  parallel::ParallelModel ref;
  ref.dp = parallel::makeNoDataParallel(*reference);
  ref.executor = parallel::makeLocalStepExecutor(*refModel, *ref.dp, replica);
  auto refOpt = jobOptimizer(name, fragments, *ref.dp, refComm);

  std::map<std::string, at::Tensor> initial;
  for (const auto& p : models::logicalParameters(*reference)) initial[p.name] = p.tensor.detach().clone();
  for (int step = 0; step < 4; ++step) {
    trainStep(*opt, pm, step, replica);
    trainStep(*refOpt, ref, step, replica);
  }

  std::map<std::string, at::Tensor> whole;
  for (const auto& p : models::logicalParameters(*reference)) whole[p.name] = p.tensor.detach();
  const int64_t C = gptConfig().d_model;
  double err = 0, moved = 0;
  std::string worst;
  const auto params = pm.dp->optimizerParameters();
  const auto layout = pm.dp->parameterLayout();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor local = params[i].detach().reshape({-1});
    for (const ParameterPiece& piece : layout[i]) {
      const bool keyBias = piece.name.find("attn.qkv.bias") != std::string::npos && piece.slice.offsets[0] >= C &&
                           piece.slice.offsets[0] < 2 * C;
      if (name == "demo" && keyBias) continue;
      const at::Tensor mine = local.narrow(0, piece.tensorOffset, piece.slice.numel);
      const double e = (mine - sliceOf(whole.at(piece.name), piece.slice)).abs().max().item<double>();
      moved = std::max(moved, (mine - sliceOf(initial.at(piece.name), piece.slice)).abs().max().item<double>());
      if (e > err) {
        err = e;
        worst = piece.name + " " + piece.slice.text();
      }
    }
  }
  TESSERA_CHECK(moved > 1e-3, what << ": the parameters hardly moved (" << moved << "), the check has no teeth");
  TESSERA_CHECK(err < 1e-5, what << " at tp = 2 differs from tp = 1 by " << err << " at " << worst);
}

// Every case in one run of 4 ranks (spawning them is most of the cost).
TESSERA_WORKER(tp_local_updates_match_tp1) {
  const comm::CommPtr world = ctx.world();
  parallel::MeshShape shape;
  shape.dp_replicate = 2;
  shape.tp = 2;
  parallel::DeviceMesh mesh(world, shape);
  expectTp2MatchesTp1(world, mesh, "diloco", 1);
  expectTp2MatchesTp1(world, mesh, "diloco", 2);
  expectTp2MatchesTp1(world, mesh, "demo", 1);
  expectTp2MatchesTp1(world, mesh, "mt-dao", 1);
}

// DiLoCo (plain, and streaming with 2 fragments: 2 outer steps each), DeMo
// with aligned chunks, MT-DAO (everything averaged every 2 steps).
TEST(TensorParallelLocalUpdates, DilocoDemoMtDaoAtTp2PerReplicaMatchTp1) {
  auto result = testing::runWorkers("tp_local_updates_match_tp1", {.ranks = 4});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::optim
