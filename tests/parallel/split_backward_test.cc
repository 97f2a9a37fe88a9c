// The split backward (issue 16) under the data-parallel strategies: 2 real
// processes run a small GPT (dropout on) with every GEMM's weight gradient
// deferred (B computes input gradients, W delivers dW later), three
// micro-batches per synced step declared with setGradientArrivals(3), in
// "all B then all W" order and in an interleaved F/B/W order. After
// finishGradientSync the gradients must equal an independent reference: each
// worker runs a plain model (no strategy, ordinary backward) over every
// rank's micro-batches and averages over ranks. Also: FSDP starts no
// reduce-scatter before a unit's last W (its byte count does not move while
// W runs, until the last one), a sync before W fails naming the cause, and
// DDP with findUnusedParameters = false reports nothing unused when W ran
// (and does report the weights when W did not).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/weight_grad_store.h"
#include "tessera/core/state.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/fixtures.h"

namespace tessera::parallel {
namespace {

constexpr int kMicroBatches = 3;
constexpr double kTol = 1e-6;

using testing::smallGpt;

// Rank r's micro-batch m: (2, 8) tokens and targets.
std::pair<at::Tensor, at::Tensor> microBatch(int rank, int m) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + 10 * rank + m);
  const at::Tensor all = at::randint(0, 29, {2, 9}, gen, at::kLong);
  return {all.narrow(1, 0, 8).contiguous(), all.narrow(1, 1, 8).contiguous()};
}

int64_t randomKey(int rank, int m) { return rank * kMicroBatches + m; }  // distinct across ranks

// What DDP / FSDP must produce: the average over ranks of each rank's
// summed micro-batch gradients (loss / M each), by an ordinary backward.
std::map<std::string, at::Tensor> referenceGradients(const models::GptConfig& config, int ranks) {
  models::Gpt model(config);
  model->train();
  for (int r = 0; r < ranks; ++r) {
    for (int m = 0; m < kMicroBatches; ++m) {
      const auto [idx, targets] = microBatch(r, m);
      model->setRandomKey(0, randomKey(r, m));
      (model->loss(idx, targets) / kMicroBatches).backward();
    }
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& item : model->named_parameters()) out[item.key()] = item.value().grad() / ranks;
  return out;
}

struct Action {
  char kind;  // 'F', 'B', 'W'
  int m;
};

// "F0 B0 W0 ..." -> actions.
std::vector<Action> parseOrder(const std::string& text) {
  std::vector<Action> out;
  std::istringstream in(text);
  std::string word;
  while (in >> word) out.push_back({word[0], word[1] - '0'});
  return out;
}

std::string orderOf(const std::string& name) {
  if (name == "bw") return "F0 F1 F2 B0 B1 B2 W0 W1 W2";  // all B, then all W (ZB-H1's shape at the tail)
  return "F0 B0 F1 W0 B1 F2 B2 W2 W1";                    // interleaved, W out of order
}

void expectGradientsMatch(DataParallel& dp, torch::nn::Module& model,
                          const std::map<std::string, at::Tensor>& reference) {
  if (!dp.sharded()) {
    for (const auto& item : model.named_parameters()) {
      testing::expectTensorsEqual(item.value().grad(), reference.at(item.key()), item.key(), kTol, kTol);
    }
    return;
  }
  const std::vector<at::Tensor> shards = dp.optimizerParameters();
  const auto layout = dp.parameterLayout();
  int64_t checked = 0;
  for (size_t i = 0; i < layout.size(); ++i) {
    const at::Tensor grad = shards[i].grad();
    TESSERA_CHECK(grad.defined(), "FSDP shard " << i << " has no gradient after finishGradientSync");
    for (const ParameterPiece& piece : layout[i]) {
      const at::Tensor whole = reference.at(piece.name).contiguous().reshape({-1});
      at::Tensor expected = at::empty({piece.slice.numel}, whole.options());
      copyOverlap(TensorSlice::whole(piece.shape), whole, piece.slice, expected);
      testing::expectTensorsEqual(grad.narrow(0, piece.tensorOffset, piece.slice.numel), expected,
                                  piece.name + " " + piece.slice.text(), kTol, kTol);
      checked += piece.slice.numel;
    }
  }
  TESSERA_CHECK(checked > 0, "FSDP: no gradient element compared");
}

// args: strategy (ddp | fsdp), tied (1 | 0), order (bw | interleaved).
TESSERA_WORKER(split_backward) {
  const comm::CommPtr world = ctx.world();
  const std::string strategy = ctx.arg("strategy");
  const bool tied = ctx.arg("tied") == "1";
  const std::vector<Action> actions = parseOrder(orderOf(ctx.arg("order")));
  const models::GptConfig config = smallGpt(tied);
  const auto reference = referenceGradients(config, world->size());

  models::Gpt model(config);
  model->train();
  std::unique_ptr<DataParallel> dp =
      strategy == "ddp" ? makeDdpDataParallel(*model, world) : makeFsdpDataParallel(*model, world);
  auto store = std::make_shared<models::QueuedWeightGradStore>();
  models::setDeferredWeightGradients(*model, store);
  // One arrival per micro-batch: in B for LayerNorms, biases and lookups, in
  // W for the GEMMs' weights; the tied table gets both (lookup in B, head in W).
  dp->setGradientArrivals([tied](const std::string& name) {
    return tied && name == "wte.weight" ? 2 * kMicroBatches : kMicroBatches;
  });

  std::vector<at::Tensor> losses(kMicroBatches);
  auto run = [&](const Action& a) {
    const int r = world->rank();
    if (a.kind == 'F') {
      const auto [idx, targets] = microBatch(r, a.m);
      model->setRandomKey(0, randomKey(r, a.m));
      dp->beforeForward();
      losses[a.m] = model->loss(idx, targets) / kMicroBatches;
    } else if (a.kind == 'B') {
      model->setRandomKey(0, randomKey(r, a.m));  // FSDP recomputes the unit in B: the forward's masks
      store->setKey(a.m);
      losses[a.m].backward();
      losses[a.m] = at::Tensor();
    } else {
      store->drain(a.m);
    }
  };

  const bool bwOrder = ctx.arg("order") == "bw";
  int64_t bytesAfterB = -1;
  for (size_t i = 0; i < actions.size(); ++i) {
    const Action& a = actions[i];
    if (bwOrder && a.kind == 'W' && a.m == kMicroBatches - 1) {
      // Every B ran, W not yet: a sync now must refuse (FSDP: units await W)
      // or report the weights as not arrived (DDP) -- on both ranks alike.
      const int64_t before = dp->stats().bytes;
      if (strategy == "fsdp") {
        TESSERA_CHECK(before == bytesAfterB, "FSDP communicated during W before a unit's last W: "
                                                 << bytesAfterB << " -> " << before << " bytes");
        bool threw = false;
        try {
          dp->finishGradientSync();
        } catch (const InvalidArgument& e) {
          threw = std::string(e.what()).find("drain") != std::string::npos;
        }
        TESSERA_CHECK(threw, "FSDP finishGradientSync() before W must throw InvalidArgument asking to drain");
        TESSERA_CHECK(dp->stats().bytes == before, "the refused sync communicated");
      }
    }
    run(a);
    if (a.kind == 'B' && a.m == kMicroBatches - 1) bytesAfterB = dp->stats().bytes;
  }
  TESSERA_CHECK(store->pending() == 0, "W left " << store->pending() << " closures");
  if (bwOrder && strategy == "fsdp") {
    TESSERA_CHECK(dp->stats().bytes > bytesAfterB, "the last W must start the units' reduce-scatters");
  }
  dp->finishGradientSync();  // DDP findUnusedParameters = false: throws if anything counts as unused
  expectGradientsMatch(*dp, *model, reference);

  if (strategy == "ddp" && bwOrder) {
    // Negative control: the same step without W leaves the GEMM weights
    // short of their arrivals, which a sync reports (after reducing).
    for (auto& p : model->parameters()) p.mutable_grad() = at::Tensor();
    for (const Action& a : actions) {
      if (a.kind != 'W') run(a);
    }
    std::string message;
    try {
      dp->finishGradientSync();
    } catch (const InvalidArgument& e) {
      message = e.what();
    }
    TESSERA_CHECK(message.find("blocks.0.mlp.fc.weight") != std::string::npos &&
                      message.find("blocks.0.ln1.weight") == std::string::npos,
                  "a sync without W must report exactly the deferred weights, got: " << message);
    store->clear();
  }
}

void runSplitBackward(const std::string& strategy, const std::string& tied, const std::string& order) {
  testing::RunOptions options;
  options.ranks = 2;
  options.deadline = std::chrono::seconds(120);
  options.args = {{"strategy", strategy}, {"tied", tied}, {"order", order}};
  const auto result = testing::runWorkers("split_backward", options);
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(SplitBackward, DdpTiedBThenW) { runSplitBackward("ddp", "1", "bw"); }
TEST(SplitBackward, DdpUntiedInterleaved) { runSplitBackward("ddp", "0", "interleaved"); }
TEST(SplitBackward, FsdpTiedBThenW) { runSplitBackward("fsdp", "1", "bw"); }
TEST(SplitBackward, FsdpUntiedInterleaved) { runSplitBackward("fsdp", "0", "interleaved"); }
TEST(SplitBackward, FsdpTiedInterleaved) { runSplitBackward("fsdp", "1", "interleaved"); }

}  // namespace
}  // namespace tessera::parallel
