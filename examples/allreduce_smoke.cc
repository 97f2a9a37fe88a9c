// allreduce_smoke: the smallest end-to-end check that a tessera job works.
// It joins the job with tessera::init(), checks one all-reduce against a
// known answer, trains a linear model data-parallel for a few steps, and
// prints what the world communicator sent. Exits 0 only if every check holds.
//
//   tessera-run --nproc-per-node 4 build/examples/allreduce_smoke
//   build/examples/allreduce_smoke                  (alone: a world of 1)
//   mpirun -np 4 build/examples/allreduce_smoke     (MPI backend, if built)
//
// Deliberately plain ATen (no torch::nn, no autograd): the gradient of a
// least-squares loss is one line, and the point here is the communication.
#include <ATen/ATen.h>

#include <cstdio>
#include <exception>

#include "tessera/core/error.h"
#include "tessera/launcher/init.h"

namespace {

using tessera::comm::Communicator;
using tessera::comm::ReduceOp;

constexpr int64_t kFeatures = 8;    // F: inputs of the linear model
constexpr int64_t kShardRows = 64;  // B: samples each rank holds
constexpr int kSteps = 20;
constexpr double kLearningRate = 0.1;

// Collective. Rank r contributes r+1 everywhere, so the sum is n(n+1)/2.
void checkAllReduce(Communicator& world) {
  at::Tensor value = at::full({4}, static_cast<double>(world.rank() + 1), at::kFloat);  // (4,)
  world.allReduce(value, ReduceOp::kSum);
  const double expected = world.size() * (world.size() + 1) / 2.0;
  TESSERA_CHECK(at::allclose(value, at::full({4}, expected, at::kFloat)),
                "all-reduce of rank+1 over " << world.size() << " ranks gave " << value << ", expected " << expected);
  if (world.rank() == 0) {
    std::printf("all-reduce of rank+1 over %d ranks = %g (expected %g): ok\n", world.size(), value[0].item<double>(),
                expected);
  }
}

// Collective. Data-parallel least squares: each rank holds its own shard of
// (x, y) and takes the gradient of the mean squared error on it; averaging
// the gradients over ranks (one all-reduce per step) makes every rank take the
// same step, so the weights stay identical without ever being broadcast.
// Returns {first loss, last loss}, averaged over ranks.
std::pair<double, double> trainLinearModel(Communicator& world) {
  at::manual_seed(0);                                        // the same true weights on every rank...
  const at::Tensor trueWeights = at::randn({kFeatures, 1});  // (F, 1)
  at::manual_seed(1000 + world.rank());                      // ...and different data on each
  const at::Tensor x = at::randn({kShardRows, kFeatures});   // (B, F)
  const at::Tensor y = x.matmul(trueWeights) + 0.01 * at::randn({kShardRows, 1});  // (B, 1)
  at::Tensor weights = at::zeros({kFeatures, 1});                                  // (F, 1)

  double firstLoss = 0;
  double lastLoss = 0;
  for (int step = 0; step < kSteps; ++step) {
    const at::Tensor residual = x.matmul(weights) - y;              // (B, 1)
    at::Tensor loss = residual.pow(2).mean().reshape({1});          // (1,)
    at::Tensor grad = (2.0 / kShardRows) * x.t().matmul(residual);  // (F, 1) = d loss / d weights
    world.allReduce(grad, ReduceOp::kAvg);
    weights -= kLearningRate * grad;
    world.allReduce(loss, ReduceOp::kAvg);  // only for printing: the loss over all shards
    lastLoss = loss.item<double>();
    if (step == 0) firstLoss = lastLoss;
    if (world.rank() == 0 && (step % 5 == 0 || step == kSteps - 1)) {
      std::printf("step %2d  loss %.6f\n", step, lastLoss);
      std::fflush(stdout);
    }
  }
  // Identical weights on every rank <=> their max and min over ranks agree.
  at::Tensor highest = weights.clone();
  at::Tensor lowest = weights.clone();
  world.allReduce(highest, ReduceOp::kMax);
  world.allReduce(lowest, ReduceOp::kMin);
  TESSERA_CHECK(at::equal(highest, lowest), "weights diverged across ranks: max - min = " << (highest - lowest));
  TESSERA_CHECK(lastLoss < 0.1 * firstLoss,
                "training did not converge: loss " << firstLoss << " -> " << lastLoss << " in " << kSteps << " steps");
  return {firstLoss, lastLoss};
}

}  // namespace

int main() {
  try {
    tessera::DistributedContext ctx = tessera::init();
    Communicator& world = *ctx.world;
    if (world.rank() == 0) {
      std::printf("allreduce_smoke: %s\n", ctx.info.describe().c_str());
    }
    checkAllReduce(world);
    const auto [firstLoss, lastLoss] = trainLinearModel(world);
    if (world.rank() == 0) {
      std::printf("trained %d steps on %d ranks: loss %.4f -> %.6f\n", kSteps, world.size(), firstLoss, lastLoss);
      std::printf("comm stats: %s\n", world.stats().toJson().c_str());
    }
    // Everyone finishes together: when rank 0 hosts the store, it must not
    // exit (taking the store down) while another rank still needs it.
    world.barrier();
    if (world.rank() == 0) std::printf("allreduce_smoke: OK\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "allreduce_smoke failed: %s\n", e.what());
    return 1;
  }
}
