// DiLoCo and streaming DiLoCo (REFERENCE §1); the schedule and the state
// layout are documented in include/tessera/optim/diloco.h.
//
// Layout: every outer-side buffer (theta_g, the momentum, the pseudo-
// gradient) is ONE flat fp32 host tensor, ordered by fragment, so a
// fragment is one contiguous range and its all-reduce is one call. Each
// parameter gets a view of its slice shaped like the parameter; state()
// hands out those views.
#include "tessera/optim/diloco.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::optim {

void DilocoConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(inner_steps >= 1, prefix + "inner_steps", "must be >= 1, got " << inner_steps);
  TESSERA_CHECK_CONFIG(outer_lr > 0 && std::isfinite(outer_lr), prefix + "outer_lr", "must be > 0, got " << outer_lr);
  TESSERA_CHECK_CONFIG(outer_momentum >= 0 && outer_momentum < 1, prefix + "outer_momentum",
                       "must be in [0, 1), got " << outer_momentum);
  comm::parseCompression(compression, prefix + "compression");
  TESSERA_CHECK_CONFIG(fragments >= 1 && fragments <= inner_steps, prefix + "fragments",
                       "must be in [1, " << prefix << "inner_steps = " << inner_steps << "], got " << fragments);
  TESSERA_CHECK_CONFIG(inner_steps % fragments == 0, prefix + "fragments",
                       "must divide " << prefix << "inner_steps = " << inner_steps << ", got " << fragments);
  const int64_t period = inner_steps / fragments;
  TESSERA_CHECK_CONFIG(delay >= 0 && delay < period, prefix + "delay",
                       "must be in [0, inner_steps / fragments = " << period << "), got " << delay);
  TESSERA_CHECK_CONFIG(mixing >= 0 && mixing <= 1, prefix + "mixing", "must be in [0, 1], got " << mixing);
}

namespace {

constexpr const char* kInnerPrefix = "inner/";
constexpr const char* kOuterKind = "diloco/outer";
constexpr const char* kMomentumKind = "diloco/momentum";
constexpr const char* kPendingKind = "diloco/pending_delta";
constexpr const char* kStepKey = "diloco/step";

// A view of flat[offset, offset + numel) shaped like `like`.
at::Tensor sliceLike(const at::Tensor& flat, int64_t offset, const at::Tensor& like) {
  return flat.narrow(0, offset, like.numel()).view(like.sizes());
}

class Diloco final : public Optimizer {
 public:
  Diloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner, std::vector<at::Tensor> parameters,
         comm::CommPtr replicaComm, const std::vector<int>& groups, ElasticCollective collective = nullptr)
      : config_(config), compression_(comm::parseCompression(config.compression, "diloco.compression")),
        inner_(std::move(inner)), parameters_(std::move(parameters)), replicaComm_(std::move(replicaComm)),
        collective_(std::move(collective)) {
    layOut(groups);
    if (collective_) {  // elastic: founders start identical (one seed), joiners receive the state
      at::NoGradGuard noGrad;
      for (size_t i = 0; i < parameters_.size(); ++i) outerViews_[i].copy_(parameters_[i]);
      return;
    }
    // Every replica starts from replica 0's parameters (REFERENCE §1: theta_g
    // is initialised once and broadcast).
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) outerViews_[i].copy_(parameters_[i]);
    if (outer_.numel() > 0) replicaComm_->broadcast(outer_, 0);
    for (size_t i = 0; i < parameters_.size(); ++i) parameters_[i].copy_(outerViews_[i]);
    // The in-flight all-reduce gets a group of its own: it runs on a
    // background thread while the training loop may issue other collectives
    // on replicaComm, and two threads must never interleave on one group.
    if (config_.delay > 0) streamComm_ = replicaComm_->split(0, replicaComm_->rank(), "diloco_stream");
  }

  ~Diloco() override {
    // The background all-reduce writes into delta_: let it finish first.
    if (pending_ && pending_->work) {
      try {
        pending_->work->wait();
      } catch (...) {  // nobody is left to report it to, and a destructor must not throw
      }
    }
  }

  std::string name() const override { return "diloco"; }
  void setLearningRate(double lr) override { inner_->setLearningRate(lr); }
  double learningRate() const override { return inner_->learningRate(); }
  void zeroGrad() override { inner_->zeroGrad(); }

  OptimizerStepResult step() override {
    inner_->step();
    ++step_;
    OptimizerStepResult result;
    for (int f = 0; f < fragmentCount(); ++f) {
      if (!isApplyStep(f, step_)) continue;
      if (config_.delay == 0) {
        snapshotPseudoGradient(f);
        if (!collective_ && fragmentNumel(f) > 0) {
          comm::allReduceCompressed(*replicaComm_, fragmentSlice(delta_, f), comm::ReduceOp::kAvg, compression_);
        }
      } else {
        waitPending(f);
      }
      if (collective_) averageAcrossNodes(f);
      applyOuterStep(f);
      result.outerStep = true;
    }
    if (config_.delay > 0) {
      for (int f = 0; f < fragmentCount(); ++f) {
        if (isApplyStep(f, step_ + config_.delay)) startPending(f);
      }
    }
    return result;
  }

  std::vector<comm::CommPtr> communicators() const override {
    if (collective_) return {};
    std::vector<comm::CommPtr> comms = {replicaComm_};
    if (streamComm_) comms.push_back(streamComm_);
    return comms;
  }

  OptimizerState state() const override {
    // An in-flight pseudo-gradient is finished here (every replica started
    // it, so waiting involves no new collective) and saved already averaged;
    // loadState() marks it complete, so the apply step uses it as is.
    if (pending_ && pending_->work) {
      pending_->work->wait();
      pending_->work.reset();
    }
    OptimizerState s = inner_->state();
    OptimizerState out;
    for (auto& [kind, tensors] : s.perParameter) out.perParameter[kInnerPrefix + kind] = std::move(tensors);
    for (auto& [kind, tensors] : s.perParameterAux) out.perParameterAux[kInnerPrefix + kind] = std::move(tensors);
    for (auto& [key, value] : s.scalars) out.scalars[kInnerPrefix + key] = std::move(value);
    out.perParameter[kOuterKind] = outerViews_;
    std::vector<at::Tensor>& momentum = out.perParameter[kMomentumKind];
    std::vector<at::Tensor>& pending = out.perParameter[kPendingKind];
    momentum.resize(parameters_.size());
    pending.resize(parameters_.size());
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const int f = fragmentOf_[i];
      if (momentumStarted_[f]) momentum[i] = sliceLike(momentum_, offsets_[i], parameters_[i]);
      if (pending_ && pending_->fragment == f) pending[i] = sliceLike(delta_, offsets_[i], parameters_[i]);
    }
    out.scalars[kStepKey] = std::to_string(step_);
    return out;
  }

  void loadState(const OptimizerState& s) override {
    // Check everything of ours, then the inner optimizer's (its loadState
    // checks before changing anything), and only then copy. A background
    // all-reduce writes into delta_: finish it before anything else.
    if (pending_ && pending_->work) {
      pending_->work->wait();
      pending_->work.reset();
    }
    checkOptimizerState("DiLoCo", s, parameters_, {kOuterKind, kMomentumKind, kPendingKind}, {kStepKey});
    const int64_t step = parseCount(s, kStepKey);
    TESSERA_CHECK_ARG(step >= 0, "DiLoCo state: '" << kStepKey << "' must be >= 0, got " << step);
    const std::vector<at::Tensor>& outer = s.perParameter.at(kOuterKind);
    const std::vector<at::Tensor>& momentum = s.perParameter.at(kMomentumKind);
    const std::vector<at::Tensor>& pending = s.perParameter.at(kPendingKind);
    const std::optional<int> inFlight = fragmentInFlightAfter(step);
    std::vector<bool> momentumStarted(fragmentCount(), false);
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const int f = fragmentOf_[i];
      TESSERA_CHECK_ARG(outer[i].defined(), "DiLoCo state: '" << kOuterKind << "' of parameter " << i << " is missing");
      // A fragment's momentum exists for all its parameters or for none.
      const bool first = i == firstOfFragment_[f];
      if (first) momentumStarted[f] = momentum[i].defined();
      TESSERA_CHECK_ARG(momentum[i].defined() == momentumStarted[f],
                        "DiLoCo state: '" << kMomentumKind << "' is defined for some parameters of fragment " << f
                                          << " but not for parameter " << i);
      const bool expectPending = inFlight && *inFlight == f;
      TESSERA_CHECK_ARG(pending[i].defined() == expectPending,
                        "DiLoCo state: at step " << step << " the schedule has "
                                                 << (inFlight ? "fragment " + std::to_string(*inFlight) : "nothing")
                                                 << " in flight, but '" << kPendingKind << "' of parameter " << i
                                                 << (pending[i].defined() ? " is" : " is not")
                                                 << " defined (was the state saved under another "
                                                    "inner_steps/fragments/delay?)");
    }
    OptimizerState innerState;
    const std::string prefix = kInnerPrefix;
    for (const auto& [kind, tensors] : s.perParameter) {
      if (kind.rfind(prefix, 0) == 0) innerState.perParameter[kind.substr(prefix.size())] = tensors;
    }
    for (const auto& [kind, tensors] : s.perParameterAux) {  // an FP8 inner optimizer's scales (precision O2)
      if (kind.rfind(prefix, 0) == 0) innerState.perParameterAux[kind.substr(prefix.size())] = tensors;
    }
    for (const auto& [key, value] : s.scalars) {
      if (key.rfind(prefix, 0) == 0) innerState.scalars[key.substr(prefix.size())] = value;
    }
    inner_->loadState(innerState);

    pending_.reset();
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      outerViews_[i].copy_(outer[i]);
      if (momentum[i].defined()) {
        if (!momentum_.defined()) momentum_ = at::zeros_like(outer_);
        sliceLike(momentum_, offsets_[i], parameters_[i]).copy_(momentum[i]);
      }
      if (pending[i].defined()) sliceLike(delta_, offsets_[i], parameters_[i]).copy_(pending[i]);
    }
    momentumStarted_ = momentumStarted;
    if (inFlight) pending_ = Pending{*inFlight, nullptr};
    step_ = step;
  }

 private:
  // An all-reduce of one fragment's pseudo-gradient (in delta_), started
  // `delay` steps before its outer step. work == nullptr: already complete
  // (elastic: not started; the snapshot is averaged at the apply step).
  struct Pending {
    int fragment;
    comm::WorkPtr work;
  };

  int fragmentCount() const { return static_cast<int>(config_.fragments); }
  int64_t fragmentNumel(int f) const { return fragmentBegin_[f + 1] - fragmentBegin_[f]; }
  at::Tensor fragmentSlice(const at::Tensor& flat, int f) const {
    return flat.narrow(0, fragmentBegin_[f], fragmentNumel(f));
  }

  // Fragment f's outer steps fall on local steps t >= 1 with
  // t = f*H/P (mod H) (see the header).
  bool isApplyStep(int f, int64_t t) const {
    const int64_t offset = f * (config_.inner_steps / config_.fragments);
    return t >= 1 && t >= offset && (t - offset) % config_.inner_steps == 0;
  }
  // The fragment whose all-reduce runs between local steps t and t+1, if any.
  std::optional<int> fragmentInFlightAfter(int64_t t) const {
    for (int64_t ahead = 1; ahead <= config_.delay; ++ahead) {
      for (int f = 0; f < fragmentCount(); ++f) {
        if (isApplyStep(f, t + ahead)) return f;
      }
    }
    return std::nullopt;
  }

  void layOut(const std::vector<int>& groups) {
    const size_t n = parameters_.size();
    TESSERA_CHECK_ARG(groups.empty() || groups.size() == n,
                      "makeDiloco: " << groups.size() << " groups for " << n << " parameters (pass one per "
                                     << "parameter, or none for one group per parameter)");
    fragmentOf_.resize(n);
    int64_t groupCount = 0;  // the groups are numbered over the whole model: 0 .. groupCount - 1
    for (size_t i = 0; i < n; ++i) {
      TESSERA_CHECK_ARG(parameters_[i].defined(), "makeDiloco: parameter " << i << " is undefined");
      const int64_t group = groups.empty() ? static_cast<int64_t>(i) : groups[i];
      TESSERA_CHECK_ARG(group >= 0, "makeDiloco: groups[" << i << "] = " << group << " (must be >= 0)");
      fragmentOf_[i] = static_cast<int>(group % config_.fragments);
      groupCount = std::max(groupCount, group + 1);
    }
    TESSERA_CHECK_CONFIG(config_.fragments <= groupCount, "diloco.fragments",
                         config_.fragments << " fragments but only " << groupCount
                                           << " layer groups; use at most as many fragments as layer groups");
    // Flat order: fragment by fragment, parameters in their given order.
    offsets_.assign(n, 0);
    fragmentBegin_.assign(fragmentCount() + 1, 0);
    firstOfFragment_.assign(fragmentCount(), n);
    int64_t offset = 0;
    for (int f = 0; f < fragmentCount(); ++f) {
      fragmentBegin_[f] = offset;
      for (size_t i = 0; i < n; ++i) {
        if (fragmentOf_[i] != f) continue;
        if (firstOfFragment_[f] == n) firstOfFragment_[f] = i;
        offsets_[i] = offset;
        offset += parameters_[i].numel();
      }
      // A fragment may be empty here when these tensors are part of a larger model
      // (a pipeline stage holds some of the layer groups): its syncs move nothing.
    }
    fragmentBegin_[fragmentCount()] = offset;
    const auto fp32Host = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
    outer_ = at::zeros({offset}, fp32Host);
    delta_ = at::zeros({offset}, fp32Host);
    for (size_t i = 0; i < n; ++i) outerViews_.push_back(sliceLike(outer_, offsets_[i], parameters_[i]));
    momentumStarted_.assign(fragmentCount(), false);
  }

  // delta_[f] = theta_g - theta_i, from the training tensors as they are now.
  void snapshotPseudoGradient(int f) {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      if (fragmentOf_[i] == f) sliceLike(delta_, offsets_[i], parameters_[i]).copy_(parameters_[i]);
    }
    // (-theta_i) + theta_g: the same bits as theta_g - theta_i.
    fragmentSlice(delta_, f).neg_().add_(fragmentSlice(outer_, f));
  }

  void startPending(int f) {
    TESSERA_CHECK(!pending_, "DiLoCo: fragment " << f << " starts while fragment " << pending_->fragment
                                                  << " is in flight (delay must be < inner_steps / fragments)");
    snapshotPseudoGradient(f);
    comm::WorkPtr work;
    // Elastic: the snapshot waits, local, for the blocking sync at the apply step.
    if (!collective_ && fragmentNumel(f) > 0) {
      work = comm::allReduceCompressedAsync(streamComm_, fragmentSlice(delta_, f), comm::ReduceOp::kAvg, compression_);
    }
    pending_ = Pending{f, std::move(work)};
  }

  void waitPending(int f) {
    TESSERA_CHECK(pending_ && pending_->fragment == f,
                  "DiLoCo: fragment " << f << "'s outer step at local step " << step_ << " has no all-reduce in flight");
    // Clear first: if wait() throws, the destructor must not wait again.
    Pending pending = std::move(*pending_);
    pending_.reset();
    if (pending.work) pending.work->wait();
  }

  // Elastic: delta_[f] <- its mean over the members at this fragment sync.
  // The body averages a copy (its input stays as it was, so a retried
  // attempt starts from the same pseudo-gradient); delta_ takes the mean
  // only after the sync committed. Throws what the collective throws, and
  // then delta_ and theta_g are unchanged.
  void averageAcrossNodes(int f) {
    const at::Tensor local = fragmentSlice(delta_, f);
    const at::Tensor mean = at::empty_like(local);
    collective_(syncIndex(), [&](comm::Communicator& group) {
      mean.copy_(local);
      if (mean.numel() > 0) comm::allReduceCompressed(group, mean, comm::ReduceOp::kAvg, compression_);
    });
    local.copy_(mean);
  }

  // The job-wide number of the fragment sync at this apply step: syncs fall
  // on every multiple of H/P (one fragment each), so step / (H/P); with one
  // fragment that is the outer step n = step / H. From step_, which state()
  // carries, so a joiner continues the numbering.
  int64_t syncIndex() const { return step_ / (config_.inner_steps / config_.fragments); }

  // Outer Nesterov SGD on fragment f with the averaged pseudo-gradient in
  // delta_, operation for operation as torch.optim.SGD (dampening 0, buffer
  // = first gradient), then theta_f <- (1 - mixing)*theta_g + mixing*theta_local.
  void applyOuterStep(int f) {
    at::NoGradGuard noGrad;
    at::Tensor outer = fragmentSlice(outer_, f);
    const at::Tensor averaged = fragmentSlice(delta_, f);
    const double lr = config_.outer_lr;
    const double mu = config_.outer_momentum;
    if (mu == 0) {
      outer.add_(averaged, -lr);
    } else {
      if (!momentum_.defined()) momentum_ = at::zeros_like(outer_);
      at::Tensor buffer = fragmentSlice(momentum_, f);
      if (!momentumStarted_[f]) {
        buffer.copy_(averaged);
        momentumStarted_[f] = true;
      } else {
        buffer.mul_(mu).add_(averaged);
      }
      outer.add_(config_.nesterov ? averaged.add(buffer, mu) : buffer, -lr);
    }
    for (size_t i = 0; i < parameters_.size(); ++i) {
      if (fragmentOf_[i] != f) continue;
      if (config_.mixing == 0) {
        parameters_[i].copy_(outerViews_[i]);
      } else {
        // The local tensors moved on `delay` steps since the snapshot; mixing
        // keeps a share of that progress instead of discarding it.
        const at::Tensor local = parameters_[i].to(at::kCPU, at::kFloat);
        parameters_[i].copy_(outerViews_[i].mul(1 - config_.mixing).add_(local, config_.mixing));
      }
    }
  }

  const DilocoConfig config_;
  const comm::Compression compression_;
  std::unique_ptr<Optimizer> inner_;
  std::vector<at::Tensor> parameters_;  // the training tensors (theta_i), shared with inner_
  comm::CommPtr replicaComm_;  // null when elastic
  ElasticCollective collective_;  // elastic: the fragment syncs run here instead of on replicaComm_
  comm::CommPtr streamComm_;  // split off replicaComm_ when delay > 0

  std::vector<int> fragmentOf_;        // per parameter
  std::vector<int64_t> offsets_;       // per parameter: start in the flat buffers
  std::vector<int64_t> fragmentBegin_;  // fragment f: [fragmentBegin_[f], fragmentBegin_[f+1])
  std::vector<size_t> firstOfFragment_;

  at::Tensor outer_;     // (total,) fp32 host: theta_g
  at::Tensor delta_;     // (total,) fp32 host: pseudo-gradients, averaged in place
  at::Tensor momentum_;  // (total,) fp32 host: outer momentum; undefined until the first outer step with mu > 0
  std::vector<at::Tensor> outerViews_;  // per parameter, shaped like it
  std::vector<bool> momentumStarted_;   // per fragment: buffer holds a value (PyTorch: buf = Delta at first)

  int64_t step_ = 0;                        // local steps taken
  mutable std::optional<Pending> pending_;  // state() completes it
};

}  // namespace

std::unique_ptr<Optimizer> makeDiloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner,
                                      std::vector<at::Tensor> parameters, comm::CommPtr replicaComm,
                                      std::vector<int> groups) {
  config.validate();
  TESSERA_CHECK_ARG(inner != nullptr, "makeDiloco: no inner optimizer");
  TESSERA_CHECK_ARG(replicaComm != nullptr, "makeDiloco: no replica communicator");
  TESSERA_CHECK_ARG(!parameters.empty(), "makeDiloco: no parameters");
  return std::make_unique<Diloco>(config, std::move(inner), std::move(parameters), std::move(replicaComm), groups);
}

std::unique_ptr<Optimizer> makeElasticDiloco(const DilocoConfig& config, std::unique_ptr<Optimizer> inner,
                                             std::vector<at::Tensor> parameters, ElasticCollective collective,
                                             std::vector<int> groups) {
  config.validate();
  TESSERA_CHECK_ARG(inner != nullptr, "makeElasticDiloco: no inner optimizer");
  TESSERA_CHECK_ARG(collective != nullptr, "makeElasticDiloco: no elastic collective");
  TESSERA_CHECK_ARG(!parameters.empty(), "makeElasticDiloco: no parameters");
  return std::make_unique<Diloco>(config, std::move(inner), std::move(parameters), /*replicaComm=*/nullptr, groups,
                                  std::move(collective));
}

}  // namespace tessera::optim
