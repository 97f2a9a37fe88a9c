// LowPrecisionAdamW (MS-AMP O2/O3 optimizer side) against an independent
// reference: AdamW written out in fp64 from the published update rule
// (Loshchilov & Hutter, torch's AdamW), with the same quantize points --
// m -> E4M3 at a power-of-two scale, v -> FP16 at a power-of-two scale,
// the FP16 master -- done by this file's own rounding to a table of the
// format's values (not the codec under test).
//
// Each step is checked from the state the optimizer actually holds (a
// transition check): the reference starts from the optimizer's codes,
// scales, v and parameters and predicts the next ones. So every step is
// tested exactly, and a one-ulp difference in an intermediate cannot grow.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/optim/low_precision_adamw.h"
#include "tessera/optim/optimizer.h"
#include "tests/harness/multiprocess.h"

namespace tessera::optim {
namespace {

// ---- The reference's own number formats ---------------------------------

// Positive finite values of a format in code order (= magnitude order; the
// index is the code without its sign bit, so "even index" is "even mantissa").
std::vector<double> e4m3Values() {
  std::vector<double> values;
  for (int code = 0; code < 0x7F; ++code) {  // 0x7F is NaN
    const int e = code >> 3, f = code & 7;
    values.push_back(e == 0 ? f * std::ldexp(1.0, -9) : (1 + f / 8.0) * std::ldexp(1.0, e - 7));
  }
  return values;
}
std::vector<double> fp16Values() {
  std::vector<double> values;
  for (int code = 0; code < 0x7C00; ++code) {  // 0x7C00 is inf
    const int e = code >> 10, f = code & 1023;
    values.push_back(e == 0 ? f * std::ldexp(1.0, -24) : (1 + f / 1024.0) * std::ldexp(1.0, e - 15));
  }
  return values;
}

struct Rounded {
  int index;      // the code without the sign
  bool nearTie;   // within `slack` of a midpoint: either neighbour is acceptable
};
// Round |x| to nearest in `values`, ties to the even index; beyond the
// largest: saturate. `slack`: how far the optimizer's fp32 value may be from
// x (fp32 rounding of the terms that made it).
Rounded roundToTable(double x, const std::vector<double>& values, double slack) {
  const double a = std::fabs(x);
  auto it = std::lower_bound(values.begin(), values.end(), a);
  if (it == values.end()) return {static_cast<int>(values.size()) - 1, false};
  const int hi = static_cast<int>(it - values.begin());
  if (*it == a || hi == 0) return {hi, false};
  const int lo = hi - 1;
  const double mid = (values[lo] + values[hi]) / 2;
  const bool nearTie = std::fabs(a - mid) <= slack;
  if (a < mid) return {lo, nearTie};
  if (a > mid) return {hi, nearTie};
  return {lo % 2 == 0 ? lo : hi, true};
}

double pow2Scale(double amax, double maxValue) {
  if (!(amax > 0) || !std::isfinite(amax)) return 1;
  double s = 1;
  while (amax * s > maxValue) s /= 2;
  while (amax * s * 2 <= maxValue) s *= 2;
  return s;
}

// ---- One parameter's state as the reference sees it ----------------------

struct RefState {
  std::vector<double> p;        // parameter (as the optimizer holds it)
  std::vector<double> m;        // decoded first moment (codes / scale)
  std::vector<double> v;        // decoded second moment
  bool fresh = true;
};

std::vector<double> toDoubles(const at::Tensor& t) {
  const at::Tensor d = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

RefState snapshot(const at::Tensor& p, const OptimizerState& s, size_t i) {
  RefState r;
  r.p = toDoubles(p);
  const at::Tensor& codes = s.perParameter.at("exp_avg")[i];
  if (!codes.defined()) {
    r.m.assign(r.p.size(), 0);
    r.v.assign(r.p.size(), 0);
    return r;
  }
  r.fresh = false;
  const std::vector<double> table = e4m3Values();
  const double sm = s.perParameterAux.at("exp_avg.scale")[i].item<double>();
  const double sv = s.perParameterAux.at("exp_avg_sq.scale")[i].item<double>();
  const at::Tensor c = codes.contiguous();
  for (int64_t k = 0; k < c.numel(); ++k) {
    const uint8_t code = c.data_ptr<uint8_t>()[k];
    const double mag = table.at(code & 0x7F);
    r.m.push_back(((code & 0x80) ? -mag : mag) / sm);
  }
  for (double x : toDoubles(s.perParameter.at("exp_avg_sq")[i])) r.v.push_back(x / sv);
  return r;
}

struct Hyper {
  double lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
};

// Checks one parameter's transition: `before` + grad -> the optimizer's state
// `after` and parameter `pAfter`. `master`: the parameter is an FP16 master.
void expectTransition(const RefState& before, const at::Tensor& grad, int64_t step, const Hyper& h,
                      const OptimizerState& after, size_t i, const at::Tensor& pAfter, bool master,
                      const std::string& what) {
  const std::vector<double> g = toDoubles(grad);
  const size_t n = g.size();
  const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
  // Per element: the exact values, and how far an fp32 computation of each
  // may be from it (4 units of 2^-24 of the terms' magnitudes: a few
  // roundings, with fp32 betas; terms may cancel, so not relative to the sum).
  std::vector<double> m(n), v(n), w(n), mSlack(n), vSlack(n), wSlack(n);
  double amaxM = 0, amaxV = 0;
  const double u = std::ldexp(1.0, -24);
  for (size_t k = 0; k < n; ++k) {
    m[k] = h.beta1 * before.m[k] + (1 - h.beta1) * g[k];
    v[k] = h.beta2 * before.v[k] + (1 - h.beta2) * g[k] * g[k];
    const double update = h.lr / bc1 * m[k] / (std::sqrt(v[k]) / std::sqrt(bc2) + h.eps);
    const double decayed = before.p[k] * (1 - h.lr * h.wd);
    w[k] = decayed - update;
    mSlack[k] = 4 * u * (std::fabs(h.beta1 * before.m[k]) + std::fabs((1 - h.beta1) * g[k]));
    vSlack[k] = 4 * u * v[k];
    wSlack[k] = 4 * u * (std::fabs(decayed) + std::fabs(update)) + 1e-6 * std::fabs(update);
    amaxM = std::max(amaxM, std::fabs(static_cast<double>(static_cast<float>(m[k]))));
    amaxV = std::max(amaxV, static_cast<double>(static_cast<float>(v[k])));
  }
  // Scales: from the fp32 amax (the quantize point), exact.
  const double sm = pow2Scale(amaxM, 448), sv = pow2Scale(amaxV, 65504);
  EXPECT_EQ(after.perParameterAux.at("exp_avg.scale")[i].item<double>(), sm) << what;
  EXPECT_EQ(after.perParameterAux.at("exp_avg_sq.scale")[i].item<double>(), sv) << what;
  const std::vector<double> e4m3 = e4m3Values(), fp16 = fp16Values();
  const at::Tensor codes = after.perParameter.at("exp_avg")[i].contiguous();
  const std::vector<double> vStored = toDoubles(after.perParameter.at("exp_avg_sq")[i]);
  const std::vector<double> p = toDoubles(pAfter);
  int ties = 0;
  for (size_t k = 0; k < n; ++k) {
    const double mScaled = static_cast<double>(static_cast<float>(m[k])) * sm;
    const Rounded rm = roundToTable(mScaled, e4m3, mSlack[k] * sm);
    const int expected = (std::signbit(mScaled) ? 0x80 : 0) | rm.index;
    const int got = codes.data_ptr<uint8_t>()[k];
    if (rm.nearTie) {
      ++ties;
      EXPECT_LE(std::abs((got & 0x7F) - rm.index), 1) << what << " m element " << k;
    } else {
      ASSERT_EQ(got, expected) << what << " m element " << k << " value " << mScaled;
    }
    const Rounded rv = roundToTable(static_cast<double>(static_cast<float>(v[k])) * sv, fp16, vSlack[k] * sv);
    if (rv.nearTie) {
      ++ties;
      EXPECT_NEAR(vStored[k], fp16[rv.index], fp16[rv.index] * 1e-3) << what << " v element " << k;
    } else {
      ASSERT_EQ(vStored[k], fp16[rv.index]) << what << " v element " << k;
    }
    if (master) {
      // p = fp16(w), exactly; near a midpoint either neighbour.
      const Rounded rw = roundToTable(w[k], fp16, wSlack[k]);
      const double nearest = (w[k] < 0 ? -1 : 1) * fp16[rw.index];
      if (rw.nearTie) {
        ++ties;
        ASSERT_NEAR(p[k], nearest, std::fabs(nearest) * 1e-3) << what << " master element " << k;
      } else {
        ASSERT_EQ(p[k], nearest) << what << " master element " << k << ": fp16(" << w[k] << ")";
      }
    } else {
      // One fp32 step: p rounds once more (1/2 ulp of w).
      ASSERT_NEAR(p[k], w[k], wSlack[k] + std::fabs(w[k]) * u) << what << " parameter element " << k;
    }
  }
  // Near-ties are not rare by chance alone: beta2 * v_prev of an FP16 value
  // often lands exactly on an FP16 midpoint (0.95 * 2130 = 2023.5), and the
  // fp32 beta (0.95f) and a tiny g^2 then decide. A slack so wide that most
  // elements pass as ties would make this test toothless: bound them.
  EXPECT_LE(ties, static_cast<int>(n / 8 + 2)) << what << ": near-ties everywhere; the slack is too wide";
}

// Gradients over 7 decades (tiny ones exercise the subnormals and v's scale).
at::Tensor makeGrad(at::IntArrayRef shape, int step, int which) {
  torch::manual_seed(100 * step + which);
  return torch::randn(shape) * torch::pow(10.0, torch::rand(shape) * 7 - 7);
}

OptimizerConfig lowPrecisionConfig(const std::string& master) {
  OptimizerConfig c;
  c.states = "fp8";
  c.master = master;
  c.beta2 = 0.95;
  c.weight_decay = 0.1;
  return c;
}

// ---- Tests ---------------------------------------------------------------

TEST(LowPrecisionAdamW, ConfigErrorsNameTheField) {
  OptimizerConfig c;
  c.states = "fp4";
  try {
    c.validate();
    FAIL() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("optim.states"), std::string::npos) << e.what();
  }
  c.states = "fp32";
  c.master = "bf16";
  try {
    c.validate();
    FAIL() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("optim.master"), std::string::npos) << e.what();
  }
  c.master = "fp32";
  c.name = "sgd";
  c.states = "fp8";
  EXPECT_THROW(makeOptimizer(c, {torch::zeros({2})}, 0.1), ConfigError);
  c.states = "fp32";
  c.master = "fp16";
  try {
    makeOptimizer(c, {torch::zeros({2})}, 0.1);
    FAIL() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("optim.master"), std::string::npos) << e.what();
  }
}

TEST(LowPrecisionAdamW, FactoryBuildsItForLowPrecisionSettings) {
  at::Tensor p = torch::ones({3});
  p.mutable_grad() = torch::full({3}, 0.5);
  auto optimizer = makeOptimizer(lowPrecisionConfig("fp32"), {p}, 0.1);
  optimizer->step();
  const OptimizerState s = optimizer->state();
  EXPECT_EQ(s.perParameter.at("exp_avg")[0].scalar_type(), at::kByte);
  EXPECT_EQ(s.perParameter.at("exp_avg_sq")[0].scalar_type(), at::kHalf);
  EXPECT_EQ(s.perParameterAux.at("exp_avg.scale")[0].sizes(), at::IntArrayRef({1}));
}

TEST(LowPrecisionAdamW, PowerOfTwoScale) {
  EXPECT_EQ(powerOfTwoScale(1.0f, 448), 256.0f);  // 512 would pass 448
  EXPECT_EQ(powerOfTwoScale(448.0f, 448), 1.0f);
  EXPECT_EQ(powerOfTwoScale(448.5f, 448), 0.5f);
  EXPECT_EQ(powerOfTwoScale(0.875f, 448), 512.0f);  // 0.875 * 512 = 448 exactly
  EXPECT_EQ(powerOfTwoScale(3.0f, 65504), 16384.0f);
  EXPECT_EQ(powerOfTwoScale(0.0f, 448), 1.0f);
  EXPECT_EQ(powerOfTwoScale(INFINITY, 448), 1.0f);
  EXPECT_EQ(powerOfTwoScale(NAN, 448), 1.0f);
  EXPECT_EQ(powerOfTwoScale(1e-44f, 448), std::ldexp(1.0f, 126));  // clamped
}

// With fp32 states and fp32 master the class is AdamW, bit for bit.
TEST(LowPrecisionAdamW, Fp32StatesEqualAdamWBitForBit) {
  OptimizerConfig c;
  torch::manual_seed(3);
  at::Tensor a = torch::randn({5, 7}), b = a.clone();
  auto reference = makeOptimizer(c, {a}, 1e-2);
  LowPrecisionAdamW mine(c, {b}, 1e-2);
  for (int step = 1; step <= 4; ++step) {
    a.mutable_grad() = makeGrad({5, 7}, step, 0);
    b.mutable_grad() = a.grad().clone();
    reference->step();
    mine.step();
    ASSERT_TRUE(torch::equal(a, b)) << "step " << step;
  }
}

class Fp8StatesFollowReference : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp8StatesFollowReference, EveryStep) {
  const bool master = GetParam() == "fp16";
  torch::manual_seed(11);
  std::vector<at::Tensor> params = {torch::randn({37, 5}), torch::randn({64}) * 3, torch::zeros({4})};
  const Hyper h;
  LowPrecisionAdamW optimizer(lowPrecisionConfig(GetParam()), params, h.lr);
  for (int step = 1; step <= 6; ++step) {
    std::vector<RefState> before;
    const OptimizerState s0 = optimizer.state();
    for (size_t i = 0; i < params.size(); ++i) {
      before.push_back(snapshot(params[i], s0, i));
      // The parameter of an O3 optimizer is its master: before the first
      // step the master is fp16(p).
      if (master && before.back().fresh) {
        for (double& x : before.back().p) x = static_cast<double>(static_cast<float>(at::Half(static_cast<float>(x))));
      }
      params[i].mutable_grad() = i == 2 ? torch::zeros({4}) : makeGrad(params[i].sizes(), step, static_cast<int>(i));
    }
    // OptimizerState aliases live buffers and step() replaces some, so the
    // snapshot above copied what it needs.
    optimizer.step();
    const OptimizerState s1 = optimizer.state();
    for (size_t i = 0; i < params.size(); ++i) {
      expectTransition(before[i], params[i].grad(), step, h, s1, i, params[i], master,
                       "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
    if (master) {
      for (size_t i = 0; i < params.size(); ++i) {
        ASSERT_TRUE(torch::equal(s1.perParameter.at("master")[i].to(at::kFloat), params[i])) << "master != parameter";
      }
    }
    // The all-zero gradient: m = v = 0 everywhere, scales 1.
    EXPECT_EQ(s1.perParameterAux.at("exp_avg.scale")[2].item<float>(), 1.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(Masters, Fp8StatesFollowReference, ::testing::Values("fp32", "fp16"));

OptimizerState cloneState(const OptimizerState& s) {
  OptimizerState out = s;
  for (auto* maps : {&out.perParameter, &out.perParameterAux}) {
    for (auto& [kind, tensors] : *maps) {
      for (at::Tensor& t : tensors) {
        if (t.defined()) t = t.clone();
      }
    }
  }
  return out;
}

TEST(LowPrecisionAdamW, StateRoundTripResumesBitForBit) {
  torch::manual_seed(12);
  std::vector<at::Tensor> a = {torch::randn({6, 3}), torch::randn({10})};
  LowPrecisionAdamW first(lowPrecisionConfig("fp16"), a, 1e-2);
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < a.size(); ++i) a[i].mutable_grad() = makeGrad(a[i].sizes(), step, static_cast<int>(i));
    first.step();
  }
  std::vector<at::Tensor> b = {a[0].detach().clone(), a[1].detach().clone()};
  LowPrecisionAdamW resumed(lowPrecisionConfig("fp16"), b, 1e-2);
  resumed.loadState(cloneState(first.state()));
  for (int step = 4; step <= 6; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].mutable_grad() = makeGrad(a[i].sizes(), step, static_cast<int>(i));
      b[i].mutable_grad() = a[i].grad().clone();
    }
    first.step();
    resumed.step();
    for (size_t i = 0; i < a.size(); ++i) ASSERT_TRUE(torch::equal(a[i], b[i])) << "step " << step << " param " << i;
  }
  const OptimizerState sa = first.state(), sb = resumed.state();
  for (const char* kind : {"exp_avg", "exp_avg_sq", "master"}) {
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(sa.perParameter.at(kind)[i], sb.perParameter.at(kind)[i])) << kind;
  }
}

TEST(LowPrecisionAdamW, LoadWithoutScalesNamesTheFix) {
  at::Tensor p = torch::randn({4});
  p.mutable_grad() = torch::randn({4});
  LowPrecisionAdamW optimizer(lowPrecisionConfig("fp32"), {p}, 1e-2);
  optimizer.step();
  OptimizerState s = cloneState(optimizer.state());
  s.perParameterAux.erase("exp_avg.scale");
  const at::Tensor before = s.perParameter.at("exp_avg")[0].clone();
  try {
    optimizer.loadState(s);
    FAIL() << "no InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string text = e.what();
    EXPECT_NE(text.find("exp_avg.scale"), std::string::npos) << text;
    EXPECT_NE(text.find("saved mesh"), std::string::npos) << text;
  }
  // Nothing changed, and an fp32 AdamW state is refused by dtype.
  EXPECT_TRUE(torch::equal(optimizer.state().perParameter.at("exp_avg")[0], before));
  OptimizerState fp32 = cloneState(optimizer.state());
  fp32.perParameter["exp_avg"][0] = torch::zeros({4});
  EXPECT_THROW(optimizer.loadState(fp32), InvalidArgument);
}

TEST(WholeTensorOwners, GreedyBySizeDeterministic) {
  // Sizes 100, 60, 50, 10, 5 over 2 ranks: 100 -> r0; 60 -> r1; 50 -> r1
  // (60 < 100); 10 -> r0 (100 < 110); 5 -> r0 (110 = 110: lower rank).
  std::vector<at::Tensor> params = {torch::zeros({10}), torch::zeros({100}), torch::zeros({5}), torch::zeros({6, 10}),
                                    torch::zeros({50})};
  EXPECT_EQ(wholeTensorOwners(params, 2), (std::vector<int>{0, 0, 0, 1, 1}));
  EXPECT_EQ(wholeTensorOwners(params, 1), (std::vector<int>(5, 0)));
  EXPECT_THROW(wholeTensorOwners(params, 0), InvalidArgument);
}

// Two ranks with whole-tensor ZeRO vs a single-process optimizer in the same
// process: bit-identical parameters after every step; each rank holds state
// only for what it owns.
TESSERA_WORKER(lp_adamw_zero) {
  const comm::CommPtr world = ctx.world();
  const auto makeParams = [] {
    torch::manual_seed(21);
    return std::vector<at::Tensor>{torch::randn({10}), torch::randn({10, 10}), torch::randn({5}),
                                   torch::randn({6, 10}), torch::randn({50})};
  };
  std::vector<at::Tensor> sharded = makeParams(), reference = makeParams();
  LowPrecisionAdamW zero(lowPrecisionConfig("fp16"), sharded, 1e-2, WholeTensorShards{world});
  LowPrecisionAdamW single(lowPrecisionConfig("fp16"), reference, 1e-2);
  TESSERA_CHECK(zero.owners() == wholeTensorOwners(sharded, 2), "owners differ from the greedy rule");
  for (int step = 1; step <= 4; ++step) {
    for (size_t i = 0; i < sharded.size(); ++i) {
      reference[i].mutable_grad() = makeGrad(reference[i].sizes(), step, static_cast<int>(i));
      // Non-owners get a different gradient: they must ignore it.
      sharded[i].mutable_grad() = zero.owners()[i] == world->rank() ? reference[i].grad().clone()
                                                                     : reference[i].grad() * 3;
    }
    zero.step();
    single.step();
    for (size_t i = 0; i < sharded.size(); ++i) {
      testing::expectTensorsEqual(sharded[i], reference[i], "step " + std::to_string(step) + " parameter " +
                                                                std::to_string(i));
    }
  }
  const OptimizerState s = zero.state();
  for (size_t i = 0; i < sharded.size(); ++i) {
    const bool owned = zero.owners()[i] == world->rank();
    TESSERA_CHECK(s.perParameter.at("exp_avg")[i].defined() == owned, "exp_avg of parameter " << i);
    TESSERA_CHECK(s.perParameter.at("master")[i].defined() == owned, "master of parameter " << i);
  }
}

TEST(LowPrecisionAdamW, WholeTensorZeroEqualsSingleProcess) {
  testing::RunOptions options;
  options.ranks = 2;
  const auto result = testing::runWorkers("lp_adamw_zero", options);
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::optim
