// The whole training state -- model parameters, optimizer state, trainer
// position -- gathered into a StateDict (core/state.h) and restored from one.
// Checkpoints write what collectTrainingState() returns; a checkpoint or a
// peer's state (live recovery) is read back through trainingStateRequests()
// and restoreTrainingState(). Because every rank describes its own part from
// its own DataParallel layout, a state saved on one world size or strategy
// loads into another (resharding): FSDP on 4 ranks -> FSDP on 2 -> DDP -> none.
//
// Names (all tensors carry their global shape):
//   model/<param>                 trainable parameters, float32, by the module's
//                                 name (the first name of a tied tensor); the
//                                 logical (unsplit, unpadded) tensor, of which a
//                                 rank holds its layout's pieces: under tensor
//                                 parallelism a slice, and for qkv three pieces
//                                 (one row block of each of q, k, v)
//   optim/<kind>/<param>          per-parameter optimizer state (kind may hold
//                                 '/': "optim/diloco/outer/<param>"), sharded
//                                 like the parameter
//   optim/scalars                 the optimizer's scalars as text lines
//                                 "key=value" (uint8): a tensor, not meta,
//                                 because it is per replica (below)
//   trainer/rng                   every rank's torch CPU generator state (uint8):
//                                 [world size, state bytes], rank r holding the box
//                                 row r (format-1 checkpoints: [state bytes], rank 0's)
//   trainer/rank-<r>/fp8_scaling  rank r's FP8 delayed-scaling state (amax histories and
//                                 scales of its FP8 Linears, models::fp8ScalingState), float32
//   trainer/rank-<r>/optim_aux/<kind>/<i>
//                                 rank r's optimizer tensors that are not shaped like
//                                 their parameter (OptimizerState::perParameterAux: the
//                                 scale of an FP8 moment), whole, any dtype
// Meta: trainer/step, trainer/tokens, trainer/sampler/<epoch|offset|seed|
// num_examples>, optim/name, optim/kinds (comma-separated), replicas, and
// whatever the caller adds (config text, mesh).
//
// Replicas. DiLoCo, DeMo and MT-DAO leave replicas with different parameters
// between syncs. When ReplicaInfo::count > 1, every model/ and optim/ name
// (optim/scalars included) is prefixed "replica-<k>/" with this rank's
// replica index k, and meta "replicas" records the count. A run restoring
// from such a state takes replica k from the saved replica k % saved count
// (a run with more replicas repeats the saved ones; one with fewer drops the
// rest); a state saved with one replica (no prefix) feeds every replica.
//
// Randomness. Each rank restores its own row of trainer/rng when resuming at
// the same world size; at another world size ranks whose row exists restore
// it and the others keep the generator as seeded (logged). From a peer's
// in-memory state (live recovery) a rank takes the row that state holds: the
// joiner continues its source's stream. A format-1 checkpoint's single state
// goes to every rank (as it did then).
//
// Per-rank state (trainer/rank-<r>/...). A rank restores its own rank's
// tensors; from one peer's state (live recovery) the joiner takes that
// peer's, as with the generator. At another world size a rank without its own
// entry starts its FP8 histories afresh, and an optimizer whose aux state is
// missing says so (an FP8 moment's codes cannot be decoded without their
// scale): FP8 optimizer states resume bit for bit on the same mesh only.
//
// Optimizer tensors not created yet (Optimizer::state() gives undefined
// tensors, e.g. SGD without momentum) are not saved; restoring leaves them
// undefined. An optimizer tensor whose parameters are only partly covered by
// the saved state (possible only after resharding a state in which some
// parameters never had a gradient) gets zeros for the uncovered parts.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/state.h"

namespace torch::nn {
class Module;
}
namespace tessera {
class Trainer;
}
namespace tessera::optim {
class Optimizer;
}
namespace tessera::parallel {
class DataParallel;
}

namespace tessera::checkpoint {

// Which replica this rank belongs to when replicas differ (see the file comment).
struct ReplicaInfo {
  int index = 0;  // this rank's replica, in [0, count)
  int count = 1;  // replicas whose parameters differ between syncs; 1: all identical
};

// "" for count == 1, else "replica-<index>/". Throws InvalidArgument for an
// index outside [0, count).
std::string replicaPrefix(const ReplicaInfo& replica);
// The number of replicas a state was saved with (meta "replicas"; 1 when
// absent). Throws InvalidArgument when the entry is not a count >= 1.
int savedReplicas(const std::map<std::string, std::string>& meta);

// The pieces of one rank's training run. None owned; all must outlive the call.
struct TrainingParts {
  Trainer* trainer = nullptr;
  // Only restoring uses it: the names of its trainable parameters are what a
  // state must hold under model/ (FSDP ranks see only their own pieces). May
  // be null: then only the names in this rank's layout are checked.
  torch::nn::Module* model = nullptr;
  // Set on a pipeline stage (a part of the model, models::GptPart): every
  // parameter name of the WHOLE model with its logical shape
  // (models::gptParameterShapes). Restoring then counts as unexpected only
  // the source's model/ names the whole model lacks (the other stages'
  // parameters are expected, and checked for their shapes), while this
  // rank's own parameters must still all be there; it requests only what it
  // holds. So a checkpoint of any pipeline layout -- or of the whole model --
  // restores into any other. Saving needs nothing: a stage saves its
  // parameters under the whole model's names, and the tied copy of wte on
  // the last stage saves as "wte.weight" like the first stage's (the same
  // values; identical slices are written once, by the lowest rank, and
  // overlapping ones -- FSDP ranges of two different flat layouts -- are
  // stored both and read back as one tensor). Not owned; may be null.
  const std::map<std::string, std::vector<int64_t>>* wholeModel = nullptr;
  parallel::DataParallel* dp = nullptr;
  optim::Optimizer* optimizer = nullptr;  // the one the Trainer steps
  ReplicaInfo replica;
  // This process's rank in the job and the job's size: the row of
  // trainer/rng it saves and restores. Defaults (0 of 1) save one row, which
  // the checkpoint keeps from the lowest rank (format 1's behaviour).
  int rank = 0;
  int worldSize = 1;
};

// Local (not collective). This rank's part of the training state, with
// `extraMeta` added to the meta. A model or optimizer tensor is marked
// replicated only when the strategy does not shard (none, DDP) and this rank
// holds it whole; tensor-parallel shards are pieces even under DDP. The
// model pieces alias the live parameters (FSDP: views of the shards); the
// optimizer state is a copy (Trainer::snapshot). Checkpointer::save copies
// what it gets; anyone else keeping the result across a training step must
// clone() it. Call between steps (e.g. in an afterStep callback). Throws InvalidArgument for a missing
// part, NotSupported when the strategy has no parameter layout.
StateDict collectTrainingState(const TrainingParts& parts, const std::map<std::string, std::string>& extraMeta = {});

// What a source of training state holds: tensor names with their global
// shapes, dtypes and the slices held, and its meta. From a checkpoint's index
// (the whole job's pieces) or an in-memory StateDict (one process's state, as
// live recovery sends it: onePeer). of(CheckpointIndex) throws InvalidArgument
// for a dtype name it does not know.
struct StateSummary {
  struct Tensor {
    std::vector<int64_t> shape;
    at::ScalarType dtype = at::kFloat;
    std::vector<TensorSlice> held;  // the slices the source holds
  };
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> meta;
  bool onePeer = false;  // one process's state: per-rank tensors (trainer/rng) hold only its row

  static StateSummary of(const CheckpointIndex& index);
  static StateSummary of(const StateDict& state);
};

// Local. The slices this rank must read from `source` to restore its
// part: its layout's slices of every model/ parameter and of every optimizer
// state kind the source holds for them, optim/scalars and its trainer/rng row
// (see "Randomness"; a missing row is logged here).
// Checks first and throws one InvalidArgument listing every problem: model
// parameters missing from the source, source parameters the model does not
// have (unexpected), shape mismatches ("is this a checkpoint of another
// model?"); an optimizer state kind this run's optimizer needs that the
// source lacks (naming the kind and both optimizers); missing trainer meta.
std::vector<LoadRequest> trainingStateRequests(const TrainingParts& parts, const StateSummary& source);

// Local. Restores this rank's part from `loaded`, which must cover the
// slices trainingStateRequests() asked for (load()'s result, or
// extractRanges() of an in-memory state) and carry the source's meta.
// Everything is checked and staged in fresh tensors first, then the Trainer
// (sampler, optimizer, rng, step) is restored, then the parameters are
// copied in: a failure leaves the run as it was. Throws InvalidArgument
// naming the tensor or key.
void restoreTrainingState(const TrainingParts& parts, const StateDict& loaded);

// Local: resolveCheckpoint + readIndex + trainingStateRequests + load +
// restoreTrainingState. Returns the restored step. Throws CheckpointError
// (unreadable or corrupt files) or InvalidArgument (a state that does not fit
// this run).
int64_t restoreTrainingStateFromCheckpoint(const TrainingParts& parts, const std::string& path);

// Local: the in-memory counterpart of load(): each request's slice, assembled
// from whichever pieces of `source` intersect it, as a one-piece tensor
// (fresh, not aliasing `source`, shaped slice.localShape()); meta copied.
// Throws InvalidArgument naming a missing tensor, a shape or dtype mismatch,
// or an element `source` does not hold.
StateDict extractRanges(const StateDict& source, const std::vector<LoadRequest>& requests);

}  // namespace tessera::checkpoint
