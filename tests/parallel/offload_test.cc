// Activation offload (parallel/pipeline/offload.h): the resident count
// against sums computed by hand from autograd's formulas, gradients bitwise
// equal with and without offload, errors that name the key, and the
// schedule pass (withOffload) checked by walking the lists it returns.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/pipeline/offload.h"
#include "tessera/parallel/pipeline/schedule.h"

namespace tessera::parallel::pipeline {
namespace {

at::Tensor seeded(at::IntArrayRef shape, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen);
}

int64_t nbytesOf(const at::Tensor& t) { return static_cast<int64_t>(t.storage().nbytes()); }

ActivationPool::Options poolOptions(int64_t minBytes) {
  ActivationPool::Options options;
  options.policy = "all";
  options.minBytes = minBytes;
  options.timeoutSeconds = 20;
  return options;
}

// y = tanh(x @ w).sum(): mm saves x and w (w a parameter: excluded), tanh
// saves its output, sum saves no tensor. z = (h[:, :8] * h[:, 8:]).sum():
// mul saves both operands, two views of ONE storage (h's), counted once.
TEST(ActivationPoolTest, ResidentBytesAreTheSavedStoragesCountedByHand) {
  const at::Tensor x0 = seeded({16, 64}, 1).requires_grad_();
  const at::Tensor w = seeded({64, 32}, 2).requires_grad_();
  ActivationPool pool(poolOptions(/*minBytes=*/1024));
  at::Tensor x, t, h, loss;
  {
    auto capture = pool.capture(7);
    x = x0 * 2;  // mul by a scalar saves no tensor
    t = at::tanh(x.mm(w));
    h = x0.mm(w) * 3;
    loss = t.sum() + (h.slice(1, 0, 8) * h.slice(1, 8, 16)).sum();
  }
  const int64_t expected = nbytesOf(x) + nbytesOf(t) + nbytesOf(h);
  EXPECT_EQ(expected, (16 * 64 + 16 * 32 + 16 * 32) * 4);
  EXPECT_EQ(pool.residentBytes(), expected);

  // Outside a capture autograd saves as usual and the pool sees nothing.
  const at::Tensor other = at::tanh(x0.mm(w)).sum();
  EXPECT_EQ(pool.residentBytes(), expected);

  pool.offload(7);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), 0);
  pool.reload(7);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), expected);
  EXPECT_EQ(pool.peakResidentBytes(), expected);

  // Gradients bitwise those of the same graph built without the pool.
  loss.backward();
  const at::Tensor gx = x0.grad().clone(), gw = w.grad().clone();
  x0.mutable_grad() = at::Tensor();
  w.mutable_grad() = at::Tensor();
  const at::Tensor xr = x0 * 2;
  const at::Tensor hr = x0.mm(w) * 3;
  (at::tanh(xr.mm(w)).sum() + (hr.slice(1, 0, 8) * hr.slice(1, 8, 16)).sum()).backward();
  EXPECT_TRUE(at::equal(gx, x0.grad()));
  EXPECT_TRUE(at::equal(gw, w.grad()));
  EXPECT_EQ(pool.residentBytes(), 0) << "the graph is freed: nothing saved is left";
  pool.release(7);
}

TEST(ActivationPoolTest, SmallStoragesStayResident) {
  const at::Tensor w = seeded({8, 8}, 3).requires_grad_();
  ActivationPool pool(poolOptions(/*minBytes=*/1 << 20));
  at::Tensor loss;
  {
    auto capture = pool.capture(0);
    loss = at::tanh(seeded({4, 8}, 4).mm(w)).sum();
  }
  const int64_t before = pool.residentBytes();
  // mm saves its input (a leaf that needs no grad: an activation) for w's
  // gradient, tanh its output; w is a parameter.
  EXPECT_EQ(before, 2 * 4 * 8 * 4);
  pool.offload(0);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), before);
  loss.backward();
}

models::GptConfig smallConfig() {
  models::GptConfig config;
  config.vocab_size = 64;
  config.block_size = 16;
  config.n_layer = 2;
  config.n_head = 2;
  config.d_model = 32;
  config.dropout = 0.1;  // masks are saved tensors too
  return config;
}

// Saved bytes of one Block forward at batch `batch`, measured by the pool.
int64_t blockSavedBytes(models::Block& block, int64_t batch) {
  ActivationPool pool(poolOptions(/*minBytes=*/1));
  const at::Tensor x = seeded({batch, 16, 32}, 5).requires_grad_();
  at::Tensor out;
  {
    auto capture = pool.capture(0);
    block->setRandomKey(0, 0);
    out = block->forward(x * 1.0);
  }
  const int64_t bytes = pool.residentBytes();
  pool.offload(0);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), 0) << "minBytes = 1: every saved storage leaves";
  pool.reload(0);
  pool.waitIdle();
  EXPECT_EQ(pool.residentBytes(), bytes);
  out.sum().backward();
  EXPECT_EQ(pool.residentBytes(), 0);
  return bytes;
}

TEST(ActivationPoolTest, BlockActivationsScaleWithTheBatch) {
  models::Block block(smallConfig(), 0);
  const int64_t one = blockSavedBytes(block, 2), two = blockSavedBytes(block, 4), three = blockSavedBytes(block, 6);
  // Every saved activation of a block is (B, T, ...), linear in B, but for
  // the causal mask: (T, T) bool, saved by masked_fill.
  constexpr int64_t kMask = 16 * 16;
  EXPECT_GT(one, kMask);
  EXPECT_EQ(two - kMask, 2 * (one - kMask));
  EXPECT_EQ(three - kMask, 3 * (one - kMask));
}

// F F F then B B B (several micro-batches in flight), every one offloaded
// after its F and reloaded one B ahead: gradients bitwise those of the same
// order without the pool.
std::vector<at::Tensor> gptGradients(bool offload) {
  models::Gpt gpt(smallConfig());
  constexpr int kMicro = 3;
  std::unique_ptr<ActivationPool> pool;
  if (offload) pool = std::make_unique<ActivationPool>(poolOptions(/*minBytes=*/256));
  std::vector<at::Tensor> losses;
  for (int m = 0; m < kMicro; ++m) {
    at::Generator gen = at::detail::createCPUGenerator(100 + m);
    const at::Tensor idx = at::randint(64, {2, 16}, gen);
    const at::Tensor targets = at::randint(64, {2, 16}, gen);
    std::unique_ptr<ActivationPool::Capture> capture;
    if (pool) capture = pool->capture(m);
    gpt->setRandomKey(0, m);
    losses.push_back(gpt->loss(idx, targets));
    capture.reset();
    if (pool) pool->offload(m);
  }
  if (pool) {
    pool->waitIdle();
    EXPECT_LT(pool->residentBytes(), pool->peakResidentBytes() / 10) << "almost everything is offloaded";
    pool->reload(0);
  }
  for (int m = 0; m < kMicro; ++m) {
    if (pool && m + 1 < kMicro) pool->reload(m + 1);  // one B ahead: overlaps B(m)
    losses[static_cast<size_t>(m)].backward();
    if (pool) pool->release(m);
  }
  if (pool) {
    EXPECT_EQ(pool->residentBytes(), 0);
  }
  std::vector<at::Tensor> grads;
  for (const auto& p : gpt->named_parameters()) grads.push_back(p.value().grad().clone());
  return grads;
}

TEST(ActivationPoolTest, GptGradientsAreBitwiseThoseWithoutOffload) {
  const auto plain = gptGradients(false), offloaded = gptGradients(true);
  ASSERT_EQ(plain.size(), offloaded.size());
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(at::equal(plain[i], offloaded[i])) << "parameter " << i;
}

TEST(ActivationPoolTest, UnknownKeyIsNamed) {
  ActivationPool pool(poolOptions(1));
  try {
    pool.offload(41);
    FAIL() << "offload of a key never captured";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("key 41"), std::string::npos) << e.what();
  }
  { auto capture = pool.capture(42); }
  pool.release(42);
  EXPECT_THROW(pool.reload(42), InvalidArgument);
}

// Builds a graph under key 5, offloads it, and runs backward.
void backwardAfterOffload(ActivationPool& pool) {
  const at::Tensor w = seeded({64, 64}, 6).requires_grad_();
  at::Tensor loss;
  {
    auto capture = pool.capture(5);
    loss = at::tanh(seeded({32, 64}, 7).mm(w)).sum();
  }
  pool.offload(5);
  pool.waitIdle();
  pool.reload(5);
  loss.backward();
}

TEST(ActivationPoolTest, ReloadErrorReachesTheUnpackNamingTheKey) {
  auto options = poolOptions(1);
  options.beforeCopy = [](int64_t, bool reload) {
    if (reload) throw std::runtime_error("injected host read failure");
  };
  ActivationPool pool(options);
  try {
    backwardAfterOffload(pool);
    FAIL() << "the backward should fail";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("key 5"), std::string::npos) << what;
    EXPECT_NE(what.find("injected host read failure"), std::string::npos) << what;
  }
}

TEST(ActivationPoolTest, StuckCopyTimesOutNamingTheKey) {
  auto options = poolOptions(1);
  options.timeoutSeconds = 0.2;
  options.beforeCopy = [](int64_t, bool reload) {
    if (reload) std::this_thread::sleep_for(std::chrono::milliseconds(800));
  };
  ActivationPool pool(options);
  try {
    backwardAfterOffload(pool);
    FAIL() << "the backward should time out";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("key 5"), std::string::npos) << what;
    EXPECT_NE(what.find("did not finish"), std::string::npos) << what;
  }
}

// ---- withOffload ----

std::vector<std::string> listed(const PipelineSchedule& schedule) {
  std::vector<std::string> out;
  for (const auto& actions : schedule.actions) {
    for (const Action& a : actions) out.push_back(toString(a));
    out.push_back("|");
  }
  return out;
}

struct Walk {
  double peak = 0;   // max resident count at a compute action
  int offloads = 0;
  std::vector<std::string> problems;
};

// Walks one rank's list: F adds 1/v (resident while it runs), kOffload
// subtracts it, kReload adds it back, B/BW counts it then removes it.
Walk walk(const std::vector<Action>& actions, int v) {
  Walk w;
  double count = 0;
  std::map<std::pair<int, int>, int> state;  // 1 resident, 0 offloaded
  const double unit = 1.0 / v;
  for (size_t i = 0; i < actions.size(); ++i) {
    const Action& a = actions[i];
    auto key = std::make_pair(a.chunk, a.microBatch);
    switch (a.kind) {
      case ActionKind::kForward:
        count += unit;
        state[key] = 1;
        w.peak = std::max(w.peak, count);
        break;
      case ActionKind::kOffload:
        if (state[key] != 1) w.problems.push_back("offload of a non-resident " + toString(a));
        if (i == 0 || (actions[i - 1].kind != ActionKind::kForward && actions[i - 1].kind != ActionKind::kSendActivation))
          w.problems.push_back("offload not right after its F: " + toString(a));
        state[key] = 0;
        count -= unit;
        ++w.offloads;
        break;
      case ActionKind::kReload:
        if (state[key] != 0) w.problems.push_back("reload of a resident " + toString(a));
        state[key] = 1;
        count += unit;
        break;
      case ActionKind::kBackwardInput:
      case ActionKind::kBackward:
        if (state[key] != 1) w.problems.push_back("B of an offloaded " + toString(a));
        w.peak = std::max(w.peak, count);
        count -= unit;
        break;
      default:
        if (isComputeKind(a.kind)) w.peak = std::max(w.peak, count);
    }
  }
  return w;
}

TEST(WithOffloadTest, AllAndSelectiveOnEveryScheduleAreValidAndWithinBudget) {
  PipelineCosts costs;
  for (const std::string name : {"1f1b", "interleaved_1f1b", "zb_h1", "zb_h2", "zb_v"}) {
    for (int p : {2, 4}) {
      const int M = 2 * p;
      const PipelineSchedule base = withCommunication(makeSchedule(name, p, M, 2, costs));
      const int v = base.chunksPerRank;
      const PipelineSchedule all = withOffload(base, "all", 0);
      EXPECT_TRUE(validateSchedule(all, costs).empty()) << name << " p=" << p << ": " << validateSchedule(all, costs)[0];
      for (int r = 0; r < p; ++r) {
        const Walk none = walk(base.actions[r], v), everything = walk(all.actions[r], v);
        EXPECT_TRUE(everything.problems.empty()) << name << " rank " << r << ": " << everything.problems[0];
        EXPECT_LE(everything.peak, none.peak);
        for (double budget : {1.0, 2.0}) {
          const PipelineSchedule sel = withOffload(base, "selective", budget);
          EXPECT_TRUE(validateSchedule(sel, costs).empty()) << name << " selective";
          const Walk s = walk(sel.actions[r], v);
          EXPECT_TRUE(s.problems.empty()) << name << " rank " << r << ": " << s.problems[0];
          EXPECT_LE(s.offloads, everything.offloads);
          // Within budget wherever offloading all could get there.
          EXPECT_LE(s.peak, std::max(budget, everything.peak) + 1e-9) << name << " p=" << p << " rank " << r;
        }
        const Walk huge = walk(withOffload(base, "selective", 1e9).actions[r], v);
        EXPECT_EQ(huge.offloads, 0);
      }
      EXPECT_EQ(listed(withOffload(all, "none", 0)), listed(base)) << "none drops old offload actions";
    }
  }
}

TEST(WithOffloadTest, SelectiveTakesTheLongestLivedFirst) {
  // 1F1B, 4 stages, 8 micro-batches, rank 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 F6
  // B3 F7 B4 B5 B6 B7 (positions 0..15). The count reaches 4 at F3; budget 3
  // needs an offload among those live with room to gain (F1: gap 5, F2:
  // gap 6): F2, the longest-lived. 1F1B keeps 4 in flight in its steady
  // state, so every later F up to F6 offloads one: F3 (gap 7, tie with F4
  // broken by the earlier F), then F4, F5, F6; F7 (B7 right after the
  // cool-down) and F0, F1 never.
  const PipelineSchedule base = makeSchedule("1f1b", 4, 8, 1, PipelineCosts{});
  std::vector<std::string> listedRank0;
  for (const Action& a : base.actions[0]) listedRank0.push_back(toString(a));
  ASSERT_EQ(listedRank0.size(), 16u);
  const PipelineSchedule sel = withOffload(base, "selective", 3);
  std::vector<int> offloaded;
  for (const Action& a : sel.actions[0]) {
    if (a.kind == ActionKind::kOffload) offloaded.push_back(a.microBatch);
  }
  EXPECT_EQ(offloaded, (std::vector<int>{2, 3, 4, 5, 6}));
  EXPECT_LE(walk(sel.actions[0], 1).peak, 3.0);
  // Budget 4 = 1F1B's own peak on rank 0: nothing to offload.
  EXPECT_EQ(walk(withOffload(base, "selective", 4).actions[0], 1).offloads, 0);
  EXPECT_THROW(withOffload(base, "sometimes", 0), InvalidArgument);
}

}  // namespace
}  // namespace tessera::parallel::pipeline
