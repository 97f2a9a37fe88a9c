// MT-DAO against QH-ADOPT, ADOPT and the bias-corrected AdamW form written
// out here from REFERENCE §3 (not calling the optimizer's code), and real
// multi-process runs where every rank simulates every worker plus the
// averaging schedule and checks which states agree across ranks after each
// step.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/optim/mt_dao.h"
#include "tests/harness/multiprocess.h"

namespace tessera::optim {
namespace {

using testing::expectTensorsEqual;

at::Tensor seededRandn(at::IntArrayRef shape, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble));
}

std::vector<at::Tensor> makeParams(uint64_t seed) { return {seededRandn({6}, seed), seededRandn({3, 4}, seed + 1)}; }

// Gradient of parameter i for `worker` at `step`: noise plus a pull toward
// zero, so it depends on where the parameters are.
at::Tensor gradientFor(const at::Tensor& p, int worker, int step, size_t i) {
  return seededRandn(p.sizes(), 1000 * worker + 10 * step + i) + 0.5 * p;
}

// One worker's QH-ADOPT state for one parameter, float64.
struct QhAdopt {
  at::Tensor p, v;
  std::vector<at::Tensor> u;
};

QhAdopt startFrom(const at::Tensor& p, size_t momenta) {
  QhAdopt s{p.clone(), at::zeros_like(p), {}};
  for (size_t j = 0; j < momenta; ++j) s.u.push_back(at::zeros_like(p));
  return s;
}

// REFERENCE §3, update number t (0-based).
void qhAdoptStep(QhAdopt& s, const at::Tensor& g, int t, double lr, double lr0, const MtDaoConfig& c) {
  if (t == 0) {
    s.v = g * g;
    return;
  }
  s.p = s.p * (1 - lr / lr0 * c.weight_decay);
  const double clip = std::pow(t, 0.25);
  const at::Tensor n = at::clamp(g / at::clamp_min(at::sqrt(s.v), c.eps), -clip, clip);
  double nuSum = 0;
  at::Tensor mix = at::zeros_like(g);
  for (size_t j = 0; j < s.u.size(); ++j) {
    s.u[j] = c.betas[j] * s.u[j] + (1 - c.betas[j]) * n;
    mix = mix + c.nus[j] * s.u[j];
    nuSum += c.nus[j];
  }
  s.p = s.p - lr * ((1 - nuSum) * n + mix);
  s.v = c.beta2 * s.v + (1 - c.beta2) * g * g;
}

void expectMatches(Optimizer& optimizer, const std::vector<at::Tensor>& params, const std::vector<QhAdopt>& expected,
                   const std::string& what, double atol) {
  const OptimizerState state = optimizer.state();
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string where = what + " parameter " + std::to_string(i);
    expectTensorsEqual(params[i], expected[i].p, where, atol);
    expectTensorsEqual(state.perParameter.at("mt_dao/second")[i], expected[i].v, where + " second moment", atol);
    for (size_t j = 0; j < expected[i].u.size(); ++j) {
      expectTensorsEqual(state.perParameter.at("mt_dao/momentum_" + std::to_string(j))[i], expected[i].u[j],
                         where + " momentum " + std::to_string(j), atol);
    }
  }
}

double scheduledLr(int step) { return 0.01 * (1 - 0.08 * step); }

MtDaoConfig twoMomenta() {
  MtDaoConfig c;
  c.betas = {0.9, 0.99};
  c.nus = {0.5, 0.3};
  c.beta2 = 0.999;
  c.eps = 1e-6;
  c.weight_decay = 0.1;
  c.sync_params = 3;
  c.sync_momenta = {2, 4};
  c.sync_second = 5;
  return c;
}

TEST(MtDao, OneWorkerIsQhAdoptAndStepZeroMovesNothing) {
  const MtDaoConfig config = twoMomenta();
  std::vector<at::Tensor> params = makeParams(1);
  std::vector<QhAdopt> expected;
  for (const at::Tensor& p : params) expected.push_back(startFrom(p, 2));
  const std::vector<at::Tensor> initial = {params[0].clone(), params[1].clone()};
  auto optimizer = makeMtDao(config, params, nullptr, 0.01);
  for (int step = 0; step < 8; ++step) {
    optimizer->setLearningRate(scheduledLr(step));
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = gradientFor(params[i], 0, step, i);
      qhAdoptStep(expected[i], params[i].grad(), step, scheduledLr(step), 0.01, config);
    }
    const OptimizerStepResult result = optimizer->step();
    EXPECT_EQ(result.outerStep, (step + 1) % 3 == 0) << "step " << step;
    if (step == 0) {
      for (size_t i = 0; i < params.size(); ++i) {
        expectTensorsEqual(params[i], initial[i], "step 0 parameter " + std::to_string(i));
        expectTensorsEqual(optimizer->state().perParameter.at("mt_dao/momentum_0")[i], at::zeros_like(params[i]),
                           "step 0 momentum");
      }
    }
    expectMatches(*optimizer, params, expected, "step " + std::to_string(step), 1e-12);
  }
  EXPECT_EQ(optimizer->state().scalars.at("step"), "8");
}

TEST(MtDao, NuOneIsAdopt) {
  MtDaoConfig config;
  config.betas = {0.9};
  config.nus = {1.0};
  config.beta2 = 0.999;
  std::vector<at::Tensor> params = makeParams(2);
  auto optimizer = makeMtDao(config, params, nullptr, 0.02);
  // ADOPT (arXiv 2411.02853, Alg. 1 with clipping): v0 = g0^2; then
  // m = b1 m + (1 - b1) clip(g / max(sqrt v, eps), t^0.25); p -= lr m; v = b2 v + (1 - b2) g^2.
  std::vector<at::Tensor> p, m, v;
  for (const at::Tensor& x : params) {
    p.push_back(x.clone());
    m.push_back(at::zeros_like(x));
    v.push_back(at::zeros_like(x));
  }
  for (int t = 0; t < 6; ++t) {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor g = gradientFor(p[i], 0, t, i);
      params[i].mutable_grad() = g.clone();
      if (t == 0) {
        v[i] = g * g;
        continue;
      }
      const double clip = std::pow(t, 0.25);
      m[i] = 0.9 * m[i] + 0.1 * at::clamp(g / at::clamp_min(at::sqrt(v[i]), 1e-6), -clip, clip);
      p[i] = p[i] - 0.02 * m[i];
      v[i] = 0.999 * v[i] + 0.001 * g * g;
    }
    optimizer->step();
    for (size_t i = 0; i < params.size(); ++i) {
      expectTensorsEqual(params[i], p[i], "ADOPT step " + std::to_string(t) + " parameter " + std::to_string(i),
                         1e-12);
    }
  }
}

TEST(MtDao, AdamwFormIsBiasCorrectedQhAdamW) {
  MtDaoConfig config;
  config.form = "adamw";
  config.betas = {0.9};
  config.nus = {0.7};
  config.beta2 = 0.95;
  config.eps = 1e-8;
  config.weight_decay = 0.1;
  std::vector<at::Tensor> params = makeParams(3);
  auto optimizer = makeMtDao(config, params, nullptr, 0.01);
  std::vector<at::Tensor> p, m, v;
  for (const at::Tensor& x : params) {
    p.push_back(x.clone());
    m.push_back(at::zeros_like(x));
    v.push_back(at::zeros_like(x));
  }
  for (int t = 0; t < 5; ++t) {
    const double lr = scheduledLr(t);
    optimizer->setLearningRate(lr);
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor g = gradientFor(p[i], 0, t, i);
      params[i].mutable_grad() = g.clone();
      const int s = t + 1;
      p[i] = p[i] * (1 - lr / 0.01 * 0.1);
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.95 * v[i] + 0.05 * g * g;
      const at::Tensor mHat = m[i] / (1 - std::pow(0.9, s));
      const at::Tensor vHat = v[i] / (1 - std::pow(0.95, s));
      p[i] = p[i] - lr * (0.3 * g + 0.7 * mHat) / (at::sqrt(vHat) + 1e-8);
    }
    optimizer->step();
    for (size_t i = 0; i < params.size(); ++i) {
      expectTensorsEqual(params[i], p[i], "AdamW form step " + std::to_string(t) + " parameter " + std::to_string(i),
                         1e-12);
    }
  }
}

TEST(MtDao, StateRoundTripContinuesBitwise) {
  const MtDaoConfig config = twoMomenta();
  std::vector<at::Tensor> params = makeParams(4);
  auto original = makeMtDao(config, params, nullptr, 0.01);
  auto gradsAt = [](std::vector<at::Tensor>& ps, int step) {
    for (size_t i = 0; i < ps.size(); ++i) ps[i].mutable_grad() = gradientFor(ps[i], 0, step, i);
  };
  for (int step = 0; step < 3; ++step) {
    gradsAt(params, step);
    original->step();
  }
  OptimizerState saved = original->state();
  for (auto& [kind, tensors] : saved.perParameter) {
    for (auto& t : tensors) t = t.clone();
  }
  EXPECT_EQ(saved.scalars.at("step"), "3");
  std::vector<at::Tensor> copy = {params[0].clone(), params[1].clone()};
  auto restored = makeMtDao(config, copy, nullptr, 0.01);
  restored->loadState(saved);
  for (int step = 3; step < 6; ++step) {
    gradsAt(params, step);
    gradsAt(copy, step);
    original->step();
    restored->step();
  }
  const OptimizerState a = original->state(), b = restored->state();
  for (size_t i = 0; i < params.size(); ++i) {
    expectTensorsEqual(copy[i], params[i], "restored parameter " + std::to_string(i));
    for (const auto& [kind, tensors] : a.perParameter) {
      expectTensorsEqual(b.perParameter.at(kind)[i], tensors[i], "restored " + kind);
    }
  }
  EXPECT_EQ(b.scalars.at("step"), "6");
  OptimizerState wrong = saved;
  wrong.perParameter.erase("mt_dao/momentum_1");
  EXPECT_THROW(restored->loadState(wrong), InvalidArgument);
  wrong = saved;
  wrong.scalars.erase("step");
  EXPECT_THROW(restored->loadState(wrong), InvalidArgument);
}

void expectConfigError(const MtDaoConfig& config, const std::string& field, double lr0 = 0.01) {
  try {
    makeMtDao(config, makeParams(5), nullptr, lr0);
    ADD_FAILURE() << "no ConfigError for " << field;
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

TEST(MtDao, BadConfigNamesTheField) {
  MtDaoConfig c;
  c.form = "sgd";
  expectConfigError(c, "mt_dao.form");
  c = {};
  c.betas = {1.0};
  expectConfigError(c, "mt_dao.betas");
  c = {};
  c.nus = {0.5, 0.5};
  expectConfigError(c, "mt_dao.nus");
  c = twoMomenta();
  c.nus = {0.7, 0.4};  // sums to 1.1
  expectConfigError(c, "mt_dao.nus");
  c.nus = {-0.1, 0.4};
  expectConfigError(c, "mt_dao.nus");
  c = {};
  c.beta2 = 1.0;
  expectConfigError(c, "mt_dao.beta2");
  c = {};
  c.eps = 0;
  expectConfigError(c, "mt_dao.eps");
  c = {};
  c.weight_decay = -1;
  expectConfigError(c, "mt_dao.weight_decay");
  c = {};
  c.sync_params = 0;
  expectConfigError(c, "mt_dao.sync_params");
  c = {};
  c.sync_momenta = {32, 32};
  expectConfigError(c, "mt_dao.sync_momenta");
  c.sync_momenta = {0};
  expectConfigError(c, "mt_dao.sync_momenta");
  c = {};
  c.sync_second = 0;
  expectConfigError(c, "mt_dao.sync_second");
  expectConfigError(MtDaoConfig{}, "optim.lr", 0.0);
}

// ---- Real processes ------------------------------------------------------------

// Collective: whether `local` holds the same values on every rank.
bool equalOnAllRanks(comm::Communicator& comm, const at::Tensor& local) {
  const at::Tensor mine = local.reshape({-1}).contiguous();
  at::Tensor all = at::empty({comm.size() * mine.numel()}, mine.options());
  comm.allGather(mine, all);
  for (int r = 0; r < comm.size(); ++r) {
    if (!at::equal(all.narrow(0, r * mine.numel(), mine.numel()), mine)) return false;
  }
  return true;
}

// Args: identical (0|1): every rank gets worker 0's gradients.
// K_x = 3, K_0 = 2, K_1 = 4, K_v = 5 over 10 steps; every rank simulates
// every worker, averaging each simulated state at its own interval.
TESSERA_WORKER(mt_dao_sync_schedule) {
  at::set_num_threads(1);
  const comm::CommPtr comm = ctx.world();
  const int workers = comm->size();
  const int rank = comm->rank();
  const bool identical = ctx.arg("identical") == "1";
  const MtDaoConfig config = twoMomenta();
  constexpr int kSteps = 10;

  std::vector<at::Tensor> params = makeParams(6);
  std::vector<std::vector<QhAdopt>> sim(workers);  // [worker][parameter]
  for (auto& w : sim) {
    for (const at::Tensor& p : params) w.push_back(startFrom(p, 2));
  }
  auto optimizer = makeMtDao(config, params, comm, 0.01);
  int syncCalls = 0;
  for (int step = 0; step < kSteps; ++step) {
    const double lr = scheduledLr(step);
    optimizer->setLearningRate(lr);
    for (int w = 0; w < workers; ++w) {
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor g = gradientFor(sim[w][i].p, identical ? 0 : w, step, i);
        if (w == rank) params[i].mutable_grad() = g.clone();
        qhAdoptStep(sim[w][i], g, step, lr, 0.01, config);
      }
    }
    optimizer->step();

    // Which states average after update number T = step + 1; the simulated
    // workers' averages are the mean of their pre-sync values.
    const int T = step + 1;
    const bool syncParams = T % 3 == 0, syncU0 = T % 2 == 0, syncU1 = T % 4 == 0, syncV = T % 5 == 0;
    syncCalls += (syncParams || syncU0 || syncU1 || syncV) ? 1 : 0;
    auto average = [&](auto member) {
      for (size_t i = 0; i < params.size(); ++i) {
        at::Tensor sum = at::zeros_like(params[i]);
        for (int w = 0; w < workers; ++w) sum = sum + member(sim[w][i]);
        for (int w = 0; w < workers; ++w) member(sim[w][i]) = sum / workers;
      }
    };
    if (syncParams) average([](QhAdopt& s) -> at::Tensor& { return s.p; });
    if (syncU0) average([](QhAdopt& s) -> at::Tensor& { return s.u[0]; });
    if (syncU1) average([](QhAdopt& s) -> at::Tensor& { return s.u[1]; });
    if (syncV) average([](QhAdopt& s) -> at::Tensor& { return s.v; });

    const std::string what = "rank " + std::to_string(rank) + " after update " + std::to_string(T);
    expectMatches(*optimizer, params, sim[rank], what, 1e-12);
    // Equal across ranks exactly when the state just averaged (or, with
    // identical gradients, always). Momenta are still zero after update 1.
    const OptimizerState state = optimizer->state();
    const auto checkAgreement = [&](const std::string& kind, const at::Tensor& t, bool synced) {
      const bool equal = equalOnAllRanks(*comm, t);
      const bool expected = identical || synced || (T == 1 && kind != "mt_dao/second");
      TESSERA_CHECK(equal == expected, what << ": '" << kind << "' equal on all ranks = " << equal << ", expected "
                                            << expected);
    };
    for (size_t i = 0; i < params.size(); ++i) {
      checkAgreement("parameter", params[i], syncParams);
      checkAgreement("mt_dao/momentum_0", state.perParameter.at("mt_dao/momentum_0")[i], syncU0);
      checkAgreement("mt_dao/momentum_1", state.perParameter.at("mt_dao/momentum_1")[i], syncU1);
      checkAgreement("mt_dao/second", state.perParameter.at("mt_dao/second")[i], syncV);
    }
  }
  // One all-reduce per update where anything is due (all float64).
  TESSERA_CHECK_EQ(comm->stats().of(comm::OpKind::kAllReduce).calls, static_cast<uint64_t>(syncCalls));
}

TEST(MtDaoMultiProcess, EachStateAveragesAtItsOwnInterval) {
  auto result = testing::runWorkers("mt_dao_sync_schedule",
                                    {.ranks = 2, .deadline = std::chrono::seconds(60), .args = {{"identical", "0"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(MtDaoMultiProcess, IdenticalGradientsEqualOneWorkerQhAdopt) {
  auto result = testing::runWorkers("mt_dao_sync_schedule",
                                    {.ranks = 3, .deadline = std::chrono::seconds(60), .args = {{"identical", "1"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::optim
