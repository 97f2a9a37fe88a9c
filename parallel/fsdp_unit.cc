// FSDP's unit machinery: gathering and freeing a unit, the gather/run/free
// autograd function with recomputation in backward, and the per-unit
// gradient pipeline (post-backward, accumulation, async reduce-scatter). The
// layout, construction and public methods are fsdp.cc; the state both share
// is fsdp_internal.h.
//
// How a module parameter points at gathered storage: Tensor::set_data (C++'s
// `param.data = ...`) swaps the parameter's storage and shape while keeping
// its autograd identity (leaf, requires_grad, .grad). Gathering a unit makes
// each parameter a view into the unit's full flat buffer; freeing it swaps
// in an empty (0) tensor, so the flat buffer dies once nothing else refers to
// it. The forward runs under no-grad, so nothing saves those views; the
// backward's recomputed graph saves them, and torch::autograd::grad releases
// that graph before the unit is freed again.
//
// Nested units (an MoE block's experts inside the block, fsdp.h): the inner
// unit's forward is called from the outer unit's forward. In the outer
// unit's no-grad forward the inner one only gathers, runs and frees; in the
// outer unit's recomputation (grad mode on, inside its backward) the inner
// one goes through UnitFunction like any unit, so the outer unit's
// torch::autograd::grad call runs the inner UnitFunction's backward
// (re-entrantly, on the same thread): the inner unit is gathered again,
// recomputed, backpropagated and reduce-scattered over its own comm before
// the outer unit's own post-backward. The order of collectives is the same
// on every rank because every rank runs the same units in the same order.
#include "parallel/fsdp_internal.h"

#include <torch/autograd.h>

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include "tessera/core/error.h"
#include "tessera/core/models/embedding.h"
#include "tessera/core/models/linear.h"

namespace tessera::parallel {

namespace fsdp_internal {

bool hasPrefix(const std::string& name, const std::string& prefix) {
  return name == prefix || (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
                            name[prefix.size()] == '.');
}

double secondsBetween(SteadyClock::time_point from, SteadyClock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace fsdp_internal

using fsdp_internal::GatheredUnit;
using fsdp_internal::PendingReduce;
using fsdp_internal::secondsBetween;
using fsdp_internal::Unit;

// Caller holds the mutex. Every exposed second and byte is counted through
// these, so the per-comm maps sum to the totals.
void FullyShardedDataParallel::State::countExposed(const comm::CommPtr& comm, double seconds) {
  stats.exposedSeconds += seconds;
  stats.exposedSecondsByComm[comm->name()] += seconds;
}
void FullyShardedDataParallel::State::countBytes(const comm::CommPtr& comm, int64_t bytes) {
  stats.bytes += bytes;
  stats.bytesByComm[comm->name()] += bytes;
}

// Makes the unit's parameters views of `full` (P',).
void FullyShardedDataParallel::State::bind(Unit& unit, at::Tensor full) {
  at::NoGradGuard noGrad;
  for (size_t i = 0; i < unit.params.size(); ++i) {
    const int64_t n = c10::multiply_integers(unit.shapes[i]);
    unit.params[i].set_data(full.narrow(0, unit.offsets[i], n).view(unit.shapes[i]));
  }
  unit.full = std::move(full);
}

void FullyShardedDataParallel::State::release(Unit& unit) {
  at::NoGradGuard noGrad;
  for (at::Tensor& param : unit.params) param.set_data(at::empty({0}, at::kFloat));
  unit.full = at::Tensor();
}

// Collective over the unit's shard comm: all-gather its shards into its parameters.
void FullyShardedDataParallel::State::gather(Unit& unit) {
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
void FullyShardedDataParallel::State::pollCompletions() {
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
void FullyShardedDataParallel::State::reduceUnitGradient(size_t index, at::Tensor flat) {
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
void FullyShardedDataParallel::State::launchReduce(size_t index, at::Tensor flat) {
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
  // fp32: exactly reduceScatterAsync(input, output, kAvg). fp8 runs here, on
  // this thread, before the next unit's all-gather (fsdp.h: its own
  // collectives must keep their order on the shard comm).
  const Stopwatch launching;
  comm::Fp8CommStats fp8;  // fp8: done with when the call returns
  p.work = reduceScatterGradientAsync(unit.shardComm, p.input, p.output, gradComm, unit.shardScaler.get(), &fp8);
  if (gradComm == GradientComm::kFp8) {
    countExposed(unit.shardComm, launching.seconds());  // it blocked backward
    fp8Step.count(fp8);
  }
  countBytes(unit.shardComm, unit.paddedNumel * gradientWireBytes(gradComm));
  pending.push_back(std::move(p));
  pollCompletions();
}

// The WeightGradStore the unit's deferred layers queue their dW in, or null
// when none is deferred. Local.
std::shared_ptr<models::WeightGradStore> FullyShardedDataParallel::State::deferredStore(const Unit& unit) {
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
void FullyShardedDataParallel::State::postBackward(size_t index, const std::vector<at::Tensor>& grads, bool held) {
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
void FullyShardedDataParallel::State::reduceRootGradient() {
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

namespace {

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

}  // namespace

std::vector<at::Tensor> FullyShardedDataParallel::State::runWithRecomputation(size_t index, const at::Tensor& x) {
  return UnitFunction::apply(x, units[index].shard, this, static_cast<int64_t>(index));
}

}  // namespace tessera::parallel
