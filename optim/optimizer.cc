#include "tessera/optim/optimizer.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <sstream>

#include "tessera/core/config.h"

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
}

namespace {

// Wraps one torch::optim optimizer with a single parameter group.
class TorchOptimizer final : public Optimizer {
 public:
  TorchOptimizer(std::string name, std::unique_ptr<torch::optim::Optimizer> impl, std::vector<at::Tensor> parameters)
      : name_(std::move(name)), impl_(std::move(impl)), parameters_(std::move(parameters)) {}

  std::string name() const override { return name_; }
  void setLearningRate(double lr) override {
    for (auto& group : impl_->param_groups()) group.options().set_lr(lr);
  }
  double learningRate() const override { return impl_->param_groups().front().options().get_lr(); }
  OptimizerStepResult step() override {
    impl_->step();
    return {};
  }
  void zeroGrad() override {
    for (auto& p : parameters_) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
  }
  std::string saveState() const override {
    torch::serialize::OutputArchive archive;
    impl_->save(archive);
    std::ostringstream out;
    archive.save_to(out);
    return out.str();
  }
  void loadState(const std::string& bytes) override {
    torch::serialize::InputArchive archive;
    std::istringstream in(bytes);
    archive.load_from(in);
    impl_->load(archive);
  }

 private:
  std::string name_;
  std::unique_ptr<torch::optim::Optimizer> impl_;
  std::vector<at::Tensor> parameters_;
};

}  // namespace

std::unique_ptr<Optimizer> makeOptimizer(const OptimizerConfig& config, std::vector<at::Tensor> parameters,
                                         double lr) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr > 0, "optim.lr", "must be > 0, got " << lr);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeOptimizer: no parameters to optimize");
  std::unique_ptr<torch::optim::Optimizer> impl;
  if (config.name == "adamw") {
    impl = std::make_unique<torch::optim::AdamW>(parameters, torch::optim::AdamWOptions(lr)
                                                                 .betas({config.beta1, config.beta2})
                                                                 .eps(config.eps)
                                                                 .weight_decay(config.weight_decay));
  } else {
    impl = std::make_unique<torch::optim::SGD>(parameters, torch::optim::SGDOptions(lr)
                                                               .momentum(config.momentum)
                                                               .nesterov(config.nesterov)
                                                               .weight_decay(config.weight_decay));
  }
  return std::make_unique<TorchOptimizer>(config.name, std::move(impl), std::move(parameters));
}

}  // namespace tessera::optim
