// The vocabulary-parallel cross-entropy as one custom autograd Function: the
// forward's two all-reduces through the ShardGroup, the backward from the
// saved local softmax alone. Memory per rank: the (N, V_r) softmax, as
// Megatron-LM's _VocabParallelCrossEntropy keeps.
#include "tessera/core/models/vocab_parallel_loss.h"

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include "tessera/core/error.h"

namespace tessera::models {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void checkArguments(const at::Tensor& logits, const at::Tensor& targets, int64_t vocabBegin) {
  TESSERA_CHECK_ARG(logits.defined() && logits.dim() == 2,
                    "vocabParallelCrossEntropy: logits must be (N, V_r), got "
                        << (logits.defined() ? logits.sizes() : at::IntArrayRef{}) << "; flatten (B, T, V_r) first");
  TESSERA_CHECK_ARG(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                    "vocabParallelCrossEntropy: logits must be float32 or float64, got "
                        << logits.scalar_type() << "; cast them up first");
  TESSERA_CHECK_ARG(logits.size(1) >= 1,
                    "vocabParallelCrossEntropy: logits hold no vocabulary column on this rank (V_r = 0); "
                    "split the vocabulary so that every rank holds at least one column");
  TESSERA_CHECK_ARG(targets.defined() && targets.dim() == 1 && targets.size(0) == logits.size(0),
                    "vocabParallelCrossEntropy: targets must be (N) = (" << logits.size(0) << "), got "
                        << (targets.defined() ? targets.sizes() : at::IntArrayRef{}));
  TESSERA_CHECK_ARG(targets.scalar_type() == at::kLong,
                    "vocabParallelCrossEntropy: targets must be int64, got " << targets.scalar_type());
  TESSERA_CHECK_ARG(targets.device() == logits.device(),
                    "vocabParallelCrossEntropy: targets are on " << targets.device() << ", logits on "
                                                                 << logits.device() << "; move them together");
  TESSERA_CHECK_ARG(vocabBegin >= 0, "vocabParallelCrossEntropy: vocabBegin must be >= 0, got " << vocabBegin);
}

// Every token's target must be owned by exactly one rank; `owners` is the
// all-reduced count (N). The same on every rank, so every rank throws alike.
void checkOwners(const at::Tensor& owners, const at::Tensor& targets, const ShardGroup& group) {
  const at::Tensor bad = owners.ne(1);
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TESSERA_CHECK_ARG(false, "vocabParallelCrossEntropy on group '"
                               << group.name() << "': targets[" << i << "] = " << targets[i].item<int64_t>()
                               << " lies in the columns of " << owners[i].item<double>()
                               << " ranks; each target must be in [0, V) and the ranks' columns "
                                  "[vocabBegin, vocabBegin + V_r) must tile [0, V) without overlap");
}

struct VocabParallelCrossEntropyFn : torch::autograd::Function<VocabParallelCrossEntropyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t vocabBegin, ShardGroup* group) {
    const int64_t n = logits.size(0);
    const int64_t columns = logits.size(1);

    // m: the global row max, so that exp never overflows on any rank.
    const at::Tensor rowMax = group->allReduceMax(std::get<0>(logits.max(1)));  // (N)
    const at::Tensor shifted = logits - rowMax.unsqueeze(1);                    // (N, V_r)
    at::Tensor expShifted = shifted.exp();                                      // (N, V_r)

    // The target's column on this rank, 0 where another rank owns it.
    const at::Tensor local = targets - vocabBegin;                             // (N)
    const at::Tensor owned = local.ge(0).logical_and(local.lt(columns));       // (N) bool
    const at::Tensor column = local.masked_fill(owned.logical_not(), 0);       // (N)
    const at::Tensor ownedValue = owned.to(logits.scalar_type());              // (N) 0 / 1

    // One sum all-reduce for S, T and the owner count: rows 0, 1, 2.
    at::Tensor sums = at::empty({3, n}, logits.options());  // (3, N)
    sums[0].copy_(expShifted.sum(1));
    sums[1].copy_(shifted.gather(1, column.unsqueeze(1)).squeeze(1).mul(ownedValue));
    sums[2].copy_(ownedValue);
    sums = group->allReduceSum(sums);
    checkOwners(sums[2], targets, *group);
    const at::Tensor sumExp = sums[0];       // (N)
    const at::Tensor targetShifted = sums[1];  // (N)

    expShifted.div_(sumExp.unsqueeze(1));  // now the local softmax (N, V_r)
    ctx->save_for_backward({expShifted, column, ownedValue});
    return sumExp.log() - targetShifted;  // (N)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& softmax = saved[0];     // (N, V_r)
    const at::Tensor& column = saved[1];      // (N)
    const at::Tensor& ownedValue = saved[2];  // (N)
    const at::Tensor gradLoss = grads[0];     // (N)
    // (softmax - onehot) * g, the one-hot only where this rank owns the target;
    // a new tensor, so the saved softmax survives a second backward.
    at::Tensor gradLogits = softmax.mul(gradLoss.unsqueeze(1));
    gradLogits.scatter_add_(1, column.unsqueeze(1), gradLoss.mul(ownedValue).neg().unsqueeze(1));
    return {gradLogits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor vocabParallelCrossEntropy(const at::Tensor& logits, const at::Tensor& targets, int64_t vocabBegin,
                                     ShardGroup& group) {
  checkArguments(logits, targets, vocabBegin);
  return VocabParallelCrossEntropyFn::apply(logits, targets, vocabBegin, &group);
}

}  // namespace tessera::models
