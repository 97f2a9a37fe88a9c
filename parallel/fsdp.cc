// FullyShardedDataParallel: unit layout, the gather/run/free autograd
// function with recomputation in backward, and the gradient reduce-scatter
// pipeline. (The DataParallel adapter is fsdp_data_parallel.cc.)
//
// How a module parameter points at gathered storage: Tensor::set_data (C++'s
// `param.data = ...`) swaps the parameter's storage and shape while keeping
// its autograd identity (leaf, requires_grad, .grad). Gathering a unit makes
// each parameter a view into the unit's full flat buffer; freeing it swaps
// in an empty (0) tensor, so the flat buffer dies once nothing else refers to
// it. The forward runs under no-grad, so nothing saves those views; the
// backward's recomputed graph saves them, and torch::autograd::grad releases
// that graph before the unit is freed again.
#include "tessera/parallel/fsdp.h"

#include <torch/autograd.h>
#include <torch/nn/module.h>

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/linear.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/core/timer.h"

namespace tessera::parallel {

namespace {

// One unit: its parameters' place in the flat buffer and this rank's shard.
struct Unit {
  std::string name;                          // the prefix, or "<root>"
  comm::CommPtr shardComm;                   // the unit's (the constructor's by default)
  comm::CommPtr replicateComm;               // null unless replicated over > 1 rank
  std::vector<std::string> paramNames;
  std::vector<at::Tensor> params;            // the module's parameter tensors
  std::vector<std::vector<int64_t>> shapes;  // their full (local) shapes
  // Each parameter's place in its logical tensor (models::logicalParameters):
  // the whole tensor for plain layers, a slice for a sharded layer's (a TP
  // slice); FSDP's flat shard of it is a flat range of that slice.
  std::vector<models::ParameterLayout> logical;
  std::vector<int64_t> offsets;              // into the flat buffer
  int64_t numel = 0;                         // P
  int64_t paddedNumel = 0;                   // P' = ceil(P / N) * N
  int64_t shardNumel = 0;                    // P' / N
  at::Tensor shard;                          // (P'/N,) fp32 leaf, requires_grad
  at::Tensor full;                           // (P',) while gathered, else undefined
  at::Tensor accumulated;                    // (P',) noSync / earlier arrivals' gradient sum, else undefined
  int needed = 1;                            // backward passes that complete it in a synced step (the root: 1)
  int arrived = 0;                           // of those, counted so far in this synced step
  // The unit's tessera Linear / Embedding layers: a deferred one (split
  // backward) names the WeightGradStore the unit's post-backward waits in.
  std::vector<torch::nn::Module*> gemmLayers;
  int holds = 0;                             // post-backwards queued in that store: the unit stays gathered
  std::function<FsdpUnitOutput(const at::Tensor&)> forward;  // empty for the root
};

// A reduce-scatter in flight: `input` is the unit's full flat gradient,
// `output` receives this rank's averaged slice.
struct PendingReduce {
  size_t unit = 0;
  at::Tensor input;
  at::Tensor output;
  comm::WorkPtr work;
  SteadyClock::time_point launchedAt;
  bool done = false;
};

bool hasPrefix(const std::string& name, const std::string& prefix) {
  return name == prefix || (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
                            name[prefix.size()] == '.');
}

double secondsBetween(SteadyClock::time_point from, SteadyClock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

struct FullyShardedDataParallel::State {
  comm::CommPtr shardComm;      // the constructor's: the root's and every unit's default
  comm::CommPtr replicateComm;  // the same; null unless hybrid with > 1 replica
  std::vector<Unit> units;      // spec order; the root last when it has parameters
  bool hasRoot = false;
  bool unsharded = false;       // unshard() in effect

  // Guards noSyncDepth, pending and stats: unit backward runs on autograd's thread.
  mutable std::mutex mutex;
  int noSyncDepth = 0;
  std::vector<PendingReduce> pending;
  DataParallelStats stats;

  Unit& root() { return units.back(); }

  // Caller holds the mutex. Every exposed second and byte is counted through
  // these, so the per-comm maps sum to the totals.
  void countExposed(const comm::CommPtr& comm, double seconds) {
    stats.exposedSeconds += seconds;
    stats.exposedSecondsByComm[comm->name()] += seconds;
  }
  void countBytes(const comm::CommPtr& comm, int64_t bytes) {
    stats.bytes += bytes;
    stats.bytesByComm[comm->name()] += bytes;
  }

  // Makes the unit's parameters views of `full` (P',).
  static void bind(Unit& unit, at::Tensor full) {
    at::NoGradGuard noGrad;
    for (size_t i = 0; i < unit.params.size(); ++i) {
      const int64_t n = c10::multiply_integers(unit.shapes[i]);
      unit.params[i].set_data(full.narrow(0, unit.offsets[i], n).view(unit.shapes[i]));
    }
    unit.full = std::move(full);
  }

  static void release(Unit& unit) {
    at::NoGradGuard noGrad;
    for (at::Tensor& param : unit.params) param.set_data(at::empty({0}, at::kFloat));
    unit.full = at::Tensor();
  }

  // Collective over the unit's shard comm: all-gather its shards into its parameters.
  void gather(Unit& unit) {
    at::Tensor full = at::empty({unit.paddedNumel}, at::kFloat);
    Stopwatch watch;
    unit.shardComm->allGather(unit.shard.detach(), full);
    const double seconds = watch.seconds();
    {
      std::lock_guard<std::mutex> lock(mutex);
      countBytes(unit.shardComm, unit.paddedNumel * static_cast<int64_t>(sizeof(float)));
      stats.commSeconds += seconds;
      countExposed(unit.shardComm, seconds);  // blocking: nothing overlaps it
    }
    bind(unit, std::move(full));
  }

  // Units may reduce over different comms, whose operations complete
  // independently: poll every one. Caller holds the mutex.
  void pollCompletions() {
    for (PendingReduce& p : pending) {
      if (p.done || !p.work->isCompleted()) continue;
      p.done = true;
      stats.commSeconds += secondsBetween(p.launchedAt, SteadyClock::now());
    }
  }

  // A unit's full flat gradient (P',) from its backward: accumulate it inside
  // noSync, otherwise (plus what noSync accumulated) reduce-scatter it.
  // In a synced step the unit's first needed - 1 gradients (setGradientArrivals)
  // accumulate the same way, and the last one launches the reduce-scatter of the sum.
  void reduceUnitGradient(size_t index, at::Tensor flat) {
    std::lock_guard<std::mutex> lock(mutex);
    Unit& unit = units[index];
    if (noSyncDepth > 0 || ++unit.arrived < unit.needed) {
      if (unit.accumulated.defined()) {
        unit.accumulated.add_(flat);
      } else {
        unit.accumulated = std::move(flat);
      }
      return;
    }
    launchReduce(index, std::move(flat));
  }

  // Reduce-scatters flat plus what the unit accumulated. Caller holds the mutex.
  void launchReduce(size_t index, at::Tensor flat) {
    Unit& unit = units[index];
    unit.arrived = 0;
    if (unit.accumulated.defined()) {
      flat.add_(unit.accumulated);
      unit.accumulated = at::Tensor();
    }
    PendingReduce p;
    p.unit = index;
    p.input = std::move(flat);
    p.output = at::empty({unit.shardNumel}, at::kFloat);
    p.launchedAt = SteadyClock::now();
    p.work = unit.shardComm->reduceScatterAsync(p.input, p.output, comm::ReduceOp::kAvg);
    countBytes(unit.shardComm, unit.paddedNumel * static_cast<int64_t>(sizeof(float)));
    pending.push_back(std::move(p));
    pollCompletions();
  }

  // The WeightGradStore the unit's deferred layers queue their dW in, or null
  // when none is deferred. Local.
  static std::shared_ptr<models::WeightGradStore> deferredStore(const Unit& unit) {
    std::shared_ptr<models::WeightGradStore> store;
    for (torch::nn::Module* layer : unit.gemmLayers) {
      const models::LayerOptions* options = nullptr;
      if (auto* linear = dynamic_cast<models::LinearImpl*>(layer)) options = &linear->options();
      if (auto* embedding = dynamic_cast<models::EmbeddingImpl*>(layer)) options = &embedding->options();
      if (options == nullptr || options->weight_grad != models::WeightGrad::kDeferred) continue;
      TESSERA_CHECK_ARG(!store || store == options->weight_grad_store,
                        "FSDP unit '" << unit.name << "' has layers deferring their weight gradients into two "
                                      << "different stores; use one WeightGradStore per pipeline stage");
      store = options->weight_grad_store;
    }
    return store;
  }

  // A unit's post-backward: its gradient from B (`grads`, per parameter,
  // undefined where B produced none) plus what the deferred weight-gradient
  // deliveries accumulated in the parameters' .grad, flattened and handed to
  // reduceUnitGradient. `held`: the unit was kept gathered for W; free it
  // after the last such post-backward.
  void postBackward(size_t index, const std::vector<at::Tensor>& grads, bool held) {
    Unit& unit = units[index];
    at::Tensor flat = at::zeros({unit.paddedNumel}, at::kFloat);  // (P',), padding stays 0
    {
      at::NoGradGuard noGrad;
      for (size_t i = 0; i < unit.params.size(); ++i) {
        at::Tensor slot = flat.narrow(0, unit.offsets[i], c10::multiply_integers(unit.shapes[i]));
        if (grads[i].defined()) slot.copy_(grads[i].reshape({-1}));
        at::Tensor& delivered = unit.params[i].mutable_grad();  // W's dW (AccumulateGrad), else undefined
        if (delivered.defined()) slot.add_(delivered.reshape({-1}));
        delivered = at::Tensor();
      }
    }
    if (held && --unit.holds == 0) release(unit);
    reduceUnitGradient(index, std::move(flat));
  }

  // The root's full gradients (accumulated in .grad by autograd) go the same
  // way as a unit's; then its full parameters are freed.
  void reduceRootGradient() {
    Unit& r = root();
    at::Tensor flat = at::zeros({r.paddedNumel}, at::kFloat);
    {
      at::NoGradGuard noGrad;
      for (size_t i = 0; i < r.params.size(); ++i) {
        at::Tensor& grad = r.params[i].mutable_grad();
        if (grad.defined()) flat.narrow(0, r.offsets[i], grad.numel()).copy_(grad.reshape({-1}));
        grad = at::Tensor();
      }
    }
    reduceUnitGradient(units.size() - 1, std::move(flat));
    release(r);
  }
};

namespace {

// Collective: the unit is gathered while this object lives and freed after,
// also when the unit's forward throws -- unless a backward of the unit awaits
// its deferred weight gradients (holds > 0): then it is already gathered (the
// parameters do not change within a step, so the gather is skipped on every
// rank alike) and stays gathered for them.
class GatheredUnit {
 public:
  GatheredUnit(FullyShardedDataParallel::State& state, Unit& unit) : unit_(unit) {
    if (!unit.full.defined()) state.gather(unit);
  }
  ~GatheredUnit() {
    if (unit_.holds == 0) FullyShardedDataParallel::State::release(unit_);
  }
  GatheredUnit(const GatheredUnit&) = delete;
  GatheredUnit& operator=(const GatheredUnit&) = delete;

 private:
  Unit& unit_;
};

// gather -> run under no-grad -> free in forward; gather -> recompute with
// grad -> backpropagate -> free -> reduce-scatter in backward. Outputs are
// {x} or {x, aux}, as the unit returns; backward receives a gradient for each
// (zeros for an output the loss did not use) and backpropagates both through
// one recomputation. The shard is an input only so that autograd calls
// backward even when x needs no gradient (the first unit); its gradient
// reaches .grad through finishGradientSync(), not through autograd, so
// backward returns none for it.
struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  using State = FullyShardedDataParallel::State;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& shard, State* state, int64_t index) {
    (void)shard;
    Unit& unit = state->units[static_cast<size_t>(index)];
    FsdpUnitOutput out;
    {
      const GatheredUnit gathered(*state, unit);
      out = unit.forward(x);
    }
    TESSERA_CHECK_ARG(out.x.defined(), "FSDP unit '" << unit.name << "' returned an undefined activation");
    ctx->save_for_backward({x});
    // The State outlives every backward (documented in fsdp.h); IValue holds no raw pointers.
    ctx->saved_data["state"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(state));
    ctx->saved_data["index"] = index;
    ctx->saved_data["hasAux"] = out.aux.defined();
    if (out.aux.defined()) return {out.x, out.aux};
    return {out.x};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list gradOutputs) {
    auto* state = reinterpret_cast<State*>(static_cast<intptr_t>(ctx->saved_data["state"].toInt()));
    const auto index = static_cast<size_t>(ctx->saved_data["index"].toInt());
    const bool hasAux = ctx->saved_data["hasAux"].toBool();
    Unit& unit = state->units[index];
    const at::Tensor x = ctx->get_saved_variables()[0];
    const bool needsX = ctx->needs_input_grad(0);

    std::vector<at::Tensor> inputs = unit.params;
    at::Tensor xd = x.detach().requires_grad_(needsX);
    if (needsX) inputs.push_back(xd);
    torch::autograd::variable_list grads(inputs.size());
    // Split backward: the unit's deferred layers queue their dW closures in
    // `store` during the recomputation's backward below; the post-backward
    // queues behind them, and the unit stays gathered until it has run.
    const std::shared_ptr<models::WeightGradStore> store = State::deferredStore(unit);
    {
      const GatheredUnit gathered(*state, unit);
      at::AutoGradMode enable(true);
      // Recomputation: the same parameters, input and random key as the
      // forward, so the same activations, dropout masks and MoE routing.
      const FsdpUnitOutput out = unit.forward(xd);
      TESSERA_CHECK(out.aux.defined() == hasAux,
                    "FSDP unit '" << unit.name << "' returned "
                                  << (hasAux ? "an aux loss in forward but none in its recomputation"
                                             : "no aux loss in forward but one in its recomputation")
                                  << "; a unit's forward must be deterministic given x, its parameters and the "
                                     "random key");
      std::vector<at::Tensor> outputs, outputGrads;
      if (out.x.requires_grad()) {
        outputs.push_back(out.x);
        outputGrads.push_back(gradOutputs[0]);
      }
      if (hasAux && out.aux.requires_grad()) {
        outputs.push_back(out.aux);
        outputGrads.push_back(gradOutputs[1]);
      }
      if (!outputs.empty()) {
        grads = torch::autograd::grad(outputs, inputs, outputGrads, /*retain_graph=*/false,
                                      /*create_graph=*/false, /*allow_unused=*/true);
      }
      if (store) ++unit.holds;  // before `gathered` would free the unit
    }

    const at::Tensor gradX = needsX ? grads.back() : at::Tensor();
    std::vector<at::Tensor> paramGrads(grads.begin(), grads.begin() + static_cast<std::ptrdiff_t>(unit.params.size()));
    if (store) {
      // FIFO within the key: runs after this unit's dW closures of this backward.
      store->defer([state, index, paramGrads = std::move(paramGrads)]() {
        state->postBackward(index, paramGrads, /*held=*/true);
      });
    } else {
      state->postBackward(index, paramGrads, /*held=*/false);
    }
    return {gradX, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Collective: `tensor` takes the value of rank 0 of the whole data-parallel
// group (replicate first, then shard: see the constructor).
void broadcastFromFirstReplica(at::Tensor tensor, const comm::CommPtr& shardComm,
                               const comm::CommPtr& replicateComm) {
  if (replicateComm) replicateComm->broadcast(tensor, /*root=*/0);
  shardComm->broadcast(tensor, /*root=*/0);
}

// One unit per block; an MoE block's aux loss is the unit's aux. Dropout is
// safe: the masks are a function of the GPT's random key, which the
// recomputation sees unchanged (fsdp.h).
std::vector<FsdpUnitSpec> gptUnits(models::GptImpl& gpt) {
  std::vector<FsdpUnitSpec> units;
  for (size_t i = 0; i < gpt.blocks->size(); ++i) {  // the held blocks (a pipeline part: some), by global index
    models::BlockImpl* block = &gpt.blocks->at(i);
    FsdpUnitSpec unit;
    unit.prefix = "blocks." + std::to_string(gpt.blocks->globalIndex(i));
    unit.forward = [block](const at::Tensor& x) {
      models::BlockOutput out = block->forwardWithAux(x);
      return FsdpUnitOutput(std::move(out.x), std::move(out.aux));
    };
    units.push_back(std::move(unit));
  }
  return units;
}

}  // namespace

FullyShardedDataParallel::FullyShardedDataParallel(torch::nn::Module& module, std::vector<FsdpUnitSpec> specs,
                                                   comm::CommPtr shardComm, comm::CommPtr replicateComm)
    : state_(std::make_shared<State>()) {
  TESSERA_CHECK_ARG(shardComm != nullptr, "FSDP needs a dp_shard communicator, got nullptr");
  State& s = *state_;
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
  // The units' GEMM layers, whose mode (deferred or not) is read at each backward.
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    torch::nn::Module* layer = item.value().get();
    if (dynamic_cast<models::LinearImpl*>(layer) == nullptr && dynamic_cast<models::EmbeddingImpl*>(layer) == nullptr) {
      continue;
    }
    for (Unit& unit : s.units) {
      if (hasPrefix(item.key(), unit.name)) unit.gemmLayers.push_back(layer);
    }
  }
  s.hasRoot = !root.params.empty();
  if (s.hasRoot) s.units.push_back(std::move(root));

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
                                                   comm::CommPtr replicateComm)
    : FullyShardedDataParallel(gpt, gptUnits(gpt), std::move(shardComm), std::move(replicateComm)) {
  gpt_ = &gpt;
  // The runner gets the GLOBAL block index; units are the held blocks in order (gptUnits).
  gpt.setBlockRunner([this, &gpt](int64_t index, const at::Tensor& x) {
    FsdpUnitOutput out = forwardUnitWithAux(gpt.blocks->positionOf(index), x);
    return models::BlockOutput{std::move(out.x), std::move(out.aux)};
  });
}

FullyShardedDataParallel::~FullyShardedDataParallel() {
  if (gpt_ != nullptr) gpt_->setBlockRunner(nullptr);
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
  const auto outputs = UnitFunction::apply(x, unit.shard, state_.get(), static_cast<int64_t>(index));
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
    if (!p.done) {
      p.work->wait();
      p.done = true;
      s.stats.commSeconds += secondsBetween(p.launchedAt, SteadyClock::now());
    }
    s.countExposed(s.units[p.unit].shardComm, waiting.seconds());
  }
  // Hybrid: every replica now holds the same shard slot's average over its
  // own dp_shard group; averaging those over dp_replicate averages over all.
  const Stopwatch replicating;
  std::vector<std::pair<comm::WorkPtr, comm::CommPtr>> works;
  for (PendingReduce& p : s.pending) {
    const comm::CommPtr& replicate = s.units[p.unit].replicateComm;
    if (!replicate) continue;
    const Stopwatch launching;
    works.emplace_back(replicate->allReduceAsync(p.output, comm::ReduceOp::kAvg), replicate);
    s.countBytes(replicate, p.output.numel() * static_cast<int64_t>(sizeof(float)));
    s.countExposed(replicate, launching.seconds());
  }
  for (auto& [work, replicate] : works) {
    const Stopwatch waiting;
    work->wait();
    s.countExposed(replicate, waiting.seconds());
  }
  if (!works.empty()) s.stats.commSeconds += replicating.seconds();
  at::NoGradGuard noGrad;
  for (PendingReduce& p : s.pending) {
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
