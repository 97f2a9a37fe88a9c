// Expert parallelism (expert_parallel.h) through parallelize(), in real
// processes, against one process computing the whole MoE GPT: each data
// rank's loss (with the aux loss), every parameter's synced gradient within
// 1e-5, and the logical gradient norm, with capacity drops in every batch
// (the capacity is below the token count). ep = 2 and 4, top-1 and top-2;
// ep x dp_shard (FSDP, experts their own units); ep x tp (TED) with and
// without duplicate-token dropping (and sequence parallelism); ep x
// dp_replicate (DDP, experts reduced over the replicas only). The ep
// communicator's bytes equal the all-to-all model. Also the all-to-all
// region alone and the configuration errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/parallel/expert_parallel.h"
#include "tessera/parallel/parallelize.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

using testing::sliceOf;

// 4 experts of a 2-block GPT; heads and hidden sizes split by tp = 2.
models::GptConfig moeGpt(const testing::WorkerContext& ctx) {
  models::GptConfig c;
  c.vocab_size = 37;
  c.block_size = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.d_model = 32;
  c.mlp_ratio = 2;
  c.dropout = std::stod(ctx.arg("dropout", "0.1"));
  c.tie_weights = true;
  c.seed = 13;
  c.use_moe = true;
  c.moe.num_experts = std::stoi(ctx.arg("experts", "4"));
  c.moe.top_k = std::stoi(ctx.arg("topk", "1"));
  // 24 tokens per forward: C = ceil(24/E * f * k) < 24 * k / E, so drops happen.
  c.moe.capacity_factor = std::stod(ctx.arg("capacity", "0.8"));
  c.moe.aux_loss_weight = 0.05;
  return c;
}

// Data rank r's batch: (2, 12) tokens, different per rank.
Batch batchOf(int dataRank) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(70 + dataRank);
  const at::Tensor all = at::randint(0, 37, {2, 13}, gen, at::kLong);
  const at::Tensor idx = all.narrow(1, 0, 12).contiguous();
  return Batch{idx, all.narrow(1, 1, 12).contiguous(), idx.numel()};
}

TESSERA_WORKER(ep_matches_one_process) {
  const comm::CommPtr world = ctx.world();
  ParallelConfig config;
  config.strategy = ctx.arg("strategy", "ddp");
  config.mesh.ep = std::stoi(ctx.arg("ep", "2"));
  config.mesh.tp = std::stoi(ctx.arg("tp", "1"));
  config.mesh.dp_shard = std::stoi(ctx.arg("ds", "1"));
  config.mesh.dp_replicate = std::stoi(ctx.arg("dr", "1"));
  config.moe_dtd = ctx.arg("dtd", "0") == "1";
  config.sequence_parallel = ctx.arg("sequence", "0") == "1";
  DeviceMesh mesh(world, config.mesh);
  const models::GptConfig gptConfig = moeGpt(ctx);
  models::Gpt gpt(gptConfig);
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, /*localUpdates=*/false);
  const int N = config.mesh.dp_replicate * config.mesh.dp_shard * config.mesh.ep;
  TESSERA_CHECK(pm.dataRanks == N, "ep is a data axis: " << N << " data ranks, got " << pm.dataRanks);
  // This rank holds E/ep experts per layer, named by global index.
  const int64_t local = gptConfig.moe.num_experts / config.mesh.ep;
  const int64_t first = mesh.coordinate(MeshAxis::kEp) * local;
  for (size_t i = 0; i < gpt->blocks->size(); ++i) {
    const auto& experts = gpt->blocks->at(i).moe->experts;
    TESSERA_CHECK(static_cast<int64_t>(experts->size()) == local && experts->globalIndex(0) == first,
                  "block " << i << " holds " << experts->size() << " experts from " << experts->globalIndex(0));
  }

  const comm::CommPtr& ep = mesh.comm(MeshAxis::kEp);
  const uint64_t epBefore = ep->stats().totalBytesSent();
  const double loss = pm.executor->forwardBackward({batchOf(pm.dataRank)}, /*step=*/2).value();
  const uint64_t epBytes = ep->stats().totalBytesSent() - epBefore;
  pm.dp->finishGradientSync();
  const double norm = pm.dp->gradNorm();

  // The reference: every data rank's batch as its own forward (capacity and
  // the aux loss are per forward), the mean loss's gradient.
  models::Gpt reference(gptConfig);
  auto refModel = makeTrainable(reference);
  double refLoss = 0;
  int64_t dropped = 0;
  for (int r = 0; r < N; ++r) {
    refModel->setRandomKey(2, r);  // the executor's key: data rank * micro-batches + i
    const at::Tensor l = refModel->loss(batchOf(r));
    if (r == pm.dataRank) refLoss = l.item<double>();
    (l / N).backward();
  }
  for (size_t i = 0; i < reference->blocks->size(); ++i) dropped += reference->blocks->at(i).moe->takeLoad().dropped;
  TESSERA_CHECK(dropped > 0, "the test batches must overflow some expert's capacity");
  TESSERA_CHECK(std::abs(loss - refLoss) <= 1e-5 * std::max(1.0, std::abs(refLoss)),
                "data rank " << pm.dataRank << " loss " << loss << " vs one process " << refLoss);

  double expectedNorm = 0;
  std::map<std::string, at::Tensor> whole;
  for (const auto& p : models::logicalParameters(*reference)) {
    whole[p.name] = p.tensor.grad();
    expectedNorm += p.tensor.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  expectedNorm = std::sqrt(expectedNorm);
  TESSERA_CHECK(std::abs(norm - expectedNorm) <= 1e-5 * expectedNorm,
                "gradNorm " << norm << " vs one process " << expectedNorm);

  const auto params = pm.dp->optimizerParameters();
  const auto layout = pm.dp->parameterLayout();
  double err = 0;
  std::string worst;
  int64_t checked = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor grad = params[i].grad().reshape({-1});
    for (const ParameterPiece& piece : layout[i]) {
      const at::Tensor expected = sliceOf(whole.at(piece.name), piece.slice);
      const double e = (grad.narrow(0, piece.tensorOffset, piece.slice.numel) - expected).abs().max().item<double>();
      if (e > err) {
        err = e;
        worst = piece.name;
      }
      checked += piece.slice.numel;
    }
  }
  TESSERA_CHECK(checked > 0, "no gradient compared");
  TESSERA_CHECK(err < 1e-5, "synced gradients differ from one process by " << err << " (worst: " << worst << ")");

  // The ep communicator carries only the all-to-alls: one forward and its
  // backward, FSDP's recomputation adding the forward's two exchanges again.
  const int64_t perPass = allToAllBytesPerPass(gptConfig, gptConfig.n_layer, batchOf(0).tokens, config.mesh.ep,
                                               config.mesh.tp, config.moe_dtd);
  const bool fsdp = config.strategy == "fsdp" || config.strategy == "hybrid";
  const int64_t expected = fsdp ? perPass / 2 * 3 : perPass;
  TESSERA_CHECK(static_cast<int64_t>(epBytes) == expected,
                "ep communicator sent " << epBytes << " bytes, the all-to-all model says " << expected);
  if (ctx.rank == 0) std::printf("ep bytes per step %llu\n", static_cast<unsigned long long>(epBytes));
}

void runEp(int ranks, std::map<std::string, std::string> args) {
  auto result = testing::runWorkers("ep_matches_one_process", {.ranks = ranks, .args = std::move(args)});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(ExpertParallel, Ep2Top1) { runEp(2, {{"ep", "2"}, {"topk", "1"}}); }
TEST(ExpertParallel, Ep4Top2) { runEp(4, {{"ep", "4"}, {"topk", "2"}}); }
TEST(ExpertParallel, Ep2TimesFsdp2) { runEp(4, {{"ep", "2"}, {"ds", "2"}, {"strategy", "fsdp"}, {"topk", "2"}}); }
TEST(ExpertParallel, Ep2TimesDdp2) { runEp(4, {{"ep", "2"}, {"dr", "2"}, {"topk", "1"}}); }
TEST(ExpertParallel, Ep2TimesTp2Ted) { runEp(4, {{"ep", "2"}, {"tp", "2"}, {"topk", "2"}}); }
// C = ceil(24/4 * 0.8) = 5: padded to 6 slots for the split over tp.
TEST(ExpertParallel, Ep2TimesTp2DuplicateTokenDropping) {
  runEp(4, {{"ep", "2"}, {"tp", "2"}, {"dtd", "1"}, {"topk", "1"}});
}
TEST(ExpertParallel, Ep2TimesTp2DtdSequenceParallel) {
  runEp(4, {{"ep", "2"}, {"tp", "2"}, {"dtd", "1"}, {"sequence", "1"}, {"topk", "2"}, {"strategy", "fsdp"},
            {"ds", "1"}});
}

// The region alone: an (E, C, M) buffer whose rows name their sender, and
// the backward of a weighted sum routed back to its source.
TESSERA_WORKER(all_to_all_region) {
  const comm::CommPtr world = ctx.world();
  const int p = world->size(), r = world->rank();
  const at::Tensor x = (at::arange(p * 3 * 2, at::kFloat).view({p, 3, 2}) + 100 * r).requires_grad_();
  const at::Tensor y = allToAllRegion(x, 0, 1, world);  // (1, 3p, 2): block r of every rank
  for (int s = 0; s < p; ++s) {
    const at::Tensor want = at::arange(p * 3 * 2, at::kFloat).view({p, 3, 2})[r] + 100 * s;
    TESSERA_CHECK(at::equal(y[0].narrow(0, 3 * s, 3), want), "rank " << r << " got a wrong block from " << s);
  }
  (y * (r + 1)).sum().backward();  // d/dx of rank s's block r is r + 1 on every element
  for (int j = 0; j < p; ++j) {
    TESSERA_CHECK(at::allclose(x.grad()[j], at::full({3, 2}, static_cast<double>(j + 1))),
                  "gradient of block " << j << " is " << x.grad()[j]);
  }
}

TEST(ExpertParallel, AllToAllRegionAndItsBackward) {
  auto result = testing::runWorkers("all_to_all_region", {.ranks = 3});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(ExpertParallel, ConfigErrorsNameTheKeys) {
  ParallelConfig config;
  config.mesh.ep = 2;
  config.strategy = "none";
  try {
    config.validate(2);
    FAIL() << "strategy none with ep > 1 must be refused";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "parallel.strategy");
  }
  config.strategy = "ddp";
  const DataParallelPlan plan = config.resolve(2);
  EXPECT_EQ(plan.expertGradientScale, 0.5);
  EXPECT_EQ(plan.dataAxes.size(), 3u);

  models::GptConfig dense;
  models::Gpt plain(dense);
  auto plainModel = makeTrainable(plain);
  try {
    applyExpertParallel(*plainModel, comm::makeSingleRankCommunicator("ep"), /*duplicateTokenDropping=*/true);
    FAIL() << "a dense GPT has no experts' slots to split";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "parallel.moe_dtd");
  }
}

}  // namespace
}  // namespace tessera::parallel
