#include "tessera/optim/low_precision_adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <algorithm>
#include <cmath>
#include <numeric>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/numerics/fp8.h"

namespace tessera::optim {
namespace {

constexpr float kFp16Max = 65504.0f;
constexpr const char* kWho = "LowPrecisionAdamW";

// float32 {1} holding `value` (a per-tensor scale, as state() shows it).
at::Tensor scaleTensor(float value) { return at::full({1}, value, at::TensorOptions().dtype(at::kFloat)); }

float amaxOf(const at::Tensor& t) { return t.numel() == 0 ? 0.0f : t.abs().max().item<float>(); }

// m (float32, contiguous) -> E4M3 codes of m * scale, saturating; returns the scale.
float encodeFirstMoment(const at::Tensor& m, at::Tensor& codes) {
  const float scale = powerOfTwoScale(amaxOf(m), numerics::fp8Max(numerics::Fp8Format::kE4M3));
  numerics::encodeFp8(m.data_ptr<float>(), m.numel(), scale, codes.data_ptr<uint8_t>(), numerics::Fp8Format::kE4M3,
                      numerics::Overflow::kSaturate);
  return scale;
}

at::Tensor decodeFirstMoment(const at::Tensor& codes, float scale) {
  at::Tensor m = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  // 1 / scale is exact: the scale is a normal power of two.
  numerics::decodeFp8(codes.data_ptr<uint8_t>(), codes.numel(), 1.0f / scale, m.data_ptr<float>(),
                      numerics::Fp8Format::kE4M3);
  return m;
}

// The scalar at index i of a {1} scale tensor.
float scaleAt(const std::vector<at::Tensor>& scales, size_t i) { return scales[i].item<float>(); }

}  // namespace

float powerOfTwoScale(float amax, float maxValue) {
  if (!(amax > 0) || !std::isfinite(amax)) return 1.0f;
  // Candidate from logarithms, then corrected with exact tests (ldexp in
  // double is exact for these ranges), so rounding in log2 cannot matter.
  int k = static_cast<int>(std::floor(std::log2(static_cast<double>(maxValue)) - std::log2(static_cast<double>(amax))));
  auto fits = [&](int e) { return std::ldexp(static_cast<double>(amax), e) <= static_cast<double>(maxValue); };
  while (!fits(k)) --k;
  while (fits(k + 1)) ++k;
  k = std::clamp(k, -126, 126);
  return std::ldexp(1.0f, k);
}

std::vector<int> wholeTensorOwners(const std::vector<at::Tensor>& parameters, int ranks) {
  TESSERA_CHECK_ARG(ranks >= 1, "wholeTensorOwners: ranks must be >= 1, got " << ranks);
  std::vector<size_t> order(parameters.size());
  std::iota(order.begin(), order.end(), 0);
  // Largest first, ties by index: stable_sort keeps index order among equals.
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return parameters[a].numel() > parameters[b].numel(); });
  std::vector<int64_t> load(ranks, 0);
  std::vector<int> owners(parameters.size(), 0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());  // first minimum
    owners[i] = r;
    load[r] += parameters[i].numel();
  }
  return owners;
}

LowPrecisionAdamW::LowPrecisionAdamW(const OptimizerConfig& config, std::vector<at::Tensor> parameters, double lr,
                                     WholeTensorShards shards)
    : ParameterOptimizer(std::move(parameters), lr), config_(config) {
  config_.validate();
  TESSERA_CHECK_CONFIG(config_.name == "adamw", "optim.name",
                       "LowPrecisionAdamW is AdamW; got '" << config_.name << "'");
  fp8States_ = config_.states == "fp8";
  fp16Master_ = config_.master == "fp16";
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const at::Tensor& p = parameters_[i];
    TESSERA_CHECK_ARG(p.defined() && p.is_floating_point(), kWho << ": parameter " << i << " is not floating point");
    // The codec's buffer loops read host memory.
    TESSERA_CHECK_T(NotSupported, !fp8States_ || p.is_cpu(),
                    kWho << ": parameter " << i << " is on " << p.device()
                         << "; FP8 optimizer states use the CPU codec (core/numerics/fp8.h): keep optim.states = "
                            "fp32 off the CPU");
    TESSERA_CHECK_ARG(fp16Master_ || p.scalar_type() == at::kFloat,
                      kWho << ": parameter " << i << " is " << p.scalar_type()
                           << "; without FP16 master weights the parameters must be float32 (set optim.master = fp16)");
  }
  if (shards.comm && shards.comm->size() > 1) {
    comm_ = shards.comm;
    rank_ = comm_->rank();
    owners_ = wholeTensorOwners(parameters_, comm_->size());
  } else {
    owners_.assign(parameters_.size(), 0);
  }
  const size_t n = parameters_.size();
  expAvg_.resize(n);
  expAvgSq_.resize(n);
  expAvgScale_.resize(n);
  expAvgSqScale_.resize(n);
  master_.resize(n);
}

void LowPrecisionAdamW::updateOne(size_t i, const at::Tensor& gradIn, double biasCorrection1, double biasCorrection2) {
  at::Tensor& p = parameters_[i];
  const at::Tensor grad = gradIn.scalar_type() == at::kFloat ? gradIn : gradIn.to(at::kFloat);
  const bool first = !expAvg_[i].defined();
  if (fp16Master_ && !master_[i].defined()) master_[i] = p.detach().to(at::kHalf).contiguous();
  // w: the fp32 value the update is computed on (the parameter itself, or a
  // widened copy of the FP16 master).
  at::Tensor w = fp16Master_ ? master_[i].to(at::kFloat) : p;
  at::Tensor m;
  at::Tensor v;
  if (first) {
    m = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
    v = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
  } else if (fp8States_) {
    m = decodeFirstMoment(expAvg_[i], scaleAt(expAvgScale_, i));
    v = expAvgSq_[i].to(at::kFloat).mul_(1.0f / scaleAt(expAvgSqScale_, i));  // exact: power-of-two scale
  } else {
    m = expAvg_[i];  // fp32 states are updated in place, as AdamW does
    v = expAvgSq_[i];
  }
  // optimizer.cc's AdamW, operation for operation.
  w.mul_(1 - lr_ * config_.weight_decay);
  m.mul_(config_.beta1).add_(grad, 1 - config_.beta1);
  v.mul_(config_.beta2).addcmul_(grad, grad, 1 - config_.beta2);
  const at::Tensor denom = (v.sqrt() / std::sqrt(biasCorrection2)).add_(config_.eps);
  w.addcdiv_(m, denom, -lr_ / biasCorrection1);

  if (fp8States_) {
    if (first) {
      expAvg_[i] = at::empty(p.sizes(), p.options().dtype(at::kByte));
      expAvgScale_[i] = scaleTensor(1.0f);
      expAvgSqScale_[i] = scaleTensor(1.0f);
    }
    const at::Tensor mContiguous = m.contiguous();
    expAvgScale_[i].fill_(encodeFirstMoment(mContiguous, expAvg_[i]));
    const float vScale = powerOfTwoScale(amaxOf(v), kFp16Max);
    expAvgSqScale_[i].fill_(vScale);
    expAvgSq_[i] = v.mul_(vScale).to(at::kHalf);  // v * vScale is exact; one RNE to fp16
  } else if (first) {
    expAvg_[i] = m;
    expAvgSq_[i] = v;
  }
  if (fp16Master_) {
    master_[i].copy_(w);  // RNE to fp16
    p.copy_(master_[i]);  // exact for float32 (and float16) parameters
  }
}

void LowPrecisionAdamW::broadcastFromOwners() {
  // One broadcast per parameter, all in flight at once; a non-contiguous
  // parameter travels through a contiguous copy.
  std::vector<comm::WorkPtr> works;
  std::vector<std::pair<size_t, at::Tensor>> staged;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    at::Tensor& p = parameters_[i];
    if (p.is_contiguous()) {
      works.push_back(comm_->broadcastAsync(p, owners_[i]));
    } else {
      staged.emplace_back(i, p.contiguous());
      works.push_back(comm_->broadcastAsync(staged.back().second, owners_[i]));
    }
  }
  for (auto& work : works) work->wait();
  for (auto& [i, t] : staged) parameters_[i].copy_(t);
}

OptimizerStepResult LowPrecisionAdamW::step() {
  at::NoGradGuard noGrad;
  ++step_;
  const double biasCorrection1 = 1 - std::pow(config_.beta1, static_cast<double>(step_));
  const double biasCorrection2 = 1 - std::pow(config_.beta2, static_cast<double>(step_));
  for (size_t i = 0; i < parameters_.size(); ++i) {
    if (owners_[i] != rank_ || !parameters_[i].grad().defined()) continue;
    updateOne(i, parameters_[i].grad(), biasCorrection1, biasCorrection2);
  }
  if (comm_) broadcastFromOwners();
  return {};
}

OptimizerState LowPrecisionAdamW::state() const {
  OptimizerState s;
  s.perParameter["exp_avg"] = expAvg_;
  s.perParameter["exp_avg_sq"] = expAvgSq_;
  if (fp16Master_) s.perParameter["master"] = master_;
  if (fp8States_) {
    s.perParameterAux["exp_avg.scale"] = expAvgScale_;
    s.perParameterAux["exp_avg_sq.scale"] = expAvgSqScale_;
  }
  s.scalars["step"] = std::to_string(step_);
  return s;
}

void LowPrecisionAdamW::loadState(const OptimizerState& s) {
  std::vector<std::string> kinds = {"exp_avg", "exp_avg_sq"};
  if (fp16Master_) kinds.push_back("master");
  checkOptimizerState(kWho, s, parameters_, kinds, {"step"});
  const int64_t step = parseCount(s, "step");
  const at::ScalarType mType = fp8States_ ? at::kByte : at::kFloat;
  const at::ScalarType vType = fp8States_ ? at::kHalf : at::kFloat;
  const auto& m = s.perParameter.at("exp_avg");
  const auto& v = s.perParameter.at("exp_avg_sq");
  for (size_t i = 0; i < parameters_.size(); ++i) {
    TESSERA_CHECK_ARG(m[i].defined() == v[i].defined(),
                      kWho << " state: parameter " << i << " has only one of 'exp_avg' and 'exp_avg_sq'");
    TESSERA_CHECK_ARG(!m[i].defined() || owners_[i] == rank_,
                      kWho << " state: holds moments of parameter " << i << ", which rank " << owners_[i]
                           << " owns under this whole-tensor sharding; load the state saved by the same rank "
                              "of the same mesh");
    TESSERA_CHECK_ARG(!m[i].defined() || (m[i].scalar_type() == mType && v[i].scalar_type() == vType),
                      kWho << " state: parameter " << i << " has 'exp_avg' " << m[i].scalar_type() << " and 'exp_avg_sq' "
                           << v[i].scalar_type() << "; optim.states = " << config_.states << " needs " << mType
                           << " and " << vType << " (load a state saved with the same optim.states)");
    if (fp16Master_) {
      const at::Tensor& master = s.perParameter.at("master")[i];
      TESSERA_CHECK_ARG(master.defined() == m[i].defined() && (!master.defined() || master.scalar_type() == at::kHalf),
                        kWho << " state: parameter " << i << " needs a float16 'master' exactly where it has moments");
    }
  }
  if (fp8States_) {
    for (const char* kind : {"exp_avg.scale", "exp_avg_sq.scale"}) {
      auto it = s.perParameterAux.find(kind);
      const bool anyCodes = std::any_of(m.begin(), m.end(), [](const at::Tensor& t) { return t.defined(); });
      TESSERA_CHECK_ARG(!anyCodes || it != s.perParameterAux.end(),
                        kWho << " state: has FP8 moments but no '" << kind
                             << "' (per-rank scales are kept only for a resume on the mesh that saved them; "
                                "a resharded checkpoint loses them): resume on the saved mesh, or start the "
                                "optimizer state afresh");
      if (it == s.perParameterAux.end()) continue;
      TESSERA_CHECK_ARG(it->second.size() == parameters_.size(),
                        kWho << " state: '" << kind << "' has " << it->second.size() << " tensors for "
                             << parameters_.size() << " parameters");
      for (size_t i = 0; i < parameters_.size(); ++i) {
        if (!m[i].defined()) continue;
        const at::Tensor& t = it->second[i];
        TESSERA_CHECK_ARG(t.defined() && t.numel() == 1 && t.scalar_type() == at::kFloat,
                          kWho << " state: parameter " << i << " has FP8 moments but its '" << kind
                               << "' is not a float32 {1} tensor (a resharded checkpoint?): resume on the saved mesh");
        const float value = t.item<float>();
        TESSERA_CHECK_ARG(value > 0 && std::isfinite(value),
                          kWho << " state: '" << kind << "' of parameter " << i << " is " << value << ", not a scale");
      }
    }
  }
  // Everything checked: copy.
  copyStateInto(s, "exp_avg", expAvg_);
  copyStateInto(s, "exp_avg_sq", expAvgSq_);
  if (fp16Master_) copyStateInto(s, "master", master_);
  if (fp8States_) {
    for (size_t i = 0; i < parameters_.size(); ++i) {
      expAvgScale_[i] = m[i].defined() ? s.perParameterAux.at("exp_avg.scale")[i].detach().clone() : at::Tensor();
      expAvgSqScale_[i] = m[i].defined() ? s.perParameterAux.at("exp_avg_sq.scale")[i].detach().clone() : at::Tensor();
    }
  }
  for (auto* live : {&expAvg_, &expAvgSq_, &master_}) {
    for (at::Tensor& t : *live) {
      if (t.defined() && !t.is_contiguous()) t = t.contiguous();
    }
  }
  step_ = step;
}

std::vector<comm::CommPtr> LowPrecisionAdamW::communicators() const {
  if (comm_) return {comm_};
  return {};
}

}  // namespace tessera::optim
