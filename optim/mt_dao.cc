// MT-DAO: QH-ADOPT (or its AdamW form) with N momenta, each state averaged
// across workers at its own interval. See the header for the exact update and
// the sync schedule.
//
// Where the sources differ: qhadopt.py keeps one momentum and uses only the
// first of its `vs`; the paper's N momenta with weights nu_j are implemented
// here, and with N = 1 the update is operation for operation qhadopt.py's
// (step counter starting at 0, no weight decay on step 0, clip t^0.25).
#include "tessera/optim/mt_dao.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <cmath>
#include <map>
#include <numeric>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::optim {

void MtDaoConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(form == "adopt" || form == "adamw", prefix + "form",
                       "got '" << form << "' (valid: adopt, adamw)");
  TESSERA_CHECK_CONFIG(!betas.empty(), prefix + "betas", "needs at least one momentum beta");
  for (size_t j = 0; j < betas.size(); ++j) {
    TESSERA_CHECK_CONFIG(betas[j] >= 0 && betas[j] < 1, prefix + "betas",
                         "entry " << j << " must be in [0, 1), got " << betas[j]);
  }
  TESSERA_CHECK_CONFIG(nus.size() == betas.size(), prefix + "nus",
                       "has " << nus.size() << " entries; needs one per momentum (" << betas.size() << ")");
  double nuSum = 0;
  for (size_t j = 0; j < nus.size(); ++j) {
    TESSERA_CHECK_CONFIG(nus[j] >= 0 && std::isfinite(nus[j]), prefix + "nus",
                         "entry " << j << " must be >= 0, got " << nus[j]);
    nuSum += nus[j];
  }
  TESSERA_CHECK_CONFIG(nuSum <= 1 + 1e-12, prefix + "nus", "must sum to at most 1, sum is " << nuSum);
  TESSERA_CHECK_CONFIG(beta2 >= 0 && beta2 < 1, prefix + "beta2", "must be in [0, 1), got " << beta2);
  TESSERA_CHECK_CONFIG(eps > 0 && std::isfinite(eps), prefix + "eps", "must be > 0, got " << eps);
  TESSERA_CHECK_CONFIG(weight_decay >= 0 && std::isfinite(weight_decay), prefix + "weight_decay",
                       "must be >= 0, got " << weight_decay);
  TESSERA_CHECK_CONFIG(sync_params >= 1, prefix + "sync_params", "must be >= 1, got " << sync_params);
  TESSERA_CHECK_CONFIG(sync_momenta.size() == betas.size(), prefix + "sync_momenta",
                       "has " << sync_momenta.size() << " entries; needs one per momentum (" << betas.size()
                              << ")");
  for (size_t j = 0; j < sync_momenta.size(); ++j) {
    TESSERA_CHECK_CONFIG(sync_momenta[j] >= 1, prefix + "sync_momenta",
                         "entry " << j << " must be >= 1, got " << sync_momenta[j]);
  }
  TESSERA_CHECK_CONFIG(sync_second >= 1, prefix + "sync_second", "must be >= 1, got " << sync_second);
}

namespace {

std::string momentumKind(size_t j) { return "mt_dao/momentum_" + std::to_string(j); }
const char* const kSecondKind = "mt_dao/second";

// The tensors due at one sync, packed: one flat buffer per dtype (a fresh
// copy), in the order the tensors are given (the same on every rank, since
// the schedule is). A sync is one all-reduce (kAvg) per buffer.
struct Packed {
  std::vector<std::vector<at::Tensor>> tensors;  // per dtype, in order
  std::vector<at::Tensor> buffers;               // per dtype: the tensors, flat and concatenated
};

Packed pack(const std::vector<at::Tensor>& tensors) {
  std::map<at::ScalarType, std::vector<at::Tensor>> byDtype;
  for (const at::Tensor& t : tensors) byDtype[t.scalar_type()].push_back(t);
  Packed packed;
  for (auto& [dtype, group] : byDtype) {
    std::vector<at::Tensor> flat;
    flat.reserve(group.size());
    for (const at::Tensor& t : group) flat.push_back(t.reshape({-1}));
    packed.buffers.push_back(at::cat(flat));
    packed.tensors.push_back(std::move(group));
  }
  return packed;
}

// Copies buffers[k] (shaped like packed.buffers) back into packed.tensors[k].
void unpack(const Packed& packed, const std::vector<at::Tensor>& buffers) {
  for (size_t k = 0; k < buffers.size(); ++k) {
    int64_t offset = 0;
    for (const at::Tensor& t : packed.tensors[k]) {
      at::Tensor target = t;  // shares t's storage
      target.copy_(buffers[k].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

// Collective: every tensor becomes its average over the group.
void averageAcrossGroup(comm::Communicator& comm, const std::vector<at::Tensor>& tensors) {
  const Packed packed = pack(tensors);
  for (const at::Tensor& buffer : packed.buffers) comm.allReduce(buffer, comm::ReduceOp::kAvg);
  unpack(packed, packed.buffers);
}

// Elastic: the same average on the group of this sync's members. The body
// reduces copies of the packed buffers (which it leaves unchanged, so a
// retried attempt starts from the same values); the tensors take the means
// only after the sync committed.
void averageAcrossNodes(const ElasticCollective& collective, int64_t syncIndex,
                        const std::vector<at::Tensor>& tensors) {
  const Packed packed = pack(tensors);
  std::vector<at::Tensor> means(packed.buffers.size());
  collective(syncIndex, [&](comm::Communicator& group) {
    for (size_t k = 0; k < means.size(); ++k) {
      means[k] = packed.buffers[k].clone();
      if (group.size() > 1) group.allReduce(means[k], comm::ReduceOp::kAvg);
    }
  });
  unpack(packed, means);
}

class MtDao final : public ParameterOptimizer {
 public:
  MtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters, comm::CommPtr comm, double lr0,
        ElasticCollective collective = nullptr)
      : ParameterOptimizer(std::move(parameters), lr0), config_(config), comm_(std::move(comm)),
        collective_(std::move(collective)), lr0_(lr0), momenta_(config_.betas.size()) {
    nuSum_ = std::accumulate(config_.nus.begin(), config_.nus.end(), 0.0);
    for (const at::Tensor& p : parameters_) {
      for (auto& momentum : momenta_) momentum.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
      second_.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
    }
  }

  std::string name() const override { return "mt_dao"; }

  OptimizerStepResult step() override {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      if (!parameters_[i].grad().defined()) continue;
      if (config_.form == "adopt") {
        adoptUpdate(i);
      } else {
        adamwUpdate(i);
      }
    }
    ++step_;
    return sync();
  }

  std::vector<comm::CommPtr> communicators() const override {
    return comm_ ? std::vector<comm::CommPtr>{comm_} : std::vector<comm::CommPtr>{};
  }

  OptimizerState state() const override {
    OptimizerState s;
    for (size_t j = 0; j < momenta_.size(); ++j) s.perParameter[momentumKind(j)] = momenta_[j];
    s.perParameter[kSecondKind] = second_;
    s.scalars["step"] = std::to_string(step_);
    return s;
  }

  void loadState(const OptimizerState& s) override {
    std::vector<std::string> kinds;
    for (size_t j = 0; j < momenta_.size(); ++j) kinds.push_back(momentumKind(j));
    kinds.push_back(kSecondKind);
    checkOptimizerState("MT-DAO", s, parameters_, kinds, {"step"});
    for (const std::string& kind : kinds) {
      const auto& source = s.perParameter.at(kind);
      for (size_t i = 0; i < source.size(); ++i) {
        TESSERA_CHECK_ARG(source[i].defined(), "MT-DAO state: '" << kind << "' of parameter " << i << " is undefined");
      }
    }
    const int64_t step = parseCount(s, "step");
    for (size_t j = 0; j < momenta_.size(); ++j) copyStateInto(s, momentumKind(j), momenta_[j]);
    copyStateInto(s, kSecondKind, second_);
    step_ = step;
  }

 private:
  void decayWeights(at::Tensor& p) const {
    if (config_.weight_decay != 0) p.mul_(1 - (lr_ / lr0_) * config_.weight_decay);
  }

  // QH-ADOPT for parameter i; step_ is t (updates before this one).
  void adoptUpdate(size_t i) {
    at::Tensor& p = parameters_[i];
    const at::Tensor& g = p.grad();
    at::Tensor& v = second_[i];
    if (step_ == 0) {
      v.addcmul_(g, g);  // v starts at zero: v = g^2
      return;
    }
    decayWeights(p);
    const double clip = std::pow(static_cast<double>(step_), 0.25);
    const at::Tensor normalized = g.div(v.sqrt().clamp_min_(config_.eps)).clamp_(-clip, clip);
    at::Tensor update = normalized.mul(1 - nuSum_);
    for (size_t j = 0; j < momenta_.size(); ++j) {
      momenta_[j][i].lerp_(normalized, 1 - config_.betas[j]);
      update.add_(momenta_[j][i], config_.nus[j]);
    }
    p.sub_(update, lr_);
    v.mul_(config_.beta2).addcmul_(g, g, 1 - config_.beta2);
  }

  // The bias-corrected AdamW form for parameter i; s = step_ + 1.
  void adamwUpdate(size_t i) {
    at::Tensor& p = parameters_[i];
    const at::Tensor& g = p.grad();
    at::Tensor& v = second_[i];
    const auto s = static_cast<double>(step_ + 1);
    decayWeights(p);
    v.mul_(config_.beta2).addcmul_(g, g, 1 - config_.beta2);
    at::Tensor numerator = g.mul(1 - nuSum_);
    for (size_t j = 0; j < momenta_.size(); ++j) {
      momenta_[j][i].lerp_(g, 1 - config_.betas[j]);
      numerator.add_(momenta_[j][i], config_.nus[j] / (1 - std::pow(config_.betas[j], s)));
    }
    const at::Tensor denominator = (v / (1 - std::pow(config_.beta2, s))).sqrt_().add_(config_.eps);
    p.addcdiv_(numerator, denominator, -lr_);
  }

  // Averages what is due after update number step_ (1-based count).
  OptimizerStepResult sync() {
    OptimizerStepResult result;
    std::vector<at::Tensor> due;
    if (step_ % config_.sync_params == 0) {
      result.outerStep = true;
      due.insert(due.end(), parameters_.begin(), parameters_.end());
    }
    for (size_t j = 0; j < momenta_.size(); ++j) {
      if (step_ % config_.sync_momenta[j] == 0) due.insert(due.end(), momenta_[j].begin(), momenta_[j].end());
    }
    if (step_ % config_.sync_second == 0) due.insert(due.end(), second_.begin(), second_.end());
    if (due.empty()) return result;
    if (collective_) {
      // Sync index: the update count T (strictly increasing, and in state()
      // as "step"). Every elastic sync reports outerStep -- the launcher
      // serves joiners after it -- also one of momenta or v alone.
      averageAcrossNodes(collective_, step_, due);
      result.outerStep = true;
    } else if (comm_ && comm_->size() > 1) {
      averageAcrossGroup(*comm_, due);
    }
    return result;
  }

  MtDaoConfig config_;
  comm::CommPtr comm_;
  ElasticCollective collective_;  // elastic: the syncs run here instead of on comm_
  double lr0_;
  double nuSum_ = 0;
  std::vector<std::vector<at::Tensor>> momenta_;  // [j][parameter], each contiguous
  std::vector<at::Tensor> second_;                // [parameter]
  int64_t step_ = 0;                              // step() calls completed
};

}  // namespace

namespace {

// The factories' argument checks (ConfigError, InvalidArgument).
void checkArguments(const MtDaoConfig& config, const std::vector<at::Tensor>& parameters, double lr0) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr0 > 0 && std::isfinite(lr0), "optim.lr", "must be > 0, got " << lr0);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeMtDao: no parameters to optimize");
  for (size_t i = 0; i < parameters.size(); ++i) {
    TESSERA_CHECK_ARG(parameters[i].defined() && at::isFloatingType(parameters[i].scalar_type()),
                      "MT-DAO: parameter " << i << " must be a defined floating-point tensor");
  }
}

}  // namespace

std::unique_ptr<Optimizer> makeMtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters,
                                     comm::CommPtr comm, double lr0) {
  checkArguments(config, parameters, lr0);
  return std::make_unique<MtDao>(config, std::move(parameters), std::move(comm), lr0);
}

std::unique_ptr<Optimizer> makeElasticMtDao(const MtDaoConfig& config, std::vector<at::Tensor> parameters,
                                            ElasticCollective collective, double lr0) {
  checkArguments(config, parameters, lr0);
  TESSERA_CHECK_ARG(collective != nullptr, "makeElasticMtDao: no elastic collective");
  return std::make_unique<MtDao>(config, std::move(parameters), nullptr, lr0, std::move(collective));
}

}  // namespace tessera::optim
