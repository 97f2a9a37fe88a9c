// The deferred weight gradient (issue 16's B/W split): a GEMM whose backward
// computes the input and bias gradients (B) and queues dW = dY^T X in a
// WeightGradStore, to be computed and delivered when the pipeline's W action
// drains the store.
//
// Why a hand-written autograd Node rather than torch::autograd::Function: the
// weight must NOT be an input edge of the B node. An edge would make B's
// backward schedule the weight's AccumulateGrad with an undefined gradient,
// which still runs the tensor hooks registered on the weight (DDP's), with an
// undefined tensor -- DDP would count the parameter as arrived in B. A Node
// lets B have edges for x and the bias only, keep the weight's gradient edge
// aside, and exist even when x and the bias need no gradient (the first
// layer: only the weight does), which a Function<T> cannot (it builds a node
// only when one of its tensor inputs requires grad).
//
// Delivery: the W closure runs autograd's engine from the weight's gradient
// edge (its AccumulateGrad for a leaf; the producer for a weight that went
// through copyToShards or an fp32 cast), exactly the graph an ordinary
// backward would have run from this GEMM: hooks fire, AccumulateGrad adds into
// .grad, copyToShards all-reduces. One delivery is one backward pass over the
// weight (one DDP hook firing).
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/ATen.h>

#include <memory>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/models/linear.h"

namespace tessera::models {
namespace {

using torch::autograd::Edge;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// (..., k) -> (rows, k)
at::Tensor rows(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The W pass of one GEMM: dW = dY^T X (leading dims flattened, computed in the
// operands' dtype as autograd's linear backward does), delivered through
// autograd from the weight's gradient edge.
void deliverWeightGradient(const at::Tensor& x, const at::Tensor& dy, const Edge& weightEdge) {
  at::Tensor dw;
  {
    at::NoGradGuard noGrad;
    dw = rows(dy).t().mm(rows(x));  // (out, in)
  }
  torch::autograd::Engine::get_default_engine().execute({weightEdge}, {dw}, /*keep_graph=*/false,
                                                         /*create_graph=*/false, /*accumulate_grad=*/true);
}

struct DeferredLinearBackward final : torch::autograd::Node {
  // next edges: 0 = x, 1 = bias (when the GEMM has one)
  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;  // the output did not reach the loss: nothing to compute or defer
    TESSERA_CHECK(!released_, "a deferred Linear's backward ran twice on a released graph; pass retain_graph");
    const at::Tensor x = x_.unpack();
    if (task_should_compute_output(0)) out[0] = dy.matmul(weight_.unpack());  // (..., in)
    if (hasBias_ && task_should_compute_output(1)) out[1] = rows(dy).sum(0);   // (out,)
    if (weightEdge_.is_valid()) {
      // The closure owns X and dY (detached: no graph kept alive through them)
      // and the weight's gradient edge, not a copy of W.
      store_->defer([x = x.detach(), dy = dy.detach(), edge = weightEdge_]() { deliverWeightGradient(x, dy, edge); });
    }
    return out;
  }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    released_ = true;
  }

  SavedVariable x_;       // (..., in): B does not need it, W does
  SavedVariable weight_;  // (out, in), detached: grad_input's operand; released after B
  bool hasBias_ = false;
  bool released_ = false;
  Edge weightEdge_;       // invalid when the weight needs no gradient
  std::shared_ptr<WeightGradStore> store_;
};

}  // namespace

at::Tensor deferredLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          std::shared_ptr<WeightGradStore> store) {
  TESSERA_CHECK_ARG(store != nullptr, "deferredLinear needs the WeightGradStore that runs its weight gradient");
  at::Tensor y;
  {
    at::NoGradGuard noGrad;
    // at::linear's arithmetic (addmm with a bias, mm without) on the flattened
    // input; _unsafe_view so the output is not a view that autograd would
    // refuse to modify in place.
    const at::Tensor flat = bias.defined() ? at::addmm(bias, rows(x), weight.t()) : rows(x).mm(weight.t());
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    y = at::_unsafe_view(flat, shape);  // (..., out)
  }
  const bool weightNeedsGrad = weight.requires_grad();
  if (!torch::autograd::compute_requires_grad(x, bias, weight)) return y;

  auto node = std::shared_ptr<DeferredLinearBackward>(new DeferredLinearBackward(), torch::autograd::deleteNode);
  node->set_next_edges(bias.defined() ? torch::autograd::collect_next_edges(x, bias)
                                      : torch::autograd::collect_next_edges(x));
  node->x_ = SavedVariable(x, /*is_output=*/false);
  node->weight_ = SavedVariable(weight.detach(), /*is_output=*/false);
  node->hasBias_ = bias.defined();
  if (weightNeedsGrad) node->weightEdge_ = torch::autograd::impl::gradient_edge(weight);
  node->store_ = std::move(store);
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace tessera::models
