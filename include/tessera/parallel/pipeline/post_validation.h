// Optimizer post-validation (Zero Bubble, arXiv 2401.10241 §4): the global
// gradient norm of a pipeline is a sum over its stages, and waiting for it
// before the optimizer step would synchronize the stages at every step. The
// Trainer instead starts the cross-stage reduction (CrossStageNorm::start),
// steps optimistically with the unclipped gradients while it is in flight, and
// rolls the step back exactly when the finished norm says the step had to be
// clipped or skipped (train/trainer.h describes the rollback).
//
// Why an all-gather of one double per stage, and not the paper's chain of
// sends along the stages (stage s adds its value to s-1's partial sum and
// passes it on; the last stage sends the total back):
//  - every stage must decide clip/skip from the SAME bits, or the stages'
//    updates would differ from the synchronous version. With the all-gather
//    each rank sums the p values itself in stage order 0..p-1, so the bits are
//    the same on every rank whatever reduction order the backend uses (an
//    all-reduce promises no such thing on every backend);
//  - start() is one asynchronous collective: it never blocks on other stages,
//    whereas a chain link must wait for its predecessor before it can forward
//    (so it would need a helper thread to stay non-blocking);
//  - one collective's latency instead of 2(p-1) dependent hops.
// Like the chain, it overlaps the optimistic step: finish() waits only for the
// slowest stage's start(), which is what the chain waits for as well.
//
// Not here: the rollback itself (the Trainer snapshots what the optimizer step
// changes), the stage's own norm (DataParallel::gradNorm over dp/tp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "tessera/comm/communicator.h"

namespace tessera::parallel::pipeline {

// Reduces a stage's squared gradient norm over the pipeline's stages.
// Collective over `pp` (every stage calls start then finish once per step, in
// step order). start() must not block on other stages. Not thread-safe: one
// thread (the training loop) drives it.
class CrossStageNorm {
 public:
  virtual ~CrossStageNorm() = default;
  // Contributes this stage's squared norm (any value: NaN/Inf are carried).
  // Throws InvalidArgument if the previous start() was not finished.
  virtual void start(double stageSquaredNorm) = 0;
  // Blocks until every stage has started: the sum over stages of their squared
  // norms, added in stage order (NaN/Inf propagate), the same bits on every
  // stage. Throws TimeoutError naming the stages (pp ranks) that did not
  // arrive within the communicator's timeout, CommError if the group broke,
  // InvalidArgument without a pending start().
  virtual double finish() = 0;
};

// One all-gather of a double per stage over `pp` (see the header comment for
// why not the paper's chain). `pp` ranks are the stages; a group of one is
// the whole model (finish() returns the value given to start()). Not
// collective itself; the object holds a reference to `pp`.
std::unique_ptr<CrossStageNorm> makeCrossStageNorm(comm::CommPtr pp);

}  // namespace tessera::parallel::pipeline
