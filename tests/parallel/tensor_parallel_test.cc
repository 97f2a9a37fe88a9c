// The GPT in tensor-parallel form (GptImpl::applyTensorParallel over the
// regions of tp_regions.h) against one process computing the whole model:
// logits, loss and every parameter's gradient, tied and untied heads, learned
// and rotary positions, dropout, an uneven vocabulary, sequence parallelism;
// 20 AdamW steps; and through parallelize(), TP composed with FSDP and DDP,
// with the gradient norm over logical parameters.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/parallelize.h"
#include "tessera/parallel/tensor_parallel.h"
#include "tessera/parallel/tp_regions.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"

namespace tessera::parallel {
namespace {

using testing::sliceOf;

// 37 tokens: uneven over 2 (19 + 18), 3 (13 + 13 + 11) and 4 (10 x 3 + 7).
// 12 heads of 4 dims split by 2, 3 and 4; a sequence of 12 too.
models::GptConfig gptConfig(const testing::WorkerContext& ctx) {
  models::GptConfig c;
  c.vocab_size = 37;
  c.block_size = 16;
  c.n_layer = 2;
  c.n_head = 12;
  c.d_model = 48;
  c.mlp_ratio = 2;
  c.positions = ctx.arg("positions", "learned");
  c.tie_weights = ctx.arg("tie", "1") == "1";
  c.dropout = std::stod(ctx.arg("dropout", "0.1"));
  c.seed = 11;
  return c;
}

// The same (B, T) batch on every rank (tp ranks read one batch).
std::pair<at::Tensor, at::Tensor> tokens(int64_t seed, int64_t batch = 3, int64_t length = 12) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor all = at::randint(0, 37, {batch, length + 1}, gen, at::kLong);
  return {all.narrow(1, 0, length).contiguous(), all.narrow(1, 1, length).contiguous()};
}

// Max |local - reference| over every parameter's pieces, of values or grads.
double maxPieceError(models::GptImpl& sharded, models::GptImpl& reference, bool grads, std::string* worst) {
  std::map<std::string, at::Tensor> whole;
  for (const auto& p : models::logicalParameters(reference)) whole[p.name] = grads ? p.tensor.grad() : p.tensor;
  double err = 0;
  for (const auto& p : models::logicalParameters(sharded)) {
    const at::Tensor local = (grads ? p.tensor.grad() : p.tensor).detach().reshape({-1});
    int64_t offset = 0;
    for (const TensorSlice& slice : p.pieces) {
      const double e = (local.narrow(0, offset, slice.numel) - sliceOf(whole.at(p.name).detach(), slice))
                           .abs().max().item<double>();
      if (e > err) {
        err = e;
        *worst = p.name + " " + slice.text();
      }
      offset += slice.numel;
    }
  }
  return err;
}

// One forward + backward in fp64 with dropout: the tp model and one process.
TESSERA_WORKER(tp_gpt_matches_one_process) {
  const comm::CommPtr world = ctx.world();
  const bool sequence = ctx.arg("sequence", "0") == "1";
  models::Gpt reference(gptConfig(ctx));
  models::Gpt gpt(gptConfig(ctx));
  reference->to(at::kDouble);
  gpt->to(at::kDouble);
  gpt->applyTensorParallel(makeTensorParallelGroup(world), sequence);
  for (auto* m : {&reference, &gpt}) (*m)->setRandomKey(/*step=*/4, /*microBatch=*/1);

  const auto [idx, targets] = tokens(5);
  const at::Tensor logits = gpt->forward(idx);  // gathered over the vocabulary shards
  const at::Tensor expectedLogits = reference->forward(idx);
  const double logitErr = (logits - expectedLogits).abs().max().item<double>();
  TESSERA_CHECK(logitErr < 1e-10, "logits differ by " << logitErr);

  const at::Tensor loss = gpt->loss(idx, targets);
  const at::Tensor expected = reference->loss(idx, targets);
  TESSERA_CHECK(std::abs(loss.item<double>() - expected.item<double>()) < 1e-10,
                "loss " << loss.item<double>() << " vs one process " << expected.item<double>());
  loss.backward();
  expected.backward();
  std::string worst;
  const double gradErr = maxPieceError(*gpt, *reference, /*grads=*/true, &worst);
  TESSERA_CHECK(gradErr < 1e-10, "gradients differ by " << gradErr << " at " << worst);
}

void runTp(int ranks, std::map<std::string, std::string> args, const std::string& backend = "gloo") {
  auto result = testing::runWorkers("tp_gpt_matches_one_process",
                                    {.ranks = ranks, .backend = backend, .args = std::move(args)});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(TensorParallelGpt, Tp2TiedLearned) { runTp(2, {{"tie", "1"}, {"positions", "learned"}}); }
TEST(TensorParallelGpt, Tp4UntiedRotary) { runTp(4, {{"tie", "0"}, {"positions", "rotary"}}); }
TEST(TensorParallelGpt, Tp3UnevenVocabulary) { runTp(3, {{"tie", "1"}, {"positions", "rotary"}}); }
TEST(TensorParallelGpt, SequenceParallelTp2) {
  runTp(2, {{"tie", "0"}, {"positions", "learned"}, {"sequence", "1"}});
}
TEST(TensorParallelGpt, SequenceParallelTp2Mpi) {
  if (!testing::mpiAvailable()) GTEST_SKIP() << "this build has no MPI (or mpirun is not on PATH)";
  runTp(2, {{"tie", "1"}, {"positions", "rotary"}, {"sequence", "1"}}, "mpi");
}
TEST(TensorParallelGpt, SequenceParallelTp3) {
  runTp(3, {{"tie", "1"}, {"positions", "learned"}, {"sequence", "1"}});
}

// 20 AdamW steps (tessera's optimizer) on the tp shards and on one process:
// every parameter ends equal. fp64, because the key bias has a zero gradient
// in exact arithmetic (softmax ignores a constant added to every key), and
// in fp32 AdamW's normalization blows its rounding noise up to lr-sized steps.
TESSERA_WORKER(tp_gpt_adamw_steps) {
  const comm::CommPtr world = ctx.world();
  models::Gpt reference(gptConfig(ctx));
  models::Gpt gpt(gptConfig(ctx));
  reference->to(at::kDouble);
  gpt->to(at::kDouble);
  gpt->applyTensorParallel(makeTensorParallelGroup(world), ctx.arg("sequence", "0") == "1");
  optim::OptimizerConfig adamw;
  auto refOpt = optim::makeOptimizer(adamw, reference->parameters(), 3e-3);
  auto opt = optim::makeOptimizer(adamw, gpt->parameters(), 3e-3);
  for (int step = 0; step < 20; ++step) {
    const auto [idx, targets] = tokens(100 + step);
    for (auto* m : {&reference, &gpt}) (*m)->setRandomKey(step, 0);
    refOpt->zeroGrad();
    opt->zeroGrad();
    reference->loss(idx, targets).backward();
    gpt->loss(idx, targets).backward();
    refOpt->step();
    opt->step();
  }
  std::string worst;
  const double err = maxPieceError(*gpt, *reference, /*grads=*/false, &worst);
  TESSERA_CHECK(err < 1e-5, "after 20 AdamW steps parameters differ by " << err << " at " << worst);
}

TEST(TensorParallelGpt, TwentyAdamWStepsMatch) {
  auto result = testing::runWorkers("tp_gpt_adamw_steps", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

// parallelize() with tp = 2 and a data-parallel strategy on 4 ranks: after
// the gradient sync each shard equals the single-process gradient of the
// mean loss over the data ranks' batches, and gradNorm is that gradient's
// norm over logical parameters.
TESSERA_WORKER(tp_composed_with_data_parallel) {
  const comm::CommPtr world = ctx.world();
  ParallelConfig config;
  config.strategy = ctx.arg("strategy");
  config.mesh.tp = 2;
  (config.strategy == "fsdp" ? config.mesh.dp_shard : config.mesh.dp_replicate) = 2;
  config.sequence_parallel = ctx.arg("sequence", "0") == "1";
  DeviceMesh mesh(world, config.mesh);
  models::Gpt gpt(gptConfig(ctx));
  auto model = makeTrainable(gpt);
  ParallelModel pm = parallelize(*model, mesh, config, /*localUpdates=*/false);
  TESSERA_CHECK(pm.dataRanks == 2, "tp ranks read the same batch: 2 data ranks, got " << pm.dataRanks);
  bool talksTp = false;
  for (const NamedComm& c : pm.traffic) talksTp = talksTp || c.name == "tp";
  TESSERA_CHECK(talksTp, "the metrics count the tp communicator");

  const auto batchOf = [](int dataRank) {
    const auto [idx, targets] = tokens(40 + dataRank, 2);
    return Batch{idx, targets, idx.numel()};
  };
  pm.executor->forwardBackward({batchOf(pm.dataRank)}, /*step=*/2);
  pm.dp->finishGradientSync();
  const double norm = pm.dp->gradNorm();

  models::Gpt reference(gptConfig(ctx));
  auto refModel = makeTrainable(reference);
  for (int r = 0; r < 2; ++r) {
    refModel->setRandomKey(2, r);  // the executor's key: data rank * micro-batches + i
    (refModel->loss(batchOf(r)) / 2).backward();
  }
  double expectedNorm = 0;
  for (const auto& p : models::logicalParameters(*reference)) expectedNorm += p.tensor.grad().to(at::kDouble).pow(2).sum().item<double>();
  expectedNorm = std::sqrt(expectedNorm);
  TESSERA_CHECK(std::abs(norm - expectedNorm) <= 1e-5 * expectedNorm,
                "gradNorm " << norm << " vs one process " << expectedNorm);

  // Each optimizer tensor's pieces against the reference gradient.
  std::map<std::string, at::Tensor> whole;
  for (const auto& p : models::logicalParameters(*reference)) whole[p.name] = p.tensor.grad();
  const auto params = pm.dp->optimizerParameters();
  const auto layout = pm.dp->parameterLayout();
  double err = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor grad = params[i].grad().reshape({-1});
    for (const ParameterPiece& piece : layout[i]) {
      const at::Tensor expected = sliceOf(whole.at(piece.name), piece.slice);
      err = std::max(err, (grad.narrow(0, piece.tensorOffset, piece.slice.numel) - expected).abs().max().item<double>());
    }
  }
  TESSERA_CHECK(err < 1e-5, "synced gradients differ from one process by " << err);
}

TEST(TensorParallelComposition, TpTimesFsdp) {
  auto result = testing::runWorkers("tp_composed_with_data_parallel", {.ranks = 4, .args = {{"strategy", "fsdp"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(TensorParallelComposition, TpTimesDdpSequenceParallel) {
  auto result = testing::runWorkers("tp_composed_with_data_parallel",
                                    {.ranks = 4, .args = {{"strategy", "ddp"}, {"sequence", "1"}, {"tie", "0"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

// What the GPT refuses to split, naming the key and both numbers.
class NoComm : public models::ShardGroup {
 public:
  explicit NoComm(int64_t size) : size_(size) {}
  int64_t rank() const override { return 0; }
  int64_t size() const override { return size_; }
  std::string name() const override { return "tp"; }
  at::Tensor copyToShards(const at::Tensor& x) override { return x; }
  at::Tensor reduceFromShards(const at::Tensor& x) override { return x; }
  at::Tensor scatterToShards(const at::Tensor& x, int64_t) override { return x; }
  at::Tensor gatherFromShards(const at::Tensor& x, int64_t) override { return x; }
  at::Tensor gatherFromSequence(const at::Tensor& x, int64_t) override { return x; }
  at::Tensor reduceScatterToSequence(const at::Tensor& x, int64_t) override { return x; }
  at::Tensor allReduceSum(const at::Tensor& x) override { return x; }
  at::Tensor allReduceMax(const at::Tensor& x) override { return x; }

 private:
  int64_t size_;
};

TEST(TensorParallelGpt, ConfigErrorsNameTheKeyAndBothNumbers) {
  models::GptConfig c;
  c.n_head = 6;
  c.d_model = 48;
  ConfigError e = testing::configErrorOf([&] { models::Gpt(c)->applyTensorParallel(std::make_shared<NoComm>(4), false); });
  EXPECT_EQ(e.field(), "model.n_head");
  EXPECT_NE(std::string(e.what()).find("n_head (6)"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("parallel.tp (4)"), std::string::npos) << e.what();

  c.n_head = 4;
  c.vocab_size = 5;  // 4 ranks: chunks of 2 leave the last none
  e = testing::configErrorOf([&] { models::Gpt(c)->applyTensorParallel(std::make_shared<NoComm>(4), false); });
  EXPECT_EQ(e.field(), "model.vocab_size");

  c.vocab_size = 64;

  // A sequence the group does not divide fails at forward, naming both numbers.
  models::Gpt gpt(c);
  gpt->applyTensorParallel(std::make_shared<NoComm>(4), /*sequenceParallel=*/true);
  try {
    gpt->forward(torch::zeros({1, 6}, torch::kLong));
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& err) {
    EXPECT_NE(std::string(err.what()).find("length 6"), std::string::npos) << err.what();
    EXPECT_NE(std::string(err.what()).find("(4 ranks)"), std::string::npos) << err.what();
  }
}

}  // namespace
}  // namespace tessera::parallel
