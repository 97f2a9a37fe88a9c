#include "tessera/optim/optimizer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/optim/low_precision_adamw.h"

namespace tessera::optim {

void OptimizerConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(name == "adamw" || name == "sgd", prefix + "name", "got '" << name << "' (valid: adamw, sgd)");
  TESSERA_CHECK_CONFIG(beta1 >= 0 && beta1 < 1, prefix + "beta1", "must be in [0, 1), got " << beta1);
  TESSERA_CHECK_CONFIG(beta2 >= 0 && beta2 < 1, prefix + "beta2", "must be in [0, 1), got " << beta2);
  TESSERA_CHECK_CONFIG(eps > 0, prefix + "eps", "must be > 0, got " << eps);
  TESSERA_CHECK_CONFIG(weight_decay >= 0 && std::isfinite(weight_decay), prefix + "weight_decay",
                       "must be >= 0, got " << weight_decay);
  TESSERA_CHECK_CONFIG(momentum >= 0 && momentum < 1, prefix + "momentum", "must be in [0, 1), got " << momentum);
  TESSERA_CHECK_CONFIG(!nesterov || momentum > 0, prefix + "nesterov", "needs optim.momentum > 0");
  TESSERA_CHECK_CONFIG(states == "fp32" || states == "fp8", prefix + "states",
                       "got '" << states << "' (valid: fp32, fp8)");
  TESSERA_CHECK_CONFIG(master == "fp32" || master == "fp16", prefix + "master",
                       "got '" << master << "' (valid: fp32, fp16)");
  TESSERA_CHECK_CONFIG(name == "adamw" || states == "fp32", prefix + "states",
                       "'" << states << "' needs " << prefix << "name = adamw (sgd keeps fp32 state); set it to fp32");
  TESSERA_CHECK_CONFIG(name == "adamw" || master == "fp32", prefix + "master",
                       "'" << master << "' needs " << prefix << "name = adamw (sgd updates the parameters); set it to fp32");
}

void checkOptimizerState(const std::string& who, const OptimizerState& state, const std::vector<at::Tensor>& parameters,
                         const std::vector<std::string>& kinds, const std::vector<std::string>& scalars) {
  for (const std::string& kind : kinds) {
    auto it = state.perParameter.find(kind);
    TESSERA_CHECK_ARG(it != state.perParameter.end(), who << " state: missing per-parameter kind '" << kind << "'");
    TESSERA_CHECK_ARG(it->second.size() == parameters.size(), who << " state: '" << kind << "' has "
                                                                   << it->second.size() << " tensors for "
                                                                   << parameters.size() << " parameters");
    for (size_t i = 0; i < parameters.size(); ++i) {
      const at::Tensor& t = it->second[i];
      TESSERA_CHECK_ARG(!t.defined() || t.sizes() == parameters[i].sizes(),
                        who << " state: '" << kind << "' of parameter " << i << " has shape " << t.sizes()
                            << ", the parameter " << parameters[i].sizes());
    }
  }
  for (const std::string& key : scalars) {
    TESSERA_CHECK_ARG(state.scalars.count(key) != 0, who << " state: missing scalar '" << key << "'");
  }
}

void copyStateInto(const OptimizerState& state, const std::string& kind, std::vector<at::Tensor>& live) {
  const std::vector<at::Tensor>& source = state.perParameter.at(kind);
  for (size_t i = 0; i < live.size(); ++i) {
    if (!source[i].defined()) {
      live[i] = at::Tensor();
    } else if (!live[i].defined()) {
      live[i] = source[i].detach().clone();
    } else {
      live[i].copy_(source[i]);
    }
  }
}

std::string formatScalar(double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  return buffer;
}

double parseScalar(const OptimizerState& state, const std::string& key) {
  auto it = state.scalars.find(key);
  TESSERA_CHECK_ARG(it != state.scalars.end(), "optimizer state: missing scalar '" << key << "'");
  char* end = nullptr;
  const double value = std::strtod(it->second.c_str(), &end);
  TESSERA_CHECK_ARG(end != it->second.c_str() && *end == '\0',
                    "optimizer state: scalar '" << key << "' is not a number: '" << it->second << "'");
  return value;
}

void ParameterOptimizer::zeroGrad() {
  for (auto& p : parameters_) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

int64_t parseCount(const OptimizerState& state, const std::string& key) {
  const double value = parseScalar(state, key);
  TESSERA_CHECK_ARG(std::isfinite(value) && value >= 0 && value == std::floor(value) && value < 9.0e18,
                    "optimizer state: scalar '" << key << "' must be a step count, got " << value);
  return static_cast<int64_t>(value);
}

namespace {

// AdamW with decoupled weight decay, operation for operation as
// torch::optim::AdamW (libtorch 1.13 and 2.x), so results match it bit for bit.
class AdamW final : public ParameterOptimizer {
 public:
  AdamW(const OptimizerConfig& c, std::vector<at::Tensor> parameters, double lr)
      : ParameterOptimizer(std::move(parameters), lr), config_(c), expAvg_(parameters_.size()),
        expAvgSq_(parameters_.size()) {}

  std::string name() const override { return "adamw"; }

  OptimizerStepResult step() override {
    at::NoGradGuard noGrad;
    ++step_;
    const double biasCorrection1 = 1 - std::pow(config_.beta1, static_cast<double>(step_));
    const double biasCorrection2 = 1 - std::pow(config_.beta2, static_cast<double>(step_));
    for (size_t i = 0; i < parameters_.size(); ++i) {
      at::Tensor& p = parameters_[i];
      if (!p.grad().defined()) continue;
      const at::Tensor& grad = p.grad();
      if (!expAvg_[i].defined()) {
        expAvg_[i] = at::zeros_like(p, at::MemoryFormat::Preserve);
        expAvgSq_[i] = at::zeros_like(p, at::MemoryFormat::Preserve);
      }
      p.mul_(1 - lr_ * config_.weight_decay);
      expAvg_[i].mul_(config_.beta1).add_(grad, 1 - config_.beta1);
      expAvgSq_[i].mul_(config_.beta2).addcmul_(grad, grad, 1 - config_.beta2);
      const at::Tensor denom = (expAvgSq_[i].sqrt() / std::sqrt(biasCorrection2)).add_(config_.eps);
      p.addcdiv_(expAvg_[i], denom, -lr_ / biasCorrection1);
    }
    return {};
  }

  OptimizerState state() const override {
    OptimizerState s;
    s.perParameter["exp_avg"] = expAvg_;
    s.perParameter["exp_avg_sq"] = expAvgSq_;
    s.scalars["step"] = std::to_string(step_);
    return s;
  }

  void loadState(const OptimizerState& s) override {
    checkOptimizerState("AdamW", s, parameters_, {"exp_avg", "exp_avg_sq"}, {"step"});
    const int64_t step = parseCount(s, "step");
    copyStateInto(s, "exp_avg", expAvg_);
    copyStateInto(s, "exp_avg_sq", expAvgSq_);
    step_ = step;
  }

 private:
  OptimizerConfig config_;
  std::vector<at::Tensor> expAvg_;
  std::vector<at::Tensor> expAvgSq_;
  int64_t step_ = 0;  // steps taken (torch keeps one per parameter; they are always equal here)
};

// SGD with L2 weight decay, momentum (buffer starts as the first gradient,
// dampening 0) and optional Nesterov, as torch::optim::SGD.
class Sgd final : public ParameterOptimizer {
 public:
  Sgd(const OptimizerConfig& c, std::vector<at::Tensor> parameters, double lr)
      : ParameterOptimizer(std::move(parameters), lr), config_(c), momentum_(parameters_.size()) {}

  std::string name() const override { return "sgd"; }

  OptimizerStepResult step() override {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      at::Tensor& p = parameters_[i];
      if (!p.grad().defined()) continue;
      at::Tensor d = p.grad();
      if (config_.weight_decay != 0) d = d.add(p, config_.weight_decay);
      if (config_.momentum != 0) {
        if (!momentum_[i].defined()) {
          momentum_[i] = d.clone().detach();
        } else {
          momentum_[i].mul_(config_.momentum).add_(d);
        }
        d = config_.nesterov ? d.add(momentum_[i], config_.momentum) : momentum_[i];
      }
      p.add_(d, -lr_);
    }
    return {};
  }

  OptimizerState state() const override {
    OptimizerState s;
    s.perParameter["momentum_buffer"] = momentum_;
    return s;
  }

  void loadState(const OptimizerState& s) override {
    checkOptimizerState("SGD", s, parameters_, {"momentum_buffer"});
    copyStateInto(s, "momentum_buffer", momentum_);
  }

 private:
  OptimizerConfig config_;
  std::vector<at::Tensor> momentum_;
};

}  // namespace

std::unique_ptr<Optimizer> makeOptimizer(const OptimizerConfig& config, std::vector<at::Tensor> parameters,
                                         double lr) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr > 0, "optim.lr", "must be > 0, got " << lr);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeOptimizer: no parameters to optimize");
  if (config.name == "adamw" && (config.states != "fp32" || config.master != "fp32")) {
    return std::make_unique<LowPrecisionAdamW>(config, std::move(parameters), lr);
  }
  if (config.name == "adamw") return std::make_unique<AdamW>(config, std::move(parameters), lr);
  return std::make_unique<Sgd>(config, std::move(parameters), lr);
}

}  // namespace tessera::optim
