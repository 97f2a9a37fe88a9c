// FullyShardedDataParallel: unit layout and construction (GPT blocks and
// their MoE experts as units), the step's finishing reductions and the
// public methods. The gather/run/free autograd function and the per-unit
// gradient pipeline are fsdp_unit.cc; their shared state is fsdp_internal.h;
// the DataParallel adapter is fsdp_data_parallel.cc.
#include "tessera/parallel/fsdp.h"

#include <torch/nn/module.h>

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "parallel/fsdp_internal.h"
#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/core/timer.h"

namespace tessera::parallel {

using fsdp_internal::GatheredUnit;
using fsdp_internal::hasPrefix;
using fsdp_internal::PendingReduce;
using fsdp_internal::secondsBetween;
using fsdp_internal::Unit;

namespace {

// Collective: `tensor` takes the value of rank 0 of the whole data-parallel
// group (replicate first, then shard: see the constructor).
void broadcastFromFirstReplica(at::Tensor tensor, const comm::CommPtr& shardComm,
                               const comm::CommPtr& replicateComm) {
  if (replicateComm) replicateComm->broadcast(tensor, /*root=*/0);
  shardComm->broadcast(tensor, /*root=*/0);
}

std::string blockUnitName(const models::GptImpl& gpt, size_t position) {
  return "blocks." + std::to_string(gpt.blocks->globalIndex(position));
}

std::string expertUnitName(const models::GptImpl& gpt, size_t position) {
  return blockUnitName(gpt, position) + ".moe.experts";
}

// One unit per block; an MoE block's aux loss is the unit's aux. Dropout is
// safe: the masks are a function of the GPT's random key, which the
// recomputation sees unchanged (fsdp.h). With `experts`, an MoE block's
// experts follow it as a unit of their own (nested: it takes their
// parameters out of the block's), which runs the held experts directly
// (runExperts, not the runner that leads back here).
std::vector<FsdpUnitSpec> gptUnits(models::GptImpl& gpt, const FsdpExpertUnits* experts) {
  std::vector<FsdpUnitSpec> units;
  for (size_t i = 0; i < gpt.blocks->size(); ++i) {  // the held blocks (a pipeline part: some), by global index
    models::BlockImpl* block = &gpt.blocks->at(i);
    FsdpUnitSpec unit;
    unit.prefix = blockUnitName(gpt, i);
    unit.forward = [block](const at::Tensor& x) {
      models::BlockOutput out = block->forwardWithAux(x);
      return FsdpUnitOutput(std::move(out.x), std::move(out.aux));
    };
    units.push_back(std::move(unit));
    if (!experts || !block->moe) continue;
    models::MoeFeedForwardImpl* moe = block->moe.get();
    FsdpUnitSpec expertUnit;
    expertUnit.prefix = expertUnitName(gpt, i);
    expertUnit.forward = [moe](const at::Tensor& buffer) { return FsdpUnitOutput(moe->runExperts(buffer)); };
    expertUnit.shardComm = experts->shardComm;
    expertUnit.replicateComm = experts->replicateComm;
    expertUnit.gradientScale = experts->gradientScale;
    units.push_back(std::move(expertUnit));
  }
  return units;
}

}  // namespace

FullyShardedDataParallel::FullyShardedDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> specs,
                                                   comm::CommPtr shardComm, comm::CommPtr replicateComm,
                                                   FsdpConfig config)
    : state_(std::make_shared<State>()) {
  TESSERA_CHECK_ARG(shardComm != nullptr, "FSDP needs a dp_shard communicator, got nullptr");
  State& s = *state_;
  s.gradComm = config.gradComm;  // FSDP's parameters are CPU float32 (checked below): every mode can carry them
  const bool autoFp8 = config.gradComm == GradientComm::kFp8 && config.fp8Scaling == Fp8Scaling::kAuto;
  if (autoFp8) config.fp8AutoScale.validate();
  s.shardComm = std::move(shardComm);
  if (replicateComm && replicateComm->size() > 1) s.replicateComm = std::move(replicateComm);

  // A parameter reachable under two names (tied) is used by two parts of the
  // model, so it cannot be freed after one unit: it joins the root.
  const auto named = module.named_parameters(/*recurse=*/true);
  std::unordered_map<const void*, models::ParameterLayout> logicalOf;
  for (const models::LogicalParameter& p : models::logicalParameters(module)) {
    logicalOf[p.tensor.unsafeGetTensorImpl()] = models::ParameterLayout{p.globalShape, p.pieces};
  }
  std::unordered_map<const void*, int> uses;
  for (const auto& item : named) ++uses[item.value().unsafeGetTensorImpl()];

  for (const FsdpUnitSpec& spec : specs) {
    TESSERA_CHECK_ARG(!spec.prefix.empty() && spec.forward, "every FSDP unit needs a non-empty prefix and a forward");
    Unit unit;
    unit.name = spec.prefix;
    unit.forward = spec.forward;
    TESSERA_CHECK_ARG(std::isfinite(spec.gradientScale) && spec.gradientScale > 0,
                      "FSDP unit '" << spec.prefix << "' has gradientScale " << spec.gradientScale
                                    << "; it must be finite and > 0 (1 / ep for expert units, else 1)");
    unit.gradientScale = spec.gradientScale;
    unit.shardComm = spec.shardComm ? spec.shardComm : s.shardComm;
    const comm::CommPtr& replicate = spec.replicateComm ? spec.replicateComm : s.replicateComm;
    if (replicate && replicate->size() > 1) unit.replicateComm = replicate;
    s.units.push_back(std::move(unit));
  }
  Unit root;
  root.name = "<root>";
  root.shardComm = s.shardComm;
  root.replicateComm = s.replicateComm;
  std::unordered_map<const void*, bool> placed;
  for (const auto& item : named) {
    const at::Tensor& param = item.value();
    if (!param.requires_grad() || placed[param.unsafeGetTensorImpl()]) continue;
    placed[param.unsafeGetTensorImpl()] = true;
    TESSERA_CHECK_ARG(param.scalar_type() == at::kFloat && param.layout() == at::kStrided && param.is_cpu(),
                      "FSDP parameter '" << item.key() << "' must be a dense CPU float32 tensor, got "
                                         << param.scalar_type() << " on " << param.device());
    Unit* owner = &root;
    if (uses[param.unsafeGetTensorImpl()] == 1) {
      for (Unit& unit : s.units) {
        if (hasPrefix(item.key(), unit.name)) owner = &unit;
      }
    }
    owner->paramNames.push_back(item.key());
    owner->params.push_back(param);
    owner->logical.push_back(logicalOf.at(param.unsafeGetTensorImpl()));
  }
  for (const Unit& unit : s.units) {
    TESSERA_CHECK_ARG(!unit.params.empty(), "FSDP unit '" << unit.name << "' matches no trainable parameter "
                                                          << "(names are like '" << named[0].key() << "')");
  }
  // The units' GEMM layers, whose mode (deferred or not) is read at each
  // backward. Like a parameter, a layer belongs to the last unit naming it: a
  // nested unit's layers (an MoE block's experts) are its own, so the outer
  // unit waits for no deferred weight gradient of theirs.
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    torch::nn::Module* layer = item.value().get();
    if (dynamic_cast<models::LinearImpl*>(layer) == nullptr && dynamic_cast<models::EmbeddingImpl*>(layer) == nullptr) {
      continue;
    }
    Unit* owner = nullptr;
    for (Unit& unit : s.units) {
      if (hasPrefix(item.key(), unit.name)) owner = &unit;
    }
    if (owner != nullptr) owner->gemmLayers.push_back(layer);
  }
  s.hasRoot = !root.params.empty();
  if (s.hasRoot) s.units.push_back(std::move(root));
  if (autoFp8) {
    for (Unit& unit : s.units) {
      unit.shardScaler = std::make_unique<comm::Fp8AutoScaler>(config.fp8AutoScale);
      if (unit.replicateComm) unit.replicateScaler = std::make_unique<comm::Fp8AutoScaler>(config.fp8AutoScale);
    }
  }

  // Layout, rank 0's values everywhere, then keep only this rank's slice.
  at::NoGradGuard noGrad;
  for (Unit& unit : s.units) {
    const int64_t n = unit.shardComm->size();
    for (const at::Tensor& param : unit.params) {
      unit.offsets.push_back(unit.numel);
      unit.shapes.push_back(param.sizes().vec());
      unit.numel += param.numel();
    }
    unit.paddedNumel = (unit.numel + n - 1) / n * n;
    unit.shardNumel = unit.paddedNumel / n;
    at::Tensor flat = at::zeros({unit.paddedNumel}, at::kFloat);
    for (size_t i = 0; i < unit.params.size(); ++i) {
      flat.narrow(0, unit.offsets[i], unit.params[i].numel()).copy_(unit.params[i].reshape({-1}));
    }
    broadcastFromFirstReplica(flat, unit.shardComm, unit.replicateComm);
    unit.shard = flat.narrow(0, unit.shardComm->rank() * unit.shardNumel, unit.shardNumel).clone();
    unit.shard.requires_grad_(true);
    State::release(unit);
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    at::Tensor staged = item.value().contiguous();
    broadcastFromFirstReplica(staged, s.shardComm, s.replicateComm);
    if (!staged.is_same(item.value())) item.value().copy_(staged);
  }
}

FullyShardedDataParallel::FullyShardedDataParallel(models::GptImpl& gpt, comm::CommPtr shardComm,
                                                   comm::CommPtr replicateComm, const FsdpExpertUnits* experts,
                                                   FsdpConfig config)
    : FullyShardedDataParallel(gpt, gptUnits(gpt, experts), std::move(shardComm), std::move(replicateComm),
                               config) {
  const auto indexOf = [this](const std::string& name) {
    const std::vector<Unit>& units = state_->units;
    const auto it = std::find_if(units.begin(), units.end(), [&](const Unit& u) { return u.name == name; });
    TESSERA_CHECK(it != units.end(), "FSDP built no unit '" << name << "' for the GPT");
    return static_cast<size_t>(it - units.begin());
  };
  // Unit index per held block position (gptUnits' order, experts interleaved).
  std::vector<size_t> blockUnits;
  for (size_t i = 0; i < gpt.blocks->size(); ++i) blockUnits.push_back(indexOf(blockUnitName(gpt, i)));
  gpt_ = &gpt;
  // The runner gets the GLOBAL block index.
  gpt.setBlockRunner([this, &gpt, blockUnits](int64_t index, const at::Tensor& x) {
    FsdpUnitOutput out = forwardUnitWithAux(blockUnits[gpt.blocks->positionOf(index)], x);
    return models::BlockOutput{std::move(out.x), std::move(out.aux)};
  });
  // The block's forward (under no-grad in the block unit's forward, with grad
  // in its recomputation) runs its experts through their own unit.
  for (size_t i = 0; experts && i < gpt.blocks->size(); ++i) {
    models::BlockImpl& block = gpt.blocks->at(i);
    if (!block.moe) continue;
    const size_t expertUnit = indexOf(expertUnitName(gpt, i));
    expertRunners_.push_back(block.moe.get());  // before installing: the destructor removes what is listed
    block.moe->setExpertRunner(
        [this, expertUnit](const at::Tensor& buffer) { return forwardUnit(expertUnit, buffer); });
  }
}

FullyShardedDataParallel::~FullyShardedDataParallel() {
  if (gpt_ != nullptr) gpt_->setBlockRunner(nullptr);
  for (models::MoeFeedForwardImpl* moe : expertRunners_) moe->setExpertRunner(nullptr);
}

FsdpUnitOutput FullyShardedDataParallel::forwardUnitWithAux(size_t index, const at::Tensor& x) {
  State& s = *state_;
  TESSERA_CHECK_ARG(index < s.units.size() - (s.hasRoot ? 1 : 0),
                    "FSDP unit index " << index << " out of range; there are "
                                       << s.units.size() - (s.hasRoot ? 1 : 0) << " units");
  Unit& unit = s.units[index];
  if (s.unsharded) return unit.forward(x);
  if (!at::GradMode::is_enabled()) {
    const GatheredUnit gathered(s, unit);
    return unit.forward(x);
  }
  const auto outputs = s.runWithRecomputation(index, x);
  return outputs.size() == 2 ? FsdpUnitOutput(outputs[0], outputs[1]) : FsdpUnitOutput(outputs[0]);
}

at::Tensor FullyShardedDataParallel::forwardUnit(size_t index, const at::Tensor& x) {
  FsdpUnitOutput out = forwardUnitWithAux(index, x);
  TESSERA_CHECK_ARG(!out.aux.defined(), "FSDP unit '" << state_->units[index].name
                                                      << "' returns an aux loss, which forwardUnit() would drop "
                                                         "with its gradient; call forwardUnitWithAux() and add the "
                                                         "aux into the loss");
  return out.x;
}

void FullyShardedDataParallel::beforeForward() {
  State& s = *state_;
  if (s.unsharded || !s.hasRoot || s.root().full.defined()) return;
  s.gather(s.root());
}

void FullyShardedDataParallel::finishGradientSync() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.noSyncDepth > 0) return;
  }
  TESSERA_CHECK_ARG(!s.unsharded, "finishGradientSync() after unshard(): call reshard() before training");
  for (const Unit& unit : s.units) {
    TESSERA_CHECK_ARG(unit.holds == 0, "FSDP unit '" << unit.name << "' still awaits " << unit.holds
                                                     << " deferred weight-gradient pass(es); drain the "
                                                        "WeightGradStore (the pipeline's W) before finishGradientSync()");
  }
  // Units short of their declared arrivals: reduce what they have (so peers,
  // which run the same schedule, do not hang), then report them.
  std::vector<std::string> partial;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    for (size_t i = 0; i < s.units.size(); ++i) {
      Unit& unit = s.units[i];
      if (unit.arrived == 0) continue;
      partial.push_back("'" + unit.name + "' (" + std::to_string(unit.arrived) + " of " +
                        std::to_string(unit.needed) + ")");
      at::Tensor flat = std::move(unit.accumulated);
      unit.accumulated = at::Tensor();
      s.launchReduce(i, std::move(flat));
    }
  }
  if (s.hasRoot && s.root().full.defined()) {
    const Stopwatch rootWatch;  // flattening and launching the root's reduce-scatter: nothing hides it
    s.reduceRootGradient();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.countExposed(s.root().shardComm, rootWatch.seconds());
  }

  std::lock_guard<std::mutex> lock(s.mutex);
  for (PendingReduce& p : s.pending) {
    const Stopwatch waiting;
    p.work->wait();  // also when done: rethrows its error; bf16 widens its result here
    if (!p.done) {
      p.done = true;
      s.stats.commSeconds += secondsBetween(p.launchedAt, SteadyClock::now());
    }
    s.countExposed(s.units[p.unit].shardComm, waiting.seconds());
  }
  // Hybrid: every replica now holds the same shard slot's average over its
  // own dp_shard group; averaging those over dp_replicate averages over all.
  const Stopwatch replicating;
  // fp8: each call's figures, written by its thread. Declared before the
  // works so that it outlives them: destroying the last work of a comm's
  // chain joins it, and it ran after every earlier one (also on a throw).
  std::vector<comm::Fp8CommStats> replicateFp8(s.pending.size());
  std::vector<std::pair<comm::WorkPtr, comm::CommPtr>> works;
  std::map<const comm::Communicator*, comm::WorkPtr> previousOn;  // fp8: one ring in flight per comm
  for (size_t i = 0; i < s.pending.size(); ++i) {
    PendingReduce& p = s.pending[i];
    Unit& unit = s.units[p.unit];
    const comm::CommPtr& replicate = unit.replicateComm;
    if (!replicate) continue;
    const Stopwatch launching;
    comm::WorkPtr& previous = previousOn[replicate.get()];
    previous = allReduceGradientAsync(replicate, p.output, s.gradComm, previous, unit.replicateScaler.get(),
                                      &replicateFp8[i]);
    works.emplace_back(previous, replicate);
    s.countBytes(replicate, p.output.numel() * gradientWireBytes(s.gradComm));
    s.countExposed(replicate, launching.seconds());
  }
  for (auto& [work, replicate] : works) {
    const Stopwatch waiting;
    work->wait();
    s.countExposed(replicate, waiting.seconds());
  }
  if (!works.empty()) s.stats.commSeconds += replicating.seconds();
  if (s.gradComm == GradientComm::kFp8) {
    for (size_t i = 0; i < s.pending.size(); ++i) {
      if (s.units[s.pending[i].unit].replicateComm) s.fp8Step.count(replicateFp8[i]);
    }
    for (const Unit& unit : s.units) {
      if (unit.shardScaler) s.fp8Step.countMu(unit.shardScaler->mu());
      if (unit.replicateScaler) s.fp8Step.countMu(unit.replicateScaler->mu());
    }
    s.stats.fp8LastStep = s.fp8Step;
    s.stats.fp8Total += s.fp8Step;
    s.fp8Step = {};
  }
  at::NoGradGuard noGrad;
  for (PendingReduce& p : s.pending) {
    // After both averages (so hybrid units scale once): expert units' 1 / ep.
    const double scale = s.units[p.unit].gradientScale;
    if (scale != 1.0) p.output.mul_(scale);
    at::Tensor& grad = s.units[p.unit].shard.mutable_grad();
    if (grad.defined()) {
      grad.add_(p.output);
    } else {
      grad = p.output;
    }
  }
  s.pending.clear();
  if (!partial.empty()) {
    std::string names;
    for (const std::string& name : partial) names += (names.empty() ? "" : ", ") + name;
    throw InvalidArgument("FSDP: unit(s) " + names + " received fewer backward passes than setGradientArrivals "
                          "declared in this synced step; their partial gradients were reduced so peers did not "
                          "hang. Declare the arrivals the schedule produces, or run every micro-batch's backward");
  }
}

void FullyShardedDataParallel::setGradientArrivals(std::function<int(const std::string& name)> arrivals) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  for (const Unit& unit : s.units) {
    TESSERA_CHECK_ARG(unit.arrived == 0 && s.pending.empty(),
                      "FSDP setGradientArrivals() during a synced step; call it between steps");
  }
  std::vector<int> needed;
  for (size_t i = 0; i < s.units.size(); ++i) {
    const Unit& unit = s.units[i];
    int n = 1;
    const bool isRoot = s.hasRoot && i + 1 == s.units.size();  // reduced once, by finishGradientSync()
    if (arrivals && !isRoot) {
      for (const std::string& name : unit.paramNames) {
        const int k = arrivals(name);
        TESSERA_CHECK_ARG(k >= 1, "setGradientArrivals: parameter '" << name << "' expects " << k
                                                                     << " gradient arrivals per synced step; need >= 1");
        n = std::max(n, k);
      }
    }
    needed.push_back(n);
  }
  for (size_t i = 0; i < needed.size(); ++i) s.units[i].needed = needed[i];
}

double FullyShardedDataParallel::gradNorm() {
  // Per distinct shard comm, in order of first use (the same on every rank):
  // the sum of squares over this rank's shards of the units sharded over it.
  std::vector<std::pair<comm::CommPtr, double>> sums;
  for (const Unit& unit : state_->units) {
    auto it = std::find_if(sums.begin(), sums.end(), [&](const auto& e) { return e.first == unit.shardComm; });
    if (it == sums.end()) it = sums.insert(sums.end(), {unit.shardComm, 0.0});
    const at::Tensor& grad = unit.shard.grad();
    if (grad.defined()) it->second += grad.to(at::kDouble).pow(2).sum().item<double>();
  }
  double sumSquares = 0;
  for (const auto& [group, local] : sums) {
    at::Tensor total = at::full({1}, local, at::kDouble);
    group->allReduce(total, comm::ReduceOp::kSum);
    sumSquares += total.item<double>();
  }
  return std::sqrt(sumSquares);
}

std::unique_ptr<NoSyncScope> FullyShardedDataParallel::noSync() {
  struct Scope final : NoSyncScope {
    explicit Scope(std::shared_ptr<State> s) : state(std::move(s)) {
      std::lock_guard<std::mutex> lock(state->mutex);
      ++state->noSyncDepth;
    }
    ~Scope() override {
      std::lock_guard<std::mutex> lock(state->mutex);
      --state->noSyncDepth;
    }
    std::shared_ptr<State> state;
  };
  return std::make_unique<Scope>(state_);
}

std::vector<at::Tensor> FullyShardedDataParallel::shards() const {
  std::vector<at::Tensor> out;
  for (const Unit& unit : state_->units) out.push_back(unit.shard);
  return out;
}

void FullyShardedDataParallel::unshard() {
  State& s = *state_;
  if (s.unsharded) return;
  for (Unit& unit : s.units) {
    if (!unit.full.defined()) s.gather(unit);
  }
  s.unsharded = true;
}

void FullyShardedDataParallel::reshard() {
  State& s = *state_;
  if (!s.unsharded) return;
  for (Unit& unit : s.units) State::release(unit);
  s.unsharded = false;
}

int64_t FullyShardedDataParallel::heldParameterBytes() const {
  int64_t bytes = 0;
  for (const Unit& unit : state_->units) {
    bytes += unit.shard.numel() * static_cast<int64_t>(unit.shard.element_size());
    if (unit.full.defined()) bytes += unit.full.numel() * static_cast<int64_t>(unit.full.element_size());
  }
  return bytes;
}

std::vector<FullyShardedDataParallel::UnitLayout> FullyShardedDataParallel::layout() const {
  std::vector<UnitLayout> out;
  for (const Unit& unit : state_->units) out.push_back({unit.name, unit.numel, unit.paddedNumel});
  return out;
}

std::vector<std::vector<ParameterPiece>> FullyShardedDataParallel::shardLayout() const {
  const State& s = *state_;
  std::vector<std::vector<ParameterPiece>> out;
  for (const Unit& unit : s.units) {
    const int64_t rank = unit.shardComm->rank();
    // This rank's shard covers [begin, end) of the unit's flat buffer;
    // parameter i covers [offsets[i], offsets[i] + numel_i).
    const int64_t begin = rank * unit.shardNumel;
    const int64_t end = begin + unit.shardNumel;
    std::vector<ParameterPiece> pieces;
    for (size_t i = 0; i < unit.params.size(); ++i) {
      const int64_t paramBegin = unit.offsets[i];
      const int64_t paramEnd = paramBegin + c10::multiply_integers(unit.shapes[i]);
      const int64_t from = std::max(begin, paramBegin);
      const int64_t to = std::min(end, paramEnd);
      if (from >= to) continue;
      // FSDP's flat shard is a flat range of the parameter's pieces of its
      // logical tensor (the whole box for an unsharded parameter; one range
      // of each of qkv's row blocks under tensor parallelism).
      const models::ParameterLayout& logical = unit.logical[i];
      for (const models::PlacedSlice& placed : models::slicesOfRange(logical.pieces, from - paramBegin, to - from)) {
        pieces.push_back(ParameterPiece{unit.paramNames[i], logical.globalShape, placed.slice,
                                        from - begin + placed.offset});
      }
    }
    out.push_back(std::move(pieces));
  }
  return out;
}

DataParallelStats FullyShardedDataParallel::stats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->stats;
}

const comm::CommPtr& FullyShardedDataParallel::shardComm() const { return state_->shardComm; }

}  // namespace tessera::parallel
