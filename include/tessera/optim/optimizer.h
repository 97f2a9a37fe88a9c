// The optimizer interface the training loop steps, and a factory that builds
// AdamW or SGD (written to match torch::optim's update formulas exactly) from
// the [optim] section.
//
// Why an interface of our own rather than torch::optim::Optimizer: the
// communication-light optimizers of later issues (DiLoCo, DeMo) communicate
// inside step() and have an outer step every H inner steps; the loop must
// not care. So step() may be collective, and reports whether it was an outer
// step (the Trainer fires its outer-step hooks then).
//
// Not here: the learning-rate schedule (lr_schedule.h; the loop sets the rate
// before every step), clipping (grad_clip.h), parameter groups.
#pragma once

#include <ATen/core/Tensor.h>

#include "tessera/comm/communicator.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera::optim {

// An optimizer's state in a form checkpoints and live recovery can reshard:
// per-parameter tensors (each shaped like its parameter, so a sharded
// parameter's state is sharded the same way), small per-parameter tensors
// that are NOT shaped like it (FP8 scales, amax histories), plus scalars.
struct OptimizerState {
  // kind ("exp_avg", "momentum_buffer", "diloco/outer", ...) -> one tensor per
  // parameter, in the order the parameters were given at construction, each
  // of that parameter's shape (any dtype: FP8 codes are uint8, FP16 moments
  // float16). An undefined tensor: not created yet (or, for an optimizer
  // sharded over whole tensors, held by another rank).
  std::map<std::string, std::vector<at::Tensor>> perParameter;
  // kind ("exp_avg.scale", ...) -> one tensor per parameter, in the same
  // order, of any small shape that does NOT follow the parameter's (a {1}
  // float32 per-tensor scale, an amax history window). They describe this
  // rank's piece as a whole, so they cannot be split or merged by a
  // reshard: checkpoints save them as per-rank rows (like the RNG state) and
  // restore them only onto the same mesh, which resumes bit for bit. An
  // optimizer whose perParameter tensors need an aux entry throws
  // InvalidArgument from loadState() when it is missing (a resharded load).
  // Undefined: as in perParameter.
  std::map<std::string, std::vector<at::Tensor>> perParameterAux;
  // Small values ("step" -> "12"); doubles written with 17 digits.
  std::map<std::string, std::string> scalars;
};

// The algorithm part of the [optim] section. Plain struct; validate() before use.
struct OptimizerConfig {
  std::string name = "adamw";  // "adamw" (decoupled weight decay, Loshchilov & Hutter 1711.05101) or "sgd"
  double beta1 = 0.9;          // adamw: first-moment decay, in [0, 1)
  double beta2 = 0.95;         // adamw: second-moment decay, in [0, 1)
  double eps = 1e-8;           // adamw: added to sqrt(v_hat); > 0
  double weight_decay = 0.1;   // adamw: decoupled (p -= lr * wd * p); sgd: L2 added to the gradient; >= 0
  double momentum = 0.0;       // sgd: momentum, in [0, 1)
  bool nesterov = false;       // sgd: Nesterov momentum (needs momentum > 0)
  // adamw: how the moments are stored (MS-AMP, FP8-LM arXiv 2310.18313 §2.3):
  // "fp32", or "fp8" (level O2: first moment as FP8 E4M3 codes with one
  // per-tensor power-of-two scale, second moment as FP16 with one as well;
  // low_precision_adamw.h). sgd: only "fp32".
  std::string states = "fp32";
  // adamw: the master weights: "fp32" (the parameters are the master
  // weights) or "fp16" (level O3: the optimizer keeps an FP16 master copy and
  // writes it back into the parameters after each step). sgd: only "fp32".
  std::string master = "fp32";

  // Throws ConfigError naming the field (prefix + "beta1") and the accepted values.
  void validate(const std::string& prefix = "optim.") const;
};

// What one step did.
struct OptimizerStepResult {
  bool outerStep = false;  // an outer step of a two-level optimizer (DiLoCo) ran in this step
};

// Updates a fixed list of tensors from their .grad. Not thread-safe.
// Gradients are taken from .grad; an undefined .grad skips that parameter.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // "adamw", "sgd", ...
  virtual std::string name() const = 0;
  // The rate the next step() uses (the schedule's value for that step).
  virtual void setLearningRate(double lr) = 0;
  virtual double learningRate() const = 0;
  // Applies one update from the current gradients. May be collective for
  // optimizers that communicate (their header says so); the Trainer calls it
  // on every rank at every step, so such optimizers need no special handling.
  // Local for AdamW and SGD.
  virtual OptimizerStepResult step() = 0;
  // Zeroes every parameter's gradient (keeps the tensors: DDP and FSDP hold
  // no references to them, so either would do; zeros behave the same on
  // libtorch 1.13 and 2.x).
  virtual void zeroGrad() = 0;
  // The optimizer's state (moments, step counts, outer copies). The tensors
  // alias the live buffers: clone them before the next step() if they must
  // stay as they are. Local (not collective).
  virtual OptimizerState state() const = 0;
  // Copies `state` (from state() of the same kind of optimizer over
  // parameters of the same shapes) into this one. Checks everything before
  // changing anything: throws InvalidArgument naming a missing kind or
  // scalar, or the parameter index and both shapes of a mismatch. Local.
  virtual void loadState(const OptimizerState& state) = 0;
  // The communicators step() talks over (empty for local optimizers), so a
  // training loop can count their bytes (StepReport::commBytes) -- including
  // private ones an optimizer split off for background traffic.
  virtual std::vector<comm::CommPtr> communicators() const { return {}; }
};

// Base for optimizers that update a fixed list of tensors at a rate set by
// the loop: holds both and implements the rate and zeroGrad() once.
class ParameterOptimizer : public Optimizer {
 public:
  ParameterOptimizer(std::vector<at::Tensor> parameters, double lr) : parameters_(std::move(parameters)), lr_(lr) {}
  void setLearningRate(double lr) override { lr_ = lr; }
  double learningRate() const override { return lr_; }
  void zeroGrad() override;

 protected:
  std::vector<at::Tensor> parameters_;
  double lr_;
};

// AdamW or SGD over `parameters` (e.g. DataParallel::optimizerParameters()),
// starting at learning rate `lr`. The tensors are shared, not copied: they
// must outlive the optimizer. AdamW with states or master other than "fp32"
// is LowPrecisionAdamW (low_precision_adamw.h), unsharded; build that class
// directly for its whole-tensor ZeRO. Throws ConfigError for a bad config.
std::unique_ptr<Optimizer> makeOptimizer(const OptimizerConfig& config, std::vector<at::Tensor> parameters,
                                         double lr);

// Helpers for implementations of loadState(): throw InvalidArgument (text
// prefixed by `who`, e.g. "AdamW") unless `state` has every kind in `kinds`
// with one tensor per parameter, each defined tensor shaped like its
// parameter, and every scalar in `scalars`.
void checkOptimizerState(const std::string& who, const OptimizerState& state, const std::vector<at::Tensor>& parameters,
                         const std::vector<std::string>& kinds, const std::vector<std::string>& scalars = {});
// Copies state.perParameter[kind][i] into live[i] (allocating live[i] like the
// source when undefined, leaving it undefined when the source is). Call after
// checkOptimizerState.
void copyStateInto(const OptimizerState& state, const std::string& kind, std::vector<at::Tensor>& live);
// A double as text that parses back to the same bits; and back (throws
// InvalidArgument naming `key`).
std::string formatScalar(double value);
double parseScalar(const OptimizerState& state, const std::string& key);
// A step counter: a finite whole number >= 0 (throws InvalidArgument naming `key`).
int64_t parseCount(const OptimizerState& state, const std::string& key);

}  // namespace tessera::optim
