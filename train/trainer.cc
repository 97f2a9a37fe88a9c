#include "tessera/train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <torch/nn/module.h>
#include <torch/utils.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>

#include "tessera/core/error.h"
#include "tessera/core/models/precision.h"
#include "tessera/core/logging.h"
#include "tessera/core/timer.h"
#include "tessera/optim/grad_clip.h"

namespace tessera {

namespace {

// Optimizers whose step() is local and changes nothing but the tensors it was
// given (DataParallel::optimizerParameters()) and its state(), leaving the
// gradients as they were: undoing a step is restoring those. The others
// communicate inside step() or keep outer copies and counters (DiLoCo, DeMo,
// MT-DAO); a rollback cannot take back their collectives.
bool stepCanBeRolledBack(const optim::Optimizer& optimizer) {
  const std::string name = optimizer.name();
  return (name == "adamw" || name == "sgd") && optimizer.communicators().empty();
}

// dst (allocated like src on first use or when src changes shape) := src.
void copyInto(at::Tensor& dst, const at::Tensor& src) {
  if (!dst.defined() || dst.sizes() != src.sizes() || dst.scalar_type() != src.scalar_type() ||
      dst.device() != src.device()) {
    dst = at::empty_like(src, at::MemoryFormat::Preserve);
  }
  dst.copy_(src);
}

}  // namespace

// What one optimizer step changes, copied just before it so that restore()
// puts back the exact bits: the optimizer tensors' values and the optimizer's
// state() (moments, step counter; a state tensor the step has not created yet
// is restored as "not created"). The copies live in buffers allocated on first
// use and reused every step. Local.
class Trainer::StepRollback {
 public:
  StepRollback(std::vector<at::Tensor> parameters, optim::Optimizer& optimizer)
      : parameters_(std::move(parameters)), savedParameters_(parameters_.size()), optimizer_(optimizer) {}

  void save() {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) copyInto(savedParameters_[i], parameters_[i]);
    const optim::OptimizerState live = optimizer_.state();  // aliases the live buffers
    saved_.scalars = live.scalars;
    copyKinds(live.perParameter, saved_.perParameter, "");
    copyKinds(live.perParameterAux, saved_.perParameterAux, "aux/");
  }

  // saved[kind] := copies of live[kind] in buffers_[bufferPrefix + kind].
  void copyKinds(const std::map<std::string, std::vector<at::Tensor>>& live,
                 std::map<std::string, std::vector<at::Tensor>>& saved, const std::string& bufferPrefix) {
    saved.clear();
    for (const auto& [kind, tensors] : live) {
      std::vector<at::Tensor>& buffers = buffers_[bufferPrefix + kind];
      buffers.resize(tensors.size());
      std::vector<at::Tensor>& out = saved[kind];
      out.resize(tensors.size());
      for (size_t i = 0; i < tensors.size(); ++i) {
        if (!tensors[i].defined()) continue;  // out[i] stays undefined: loadState() un-creates it
        copyInto(buffers[i], tensors[i]);
        out[i] = buffers[i];
      }
    }
  }

  void restore() {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < parameters_.size(); ++i) parameters_[i].copy_(savedParameters_[i]);
    optimizer_.loadState(saved_);  // copies into the live buffers
  }

 private:
  std::vector<at::Tensor> parameters_;       // the optimizer tensors (shared with the optimizer)
  std::vector<at::Tensor> savedParameters_;  // their values before the step
  optim::Optimizer& optimizer_;
  optim::OptimizerState saved_;              // state() before the step; tensors are views of buffers_
  std::map<std::string, std::vector<at::Tensor>> buffers_;
};

Trainer::~Trainer() = default;

Trainer::Trainer(TrainerParts parts, TrainConfig config) : parts_(std::move(parts)), config_(config) {
  config_.validate();
  TESSERA_CHECK_ARG(parts_.model && parts_.dp && parts_.optimizer && parts_.train && parts_.schedule,
                    "Trainer: model, dp, optimizer, schedule and train source are required");
  for (const at::Tensor& p : parts_.model->module().parameters()) {
    // Empty ones are FSDP's released parameters; their data lives in the strategy.
    TESSERA_CHECK_ARG(p.numel() == 0 || p.device() == parts_.device,
                      "Trainer: a model parameter is on " << p.device() << " but TrainerParts::device is "
                          << parts_.device << "; move the model (module().to(device)) before building the "
                          << "strategy and the optimizer over its parameters, or pass its device");
  }
  executor_ = parts_.executor;
  if (executor_ == nullptr) {
    ownExecutor_ = parallel::makeLocalStepExecutor(*parts_.model, *parts_.dp,
                                                   parts_.dataComm ? parts_.dataComm->rank() : 0);
    executor_ = ownExecutor_.get();
  }
  torch::manual_seed(config_.seed);
  if (parts_.val) valStart_ = parts_.val->state();
  if (parts_.stageNorm && config_.post_validation == "auto" && stepCanBeRolledBack(*parts_.optimizer)) {
    rollback_ = std::make_unique<StepRollback>(parts_.dp->optimizerParameters(), *parts_.optimizer);
  }
}

// The loop. Every rank runs it; the comments mark the collectives.
StepReport Trainer::run() {
  StepReport report;
  report.totalSteps = config_.steps;
  sinceRunStart_.restart();
  while (state_.step < config_.steps) {
    for (auto& hook : callbacks_.beforeStep) hook(state_.step);
    const Stopwatch stepTimer;

    const double lr = parts_.schedule(state_.step);
    parts_.optimizer->setLearningRate(lr);
    const double loss = forwardBackward();                              // collective as the strategy is
    const Update updated = update();                                     // collective
    parts_.optimizer->zeroGrad();
    ++state_.step;
    stepSeconds_ += stepTimer.seconds();
    windowSeconds_ += stepTimer.seconds();

    report = makeReport(loss, lr, updated);                             // collective: averages the loss
    if (isEvalStep()) {
      report.valLoss = evaluate();                                       // collective
      for (auto& hook : callbacks_.afterEval) hook(state_.step, *report.valLoss);
    }
    for (auto& hook : callbacks_.afterStep) hook(report);
    if (report.outerStep) {
      for (auto& hook : callbacks_.afterOuterStep) hook(report);
    }
    if (isLogStep() || report.skipped) writeMetrics(report);
    printProgress(report, state_.step == config_.steps);
  }
  return report;
}

double Trainer::forwardBackward() {
  std::vector<Batch> microBatches;
  microBatches.reserve(static_cast<size_t>(config_.grad_accum));
  const int64_t dataRanks = parts_.dataComm ? parts_.dataComm->size() : 1;
  for (int64_t i = 0; i < config_.grad_accum; ++i) {
    microBatches.push_back(onDevice(parts_.train->next()));
    state_.tokens += microBatches.back().tokens * dataRanks;
    windowTokens_ += microBatches.back().tokens * dataRanks;
  }
  const std::optional<double> loss = executor_->forwardBackward(microBatches, state_.step);
  return loss.value_or(std::numeric_limits<double>::quiet_NaN());
}

// non_blocking: the copy is ordered on the current stream before the forward
// that reads it; from pageable CPU memory it is a synchronous copy anyway.
// On the CPU, to() returns the same tensors (no copy).
Batch Trainer::onDevice(Batch batch) const {
  batch.inputs = batch.inputs.to(parts_.device, /*non_blocking=*/true);
  batch.targets = batch.targets.to(parts_.device, /*non_blocking=*/true);
  return batch;
}

// Step 3 of the header comment. Every rank reaches the same decision: the
// norm it acts on is the same everywhere (gradNorm is collective over the
// stage's dp/tp ranks, the stage norm's sum is the same bits on every stage).
Trainer::Update Trainer::update() {
  parts_.dp->finishGradientSync();                        // collective
  if (!parts_.stageNorm) return clipAndStep(parts_.dp->gradNorm());  // collective when sharded
  const double stageNorm = parts_.dp->gradNorm();         // collective over this stage's dp/tp
  parts_.stageNorm->start(stageNorm * stageNorm);         // collective over pp, does not wait
  // A non-finite stage norm makes the global one non-finite: nothing to try.
  if (!rollback_ || !std::isfinite(stageNorm)) return clipAndStep(std::sqrt(parts_.stageNorm->finish()));

  rollback_->save();
  const optim::OptimizerStepResult stepped = parts_.optimizer->step();  // local (stepCanBeRolledBack)
  const double norm = std::sqrt(parts_.stageNorm->finish());           // waits for the other stages
  if (std::isfinite(norm) && optim::clipScale(norm, config_.clip) == 1.0) return {norm, false, stepped.outerStep};
  rollback_->restore();
  return clipAndStep(norm);  // the synchronous order from here: the same bits
}

Trainer::Update Trainer::clipAndStep(double globalNorm) {
  if (!std::isfinite(globalNorm)) return skip(globalNorm);
  optim::clipGradients(*parts_.dp, globalNorm, config_.clip);
  return {globalNorm, false, parts_.optimizer->step().outerStep};  // may be collective (DiLoCo)
}

Trainer::Update Trainer::skip(double globalNorm) {
  ++skippedSteps_;
  if (parts_.reportsProgress) {
    TESSERA_LOG(kWarn) << "step " << state_.step + 1 << ": the global gradient norm is " << globalNorm
                       << "; skipping the optimizer update (gradients zeroed; the step and its batches still count; "
                       << skippedSteps_ << " skipped so far)";
  }
  return {globalNorm, true, false};
}

double Trainer::evaluate() {
  if (!parts_.val || config_.eval_batches == 0) return std::numeric_limits<double>::quiet_NaN();
  parts_.val->loadState(valStart_);
  torch::nn::Module& module = parts_.model->module();
  const bool wasTraining = module.is_training();
  module.eval();
  double sum = 0;
  for (int64_t i = 0; i < config_.eval_batches; ++i) {
    sum += executor_->evaluate(onDevice(parts_.val->next())).value_or(std::numeric_limits<double>::quiet_NaN());
  }
  module.train(wasTraining);
  return averageOverDp(sum / static_cast<double>(config_.eval_batches));
}

StepReport Trainer::makeReport(double localLoss, double lr, const Update& update) {
  StepReport r;
  r.step = state_.step;
  r.totalSteps = config_.steps;
  r.loss = averageOverDp(localLoss);
  r.lr = lr;
  r.gradNorm = update.gradNorm;
  r.skipped = update.skipped;
  r.skippedSteps = skippedSteps_;
  r.tokens = state_.tokens;
  r.tokensPerSecond = windowSeconds_ > 0 ? static_cast<double>(windowTokens_) / windowSeconds_ : 0.0;
  countTraffic(r);
  r.computeSeconds = std::max(0.0, stepSeconds_ - r.commSeconds);
  r.timeSeconds = sinceRunStart_.seconds();
  r.outerStep = update.outerStep;
  return r;
}

void Trainer::countTraffic(StepReport& r) const {
  const parallel::DataParallelStats dpStats = parts_.dp->stats();
  auto add = [&r](const std::string& name, uint64_t bytes, double seconds) {
    CommTraffic& entry = r.comm[name];
    entry.bytesSent += bytes;
    entry.exposedSeconds += seconds;
    r.commBytes += bytes;
    r.commSeconds += seconds;
  };
  if (parts_.traffic.empty()) {
    if (parts_.dataComm) {
      const auto it = dpStats.exposedSecondsByComm.find(parts_.dataComm->name());
      add("dp", parts_.dataComm->stats().totalBytesSent(),
          it != dpStats.exposedSecondsByComm.end() ? it->second : dpStats.exposedSeconds);
    }
    return;
  }
  for (const TrafficSource& source : parts_.traffic) {
    if (!source.comm) {
      add(source.name, source.bytesSent ? source.bytesSent() : 0, source.seconds ? source.seconds() : 0.0);
      continue;
    }
    // The strategy knows how much of its asynchronous traffic the loop waited
    // for; any other communicator's calls block, so all their time is exposed.
    const comm::CommStats stats = source.comm->stats();
    const auto it = dpStats.exposedSecondsByComm.find(source.comm->name());
    add(source.name, stats.totalBytesSent(),
        it != dpStats.exposedSecondsByComm.end() ? it->second : stats.totalSeconds());
  }
}

double Trainer::averageOverDp(double value) {
  if (!executor_->hasLoss()) return std::numeric_limits<double>::quiet_NaN();
  if (!parts_.dataComm || parts_.dataComm->size() == 1) return value;
  at::Tensor t = at::tensor({value}, at::TensorOptions().dtype(at::kDouble)).to(parts_.device);
  parts_.dataComm->allReduce(t, comm::ReduceOp::kAvg);  // NCCL: a device tensor
  return t.item<double>();
}

bool Trainer::isEvalStep() const {
  if (!parts_.val || config_.eval_batches == 0) return false;
  if (state_.step == config_.steps) return true;
  return config_.eval_every > 0 && state_.step % config_.eval_every == 0;
}

bool Trainer::isLogStep() const { return state_.step % config_.log_every == 0 || state_.step == config_.steps; }

// Every rank comes here at the same steps (isLogStep is a function of the
// step; a skip is decided from the same norm everywhere), which extraMetrics'
// collectives rely on; so the record is built on every rank, though only the
// rank with the writer writes it.
void Trainer::writeMetrics(const StepReport& r) {
  MetricsRecord record;
  record.add("step", r.step).add("loss", r.loss);
  if (r.valLoss) record.add("val_loss", *r.valLoss);
  if (r.skipped) record.add("skipped", true);
  if (r.skippedSteps > 0) record.add("skipped_steps", r.skippedSteps);
  record.add("lr", r.lr)
      .add("tokens", r.tokens)
      .add("tokens_per_s", r.tokensPerSecond)
      .add("time_s", r.timeSeconds)
      .add("compute_s", r.computeSeconds)
      .add("comm_s", r.commSeconds)
      .add("comm_bytes", r.commBytes);
  MetricsRecord perComm;
  for (const auto& [name, traffic] : r.comm) {
    perComm.add(name, MetricsRecord().add("bytes", traffic.bytesSent).add("exposed_s", traffic.exposedSeconds));
  }
  record.add("comm", perComm);
  if (parts_.extraMetrics) parts_.extraMetrics(record);  // collective: every rank, writer or not
  if (parts_.metrics) parts_.metrics->write(record);
  windowTokens_ = 0;
  windowSeconds_ = 0;
}

void Trainer::printProgress(const StepReport& r, bool last) const {
  if (!parts_.reportsProgress || !config_.progress) return;
  // On a terminal: one line rewritten in place. Under tessera-run on a
  // terminal (TESSERA_PROGRESS=1, our stderr is its pipe): one line per
  // logged step, since the launcher forwards whole lines.
  const bool terminal = isatty(STDERR_FILENO);
  const char* viaLauncher = std::getenv("TESSERA_PROGRESS");
  if (!terminal && (viaLauncher == nullptr || std::string(viaLauncher) != "1")) return;
  if (!terminal && !last && !isLogStep()) return;
  const double perStep = stepSeconds_ / static_cast<double>(std::max<int64_t>(1, r.step));
  const auto eta = static_cast<int64_t>(perStep * static_cast<double>(r.totalSteps - r.step));
  std::fprintf(stderr, "%sstep %lld/%lld  loss %.4f  %.0f tok/s  ETA %lld:%02lld%s", terminal ? "\r" : "",
               static_cast<long long>(r.step), static_cast<long long>(r.totalSteps), r.loss, r.tokensPerSecond,
               static_cast<long long>(eta / 60), static_cast<long long>(eta % 60), terminal ? "   " : "\n");
  if (terminal && last) std::fputc('\n', stderr);
  std::fflush(stderr);
}

TrainingState Trainer::snapshotView() const {
  TrainingState s = state_;
  s.trainSampler = parts_.train->state();
  s.optimizer = parts_.optimizer->state();
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  s.rng = generator.get_state();
  s.fp8Scaling = models::fp8ScalingState(parts_.model->module());
  return s;
}

TrainingState Trainer::snapshot() const {
  TrainingState s = snapshotView();
  for (auto* kinds : {&s.optimizer.perParameter, &s.optimizer.perParameterAux}) {
    for (auto& [kind, tensors] : *kinds) {
      for (auto& t : tensors) {
        if (t.defined()) t = t.detach().clone();
      }
    }
  }
  if (s.fp8Scaling.defined()) s.fp8Scaling = s.fp8Scaling.clone();
  return s;
}

void Trainer::restore(const TrainingState& s) {
  // Both loadState()s check before they change anything; the sampler is put
  // back if the optimizer refuses, so a failed restore changes nothing.
  if (s.fp8Scaling.defined()) {
    const int64_t held = models::fp8ScalingState(parts_.model->module()).numel();
    TESSERA_CHECK_ARG(s.fp8Scaling.numel() == held,
                      "training state: the FP8 scaling state has " << s.fp8Scaling.numel() << " values, this model's FP8 "
                      "layers hold " << held << "; resume with the same [precision] and model");
  }
  const data::SamplerState previous = parts_.train->state();
  parts_.train->loadState(s.trainSampler);
  try {
    parts_.optimizer->loadState(s.optimizer);
  } catch (...) {
    parts_.train->loadState(previous);
    throw;
  }
  if (s.rng.defined()) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(s.rng);
  }
  if (s.fp8Scaling.defined()) models::loadFp8ScalingState(parts_.model->module(), s.fp8Scaling);
  state_.step = s.step;
  state_.tokens = s.tokens;
}

}  // namespace tessera
