// Training state <-> StateDict: naming, the layout mapping (optimizer tensor
// i <-> named parameter ranges), checks that list every problem at once, and
// restoring in two phases (stage everything, then apply).
#include "tessera/checkpoint/training_state.h"

#include <torch/nn/module.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_set>

#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/train/trainer.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"

#include <string>

namespace tessera::checkpoint {
namespace {

constexpr const char* kModel = "model/";
constexpr const char* kOptim = "optim/";
constexpr const char* kScalars = "optim/scalars";
constexpr const char* kRng = "trainer/rng";
constexpr const char* kStep = "trainer/step";
constexpr const char* kTokens = "trainer/tokens";
constexpr const char* kSampler = "trainer/sampler/";
constexpr const char* kOptimName = "optim/name";
constexpr const char* kOptimKinds = "optim/kinds";
constexpr const char* kReplicas = "replicas";
// Per-rank state that is not shaped like a parameter (training_state.h):
// "trainer/rank-<r>/fp8_scaling", "trainer/rank-<r>/optim_aux/<kind>/<index>".
constexpr const char* kRankPrefix = "trainer/rank-";
constexpr const char* kFp8Scaling = "fp8_scaling";
constexpr const char* kOptimAux = "optim_aux/";

std::string rankName(int rank, const std::string& what) { return kRankPrefix + std::to_string(rank) + "/" + what; }

// The name of this rank's copy of per-rank tensor `what` among `names`: its
// own rank's, or -- from one peer's state (live recovery), which holds one
// rank's only -- that one. Empty when neither.
template <typename Map>
std::string perRankName(const Map& names, int rank, bool onePeer, const std::string& what) {
  const std::string own = rankName(rank, what);
  if (names.count(own)) return own;
  if (!onePeer) return {};
  std::string found;
  for (const auto& item : names) {
    const std::string& name = item.first;
    if (name.rfind(kRankPrefix, 0) != 0) continue;
    const size_t slash = name.find('/', std::char_traits<char>::length(kRankPrefix));
    if (slash == std::string::npos || name.compare(slash + 1, std::string::npos, what) != 0) continue;
    if (!found.empty()) return {};
    found = name;
  }
  return found;
}

void checkParts(const TrainingParts& parts, const char* what) {
  TESSERA_CHECK_ARG(parts.trainer != nullptr && parts.dp != nullptr && parts.optimizer != nullptr,
                    what << ": TrainingParts needs trainer, dp and optimizer (got "
                         << (parts.trainer ? "" : "no trainer ") << (parts.dp ? "" : "no dp ")
                         << (parts.optimizer ? "" : "no optimizer") << ")");
  TESSERA_CHECK_ARG(parts.worldSize >= 1 && parts.rank >= 0 && parts.rank < parts.worldSize,
                    what << ": TrainingParts rank " << parts.rank << " not in [0, " << parts.worldSize
                         << "): set rank and worldSize to this process's rank and the job's size");
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? separator : "") + items[i];
  return out;
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, separator)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// Text <-> uint8 tensor (optimizer scalars as "key=value" lines).
at::Tensor textTensor(const std::string& text) {
  at::Tensor out = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
  std::copy(text.begin(), text.end(), reinterpret_cast<char*>(out.data_ptr<uint8_t>()));
  return out;
}

std::string tensorText(const at::Tensor& t) {
  const at::Tensor bytes = t.to(at::kByte).contiguous().reshape({-1});
  const char* data = reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>());
  return std::string(data, data + bytes.numel());
}

// The replicas a source was saved with, and the prefix this rank reads from.
int sourceReplicas(const std::map<std::string, std::string>& meta) {
  auto it = meta.find(kReplicas);
  if (it == meta.end()) return 1;
  char* end = nullptr;
  const long value = std::strtol(it->second.c_str(), &end, 10);
  TESSERA_CHECK_ARG(end != it->second.c_str() && *end == '\0' && value >= 1,
                    "training state: meta 'replicas' must be a count >= 1, got '" << it->second << "'");
  return static_cast<int>(value);
}

std::string sourcePrefix(const ReplicaInfo& replica, const std::map<std::string, std::string>& meta) {
  const int saved = sourceReplicas(meta);
  if (saved == 1) return "";
  return replicaPrefix(ReplicaInfo{replica.index % saved, saved});
}

// The names a restore must find under model/: the module's trainable
// parameters (first name of a tied tensor, as the layouts use), or, without
// a module, those in this rank's layout.
std::vector<std::string> expectedModelNames(const TrainingParts& parts,
                                            const std::vector<std::vector<parallel::ParameterPiece>>& layout) {
  std::vector<std::string> names;
  if (parts.model != nullptr) {
    std::unordered_set<const void*> seen;
    for (const auto& item : parts.model->named_parameters(/*recurse=*/true)) {
      if (!item.value().requires_grad()) continue;
      if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;
      names.push_back(item.key());
    }
    return names;
  }
  std::set<std::string> unique;
  for (const auto& pieces : layout) {
    for (const auto& piece : pieces) unique.insert(piece.name);
  }
  return {unique.begin(), unique.end()};
}

// The optimizer tensors and their layout, checked against each other.
struct Layout {
  std::vector<at::Tensor> params;
  std::vector<std::vector<parallel::ParameterPiece>> pieces;
};

Layout layoutOf(parallel::DataParallel& dp) {
  Layout out{dp.optimizerParameters(), dp.parameterLayout()};
  TESSERA_CHECK_ARG(out.params.size() == out.pieces.size(),
                    "data-parallel strategy '" << dp.name() << "' gives " << out.params.size()
                                               << " optimizer tensors but a layout for " << out.pieces.size());
  return out;
}

// Copies the elements of `slice` of the logical tensor `name` from `source`
// into `dest` (flat, slice.numel elements, contiguous), converting the dtype.
// Throws unless source's pieces hold every element of the slice.
void readSlice(const StateDict& source, const std::string& name, const TensorSlice& slice, at::Tensor dest) {
  auto it = source.tensors.find(name);
  TESSERA_CHECK_ARG(it != source.tensors.end(), "training state: missing tensor '" << name << "'");
  const StateTensor& t = it->second;
  t.checkPieces("training state: " + name);
  std::vector<TensorSlice> held;  // which elements of `slice` were copied, in its order
  for (const StatePiece& piece : t.pieces) {
    if (!piece.slice.boxIntersects(slice) || overlapCount(piece.slice, slice) == 0) continue;
    const at::Tensor from = piece.local.reshape({-1}).contiguous();
    // copyOverlap reads and writes host memory: a device `dest` is staged on the host too.
    at::Tensor to = dest.scalar_type() == from.scalar_type() && dest.is_cpu() && from.is_cpu()
                        ? dest
                        : at::empty({slice.numel}, from.options().device(at::kCPU));
    const at::Tensor fromHost = from.cpu();
    copyOverlap(piece.slice, fromHost, slice, to);
    forEachOverlap(piece.slice, slice, [&](int64_t, int64_t at, int64_t count) {
      held.push_back(TensorSlice::box({0}, {slice.numel}).narrowFlat(at, count));
      if (!to.is_same(dest)) dest.narrow(0, at, count).copy_(to.narrow(0, at, count));
    });
  }
  const Coverage coverage = coverageOf({slice.numel}, held);
  TESSERA_CHECK_ARG(coverage.covered == slice.numel,
                    "training state: tensor '" << name << "' " << shapeText(t.globalShape) << ": slice "
                                               << slice.text() << " is not covered: element "
                                               << coverage.firstMissing << " of the slice ("
                                               << slice.numel - coverage.covered
                                               << " in all) is in no piece held");
}

at::ScalarType dtypeFromName(const std::string& tensor, const std::string& name) {
  static const std::map<std::string, at::ScalarType> kNames = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
      {"uint8", at::kByte},    {"int8", at::kChar},      {"int16", at::kShort},  {"int32", at::kInt},
      {"int64", at::kLong},    {"bool", at::kBool}};
  auto it = kNames.find(name);
  TESSERA_CHECK_ARG(it != kNames.end(),
                    "checkpoint tensor '" << tensor << "' has dtype '" << name << "', which this build does not know");
  return it->second;
}

// The request for this rank's generator state (file comment of
// training_state.h, "Randomness"); none when the source has no row for it.
std::optional<LoadRequest> rngRequest(const TrainingParts& parts, const StateSummary& source) {
  auto it = source.tensors.find(kRng);
  if (it == source.tensors.end()) return std::nullopt;
  const StateSummary::Tensor& t = it->second;
  if (t.shape.size() == 1) return LoadRequest{kRng, t.shape, t.dtype, std::nullopt};  // format 1: rank 0's, for all
  TESSERA_CHECK_ARG(t.shape.size() == 2, "training state: '" << kRng << "' has shape " << shapeText(t.shape)
                                                             << ", expected [ranks, state bytes]");
  // The rows held whole, by row.
  std::set<int64_t> rows;
  for (const TensorSlice& s : t.held) {
    if (!s.isWholeBox() || s.sizes[1] != t.shape[1]) continue;
    for (int64_t r = s.offsets[0]; r < s.offsets[0] + s.sizes[0]; ++r) rows.insert(r);
  }
  int64_t row = parts.rank;
  // A peer's state holds its own row, whichever rank it had: the joiner continues its source's stream.
  if (source.onePeer && !rows.count(row) && rows.size() == 1) row = *rows.begin();
  if (!rows.count(row)) {
    TESSERA_LOG(kInfo) << "rank " << parts.rank << ": the training state holds the generator states of "
                       << rows.size() << " rank(s) of a " << t.shape[0]
                       << "-rank job, none for this rank; its generator starts from the seed";
    return std::nullopt;
  }
  return LoadRequest{kRng, t.shape, t.dtype, TensorSlice::box({row, 0}, {1, t.shape[1]})};
}

}  // namespace

int savedReplicas(const std::map<std::string, std::string>& meta) { return sourceReplicas(meta); }

std::string replicaPrefix(const ReplicaInfo& replica) {
  TESSERA_CHECK_ARG(replica.count >= 1 && replica.index >= 0 && replica.index < replica.count,
                    "replica index " << replica.index << " not in [0, " << replica.count << ")");
  return replica.count == 1 ? std::string() : "replica-" + std::to_string(replica.index) + "/";
}

StateDict collectTrainingState(const TrainingParts& parts, const std::map<std::string, std::string>& extraMeta) {
  checkParts(parts, "collectTrainingState");
  const std::string prefix = replicaPrefix(parts.replica);
  const Layout layout = layoutOf(*parts.dp);
  const bool dpSharded = parts.dp->sharded();
  StateDict out;

  // Adds tensor i's layout ranges of `values` (shaped like params[i]) under `base` + parameter name.
  // A tensor is replicated (every rank holding it holds the same whole value)
  // only when the strategy does not shard it AND this rank's one piece is the
  // whole logical tensor: a tensor-parallel shard (qkv's three row blocks, a
  // vocabulary slice) differs between tp ranks under DDP too.
  const auto addPieces = [&](const std::string& base, size_t i, const at::Tensor& values) {
    const at::Tensor flat = values.detach().reshape({-1});
    for (const parallel::ParameterPiece& piece : layout.pieces[i]) {
      StateTensor& t = out.tensors[base + piece.name];
      const bool whole = !dpSharded && t.pieces.empty() && piece.slice.isWhole(piece.shape);
      t.globalShape = piece.shape;
      t.replicated = whole;
      const at::Tensor local = flat.narrow(0, piece.tensorOffset, piece.slice.numel).view(piece.slice.localShape());
      t.pieces.push_back(StatePiece{local, piece.slice});
    }
  };

  for (size_t i = 0; i < layout.params.size(); ++i) addPieces(prefix + kModel, i, layout.params[i]);

  const TrainingState state = parts.trainer->snapshotView();  // the checkpointer copies
  std::vector<std::string> kinds;
  for (const auto& [kind, tensors] : state.optimizer.perParameter) {
    kinds.push_back(kind);
    TESSERA_CHECK_ARG(tensors.size() == layout.params.size(),
                      "optimizer state '" << kind << "' has " << tensors.size() << " tensors for "
                                          << layout.params.size() << " parameters");
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!tensors[i].defined()) continue;  // not created yet: not saved (see the header)
      TESSERA_CHECK_ARG(tensors[i].numel() == layout.params[i].numel(),
                        "optimizer state '" << kind << "' of tensor " << i << " has " << tensors[i].numel()
                                            << " elements, the parameter " << layout.params[i].numel());
      addPieces(prefix + kOptim + kind + "/", i, tensors[i]);
    }
  }
  // Per-rank, whole: FP8 scales and amax histories (not shaped like a parameter).
  const auto putRankTensor = [&](const std::string& what, const at::Tensor& value) {
    const at::Tensor whole = value.detach().contiguous();
    const std::vector<int64_t> shape(whole.sizes().begin(), whole.sizes().end());
    out.putPiece(rankName(parts.rank, what), shape, TensorSlice::whole(shape), whole);
  };
  for (const auto& [kind, tensors] : state.optimizer.perParameterAux) {
    kinds.push_back(kind);
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].defined()) putRankTensor(kOptimAux + kind + "/" + std::to_string(i), tensors[i]);
    }
  }
  if (state.fp8Scaling.defined() && state.fp8Scaling.numel() > 0) putRankTensor(kFp8Scaling, state.fp8Scaling);
  if (!state.optimizer.scalars.empty()) {
    std::string text;
    for (const auto& [key, value] : state.optimizer.scalars) {
      TESSERA_CHECK_ARG(key.find_first_of("=\n") == std::string::npos && value.find('\n') == std::string::npos,
                        "optimizer scalar '" << key << "' cannot be saved: keys hold no '=' or newline");
      text += key + "=" + value + "\n";
    }
    out.putReplicated(prefix + kScalars, textTensor(text));
  }
  if (state.rng.defined()) {  // this rank's row of [world size, state bytes]
    const at::Tensor row = state.rng.to(at::kByte).contiguous().reshape({1, -1});
    if (parts.worldSize == 1) {
      out.putReplicated(kRng, row);
    } else {
      out.putPiece(kRng, {parts.worldSize, row.size(1)}, TensorSlice::box({parts.rank, 0}, {1, row.size(1)}), row);
    }
  }

  out.putMeta(kStep, state.step);
  out.putMeta(kTokens, state.tokens);
  for (const auto& [key, value] : state.trainSampler.toMap()) out.putMeta(kSampler + key, value);
  out.putMeta(kOptimName, parts.optimizer->name());
  out.putMeta(kOptimKinds, join(kinds, ","));
  out.putMeta(kReplicas, static_cast<int64_t>(parts.replica.count));
  out.putMeta("dp/strategy", parts.dp->name());
  for (const auto& [key, value] : extraMeta) out.meta[key] = value;
  return out;
}

StateSummary StateSummary::of(const CheckpointIndex& index) {
  StateSummary out;
  for (const auto& [name, t] : index.tensors) {
    Tensor& summary = out.tensors[name] = Tensor{t.globalShape, dtypeFromName(name, t.dtype), {}};
    for (const StoredPiece& p : t.pieces) summary.held.push_back(p.slice);
  }
  out.meta = index.meta;
  return out;
}

StateSummary StateSummary::of(const StateDict& state) {
  StateSummary out;
  for (const auto& [name, t] : state.tensors) {
    const at::ScalarType dtype = t.pieces.empty() ? at::kFloat : t.pieces[0].local.scalar_type();
    Tensor& summary = out.tensors[name] = Tensor{t.globalShape, dtype, {}};
    for (const StatePiece& p : t.pieces) summary.held.push_back(p.slice);
  }
  out.meta = state.meta;
  out.onePeer = true;
  return out;
}

std::vector<LoadRequest> trainingStateRequests(const TrainingParts& parts, const StateSummary& source) {
  checkParts(parts, "trainingStateRequests");
  const std::string from = sourcePrefix(parts.replica, source.meta);
  const Layout layout = layoutOf(*parts.dp);

  // Everything that does not fit, collected so that one error lists it all.
  std::vector<std::string> missing, unexpected, mismatched, problems;

  for (const char* key : {kStep, kTokens, kOptimName, kOptimKinds}) {
    if (!source.meta.count(key)) problems.push_back(std::string("missing entry '") + key + "'");
  }
  for (const char* key : {"epoch", "offset", "seed", "num_examples"}) {
    if (!source.meta.count(std::string(kSampler) + key)) {
      problems.push_back(std::string("missing entry '") + kSampler + key + "'");
    }
  }

  // Model parameters: by name, against the module's whole list.
  const std::string modelPrefix = from + kModel;
  const std::vector<std::string> expected = expectedModelNames(parts, layout.pieces);
  const std::set<std::string> expectedSet(expected.begin(), expected.end());
  for (const std::string& name : expected) {
    if (!source.tensors.count(modelPrefix + name)) missing.push_back(name);
  }
  // Without the module a sharded rank knows only its own pieces' names: the
  // others' are not unexpected. A pipeline stage knows the whole model's.
  const bool knowsAllNames = parts.model != nullptr || parts.wholeModel != nullptr || !parts.dp->sharded();
  for (auto it = source.tensors.lower_bound(modelPrefix);
       knowsAllNames && it != source.tensors.end() && it->first.compare(0, modelPrefix.size(), modelPrefix) == 0;
       ++it) {
    const std::string name = it->first.substr(modelPrefix.size());
    if (expectedSet.count(name)) continue;
    if (parts.wholeModel == nullptr) {
      unexpected.push_back(name + " " + shapeText(it->second.shape));
      continue;
    }
    // Another stage's parameter: fine when the whole model has it, as it is.
    auto whole = parts.wholeModel->find(name);
    if (whole == parts.wholeModel->end()) {
      unexpected.push_back(name + " " + shapeText(it->second.shape));
    } else if (whole->second != it->second.shape) {
      mismatched.push_back(name + ": checkpoint " + shapeText(it->second.shape) + ", model " + shapeText(whole->second));
    }
  }
  std::set<std::string> shapeChecked;
  for (const auto& pieces : layout.pieces) {
    for (const auto& piece : pieces) {
      auto it = source.tensors.find(modelPrefix + piece.name);
      if (it == source.tensors.end() || !shapeChecked.insert(piece.name).second) continue;
      if (it->second.shape != piece.shape) {
        mismatched.push_back(piece.name + ": checkpoint " + shapeText(it->second.shape) + ", model " +
                             shapeText(piece.shape));
      }
    }
  }

  // Optimizer state kinds: every kind this run's optimizer keeps must have been saved.
  const optim::OptimizerState live = parts.optimizer->state();
  if (source.meta.count(kOptimKinds)) {
    const std::vector<std::string> savedKinds = split(source.meta.at(kOptimKinds), ',');
    const std::set<std::string> saved(savedKinds.begin(), savedKinds.end());
    std::vector<std::string> lacking;
    for (const auto& item : live.perParameter) {
      if (!saved.count(item.first)) lacking.push_back("'" + item.first + "'");
    }
    if (!lacking.empty()) {
      const auto name = source.meta.find(kOptimName);
      problems.push_back(
          "this run's optimizer '" + parts.optimizer->name() + "' needs optimizer state kind " + join(lacking, ", ") +
          ", which the saved optimizer '" + (name == source.meta.end() ? std::string("?") : name->second) +
          "' did not keep (it has: " + (savedKinds.empty() ? std::string("none") : join(savedKinds, ", ")) +
          "); resume with the same optimizer (optim.name)");
    }
  }

  if (!missing.empty() || !unexpected.empty() || !mismatched.empty() || !problems.empty()) {
    std::sort(missing.begin(), missing.end());
    std::ostringstream message;
    message << "the training state does not fit this run";
    if (!missing.empty() || !unexpected.empty() || !mismatched.empty()) {
      message << " (is it a checkpoint of another model?)";
    }
    if (!missing.empty()) message << "\n  missing parameters: " << join(missing, ", ");
    if (!unexpected.empty()) message << "\n  unexpected parameters: " << join(unexpected, ", ");
    if (!mismatched.empty()) message << "\n  shape mismatches: " << join(mismatched, "; ");
    for (const std::string& problem : problems) message << "\n  " << problem;
    throw InvalidArgument(message.str());
  }

  std::vector<LoadRequest> requests;
  const auto request = [&](const std::string& name, const parallel::ParameterPiece& piece) {
    const StateSummary::Tensor& stored = source.tensors.at(name);
    TESSERA_CHECK_ARG(stored.shape == piece.shape, "training state: '" << name << "' has shape "
                                                                       << shapeText(stored.shape) << ", parameter '"
                                                                       << piece.name << "' " << shapeText(piece.shape));
    requests.push_back(LoadRequest{name, piece.shape, stored.dtype, piece.slice});
  };
  for (const auto& pieces : layout.pieces) {
    for (const auto& piece : pieces) {
      request(modelPrefix + piece.name, piece);
      for (const auto& item : live.perParameter) {
        const std::string name = from + kOptim + item.first + "/" + piece.name;
        if (source.tensors.count(name)) request(name, piece);  // absent: not created yet when saved
      }
    }
  }
  auto scalars = source.tensors.find(from + kScalars);
  if (scalars != source.tensors.end()) {
    requests.push_back(LoadRequest{scalars->first, scalars->second.shape, scalars->second.dtype, std::nullopt});
  }
  if (auto rng = rngRequest(parts, source)) requests.push_back(*rng);
  const auto requestRankTensor = [&](const std::string& what) {
    const std::string name = perRankName(source.tensors, parts.rank, source.onePeer, what);
    if (name.empty()) return;
    const StateSummary::Tensor& t = source.tensors.at(name);
    requests.push_back(LoadRequest{name, t.shape, t.dtype, std::nullopt});
  };
  for (const auto& item : live.perParameterAux) {
    for (size_t i = 0; i < layout.params.size(); ++i) requestRankTensor(kOptimAux + item.first + "/" + std::to_string(i));
  }
  requestRankTensor(kFp8Scaling);
  return requests;
}

void restoreTrainingState(const TrainingParts& parts, const StateDict& loaded) {
  checkParts(parts, "restoreTrainingState");
  const std::string from = sourcePrefix(parts.replica, loaded.meta);
  const Layout layout = layoutOf(*parts.dp);

  // Phase 1: stage everything in fresh tensors; any problem throws here.
  std::vector<at::Tensor> model;
  for (size_t i = 0; i < layout.params.size(); ++i) {
    at::Tensor staged = layout.params[i].detach().clone();  // keeps FSDP padding as it is
    at::Tensor flat = staged.view({-1});
    for (const auto& piece : layout.pieces[i]) {
      readSlice(loaded, from + kModel + piece.name, piece.slice, flat.narrow(0, piece.tensorOffset, piece.slice.numel));
    }
    model.push_back(staged);
  }

  TrainingState state;
  state.step = loaded.metaInt(kStep);
  state.tokens = loaded.metaInt(kTokens);
  std::map<std::string, int64_t> sampler;
  for (const char* key : {"epoch", "offset", "seed", "num_examples"}) {
    sampler[key] = loaded.metaInt(std::string(kSampler) + key);
  }
  state.trainSampler = data::SamplerState::fromMap(sampler);

  const optim::OptimizerState live = parts.optimizer->state();
  for (const auto& [kind, liveTensors] : live.perParameter) {
    std::vector<at::Tensor> tensors(layout.params.size());
    for (size_t i = 0; i < layout.params.size(); ++i) {
      const std::string base = from + kOptim + kind + "/";
      bool any = false;
      for (const auto& piece : layout.pieces[i]) any = any || loaded.tensors.count(base + piece.name) != 0;
      if (!any) continue;  // not created when saved: stays undefined
      // The saved dtype: FP8 codes (uint8) and FP16 moments stay what they were,
      // also into an optimizer that has not created its state yet.
      at::ScalarType dtype = layout.params[i].scalar_type();
      if (i < liveTensors.size() && liveTensors[i].defined()) {
        dtype = liveTensors[i].scalar_type();
      } else {
        for (const auto& piece : layout.pieces[i]) {
          auto it = loaded.tensors.find(base + piece.name);
          if (it != loaded.tensors.end() && !it->second.pieces.empty()) {
            dtype = it->second.pieces[0].local.scalar_type();
            break;
          }
        }
      }
      at::Tensor staged = at::zeros(layout.params[i].sizes(), layout.params[i].options().dtype(dtype));
      at::Tensor flat = staged.view({-1});
      for (const auto& piece : layout.pieces[i]) {
        if (!loaded.tensors.count(base + piece.name)) continue;  // zeros (see the header)
        readSlice(loaded, base + piece.name, piece.slice, flat.narrow(0, piece.tensorOffset, piece.slice.numel));
      }
      tensors[i] = staged;
    }
    state.optimizer.perParameter[kind] = std::move(tensors);
  }
  auto scalars = loaded.tensors.find(from + kScalars);
  if (scalars != loaded.tensors.end()) {
    for (const std::string& line : split(tensorText(loaded.whole(from + kScalars)), '\n')) {
      const size_t eq = line.find('=');
      TESSERA_CHECK_ARG(eq != std::string::npos, "training state: malformed optimizer scalar line '" << line << "'");
      state.optimizer.scalars[line.substr(0, eq)] = line.substr(eq + 1);
    }
  }
  for (const auto& item : live.scalars) {
    TESSERA_CHECK_ARG(state.optimizer.scalars.count(item.first),
                      "training state: optimizer scalar '" << item.first << "' of '" << parts.optimizer->name()
                                                           << "' is missing; resume with the same optimizer");
  }
  // Per-rank tensors: this rank's, or the one peer's (only what was requested is loaded).
  const auto rankTensor = [&](const std::string& what) -> at::Tensor {
    const std::string name = perRankName(loaded.tensors, parts.rank, /*onePeer=*/true, what);
    return name.empty() ? at::Tensor() : loaded.whole(name).clone();
  };
  for (const auto& item : live.perParameterAux) {
    std::vector<at::Tensor>& tensors = state.optimizer.perParameterAux[item.first];
    tensors.resize(layout.params.size());
    for (size_t i = 0; i < layout.params.size(); ++i) tensors[i] = rankTensor(kOptimAux + item.first + "/" + std::to_string(i));
  }
  state.fp8Scaling = rankTensor(kFp8Scaling);
  if (auto rng = loaded.tensors.find(kRng); rng != loaded.tensors.end()) {
    // Format 1: [bytes], whole. Format 2: this rank's row (the only piece loaded).
    const StateTensor& t = rng->second;
    TESSERA_CHECK_ARG(t.pieces.size() == 1 && (t.globalShape.size() == 1 || t.pieces[0].slice.sizes.at(0) == 1) &&
                          t.pieces[0].slice.isWholeBox() && t.pieces[0].local.numel() == t.globalShape.back(),
                      "training state: '" << kRng << "' " << shapeText(t.globalShape)
                                          << " must be loaded as one whole row of generator state");
    state.rng = t.pieces[0].local.reshape({-1}).to(at::kByte).contiguous().clone();
  }

  // Phase 2: apply. Trainer::restore checks the sampler and the optimizer
  // before changing them; the parameters are copied only after it succeeded.
  parts.trainer->restore(state);
  at::NoGradGuard noGrad;
  for (size_t i = 0; i < layout.params.size(); ++i) layout.params[i].copy_(model[i]);
}

int64_t restoreTrainingStateFromCheckpoint(const TrainingParts& parts, const std::string& path) {
  checkParts(parts, "restoreTrainingStateFromCheckpoint");
  const std::string dir = resolveCheckpoint(path);
  const StateSummary summary = StateSummary::of(readIndex(dir));
  const std::vector<LoadRequest> requests = trainingStateRequests(parts, summary);
  // trainingStateRequests already checked the model's names against the
  // whole index; a sharded rank or a pipeline stage requests only its own
  // parameters, so the strict check of load() applies only when this rank
  // holds them all.
  std::vector<std::string> strict;
  if (!parts.dp->sharded() && parts.wholeModel == nullptr) strict.push_back(sourcePrefix(parts.replica, summary.meta) + kModel);
  const StateDict loaded = load(dir, requests, strict);
  restoreTrainingState(parts, loaded);
  return loaded.metaInt(kStep);
}

StateDict extractRanges(const StateDict& source, const std::vector<LoadRequest>& requests) {
  StateDict out;
  out.meta = source.meta;
  for (const LoadRequest& r : requests) {
    auto it = source.tensors.find(r.name);
    TESSERA_CHECK_ARG(it != source.tensors.end(), "training state: missing tensor '" << r.name << "'");
    const StateTensor& t = it->second;
    TESSERA_CHECK_ARG(t.globalShape == r.globalShape, "training state: '" << r.name << "' has shape "
                                                                          << shapeText(t.globalShape) << ", requested "
                                                                          << shapeText(r.globalShape));
    for (const StatePiece& piece : t.pieces) {
      TESSERA_CHECK_ARG(piece.local.scalar_type() == r.dtype, "training state: '" << r.name << "' has dtype "
                                                                                  << piece.local.scalar_type()
                                                                                  << ", requested " << r.dtype);
    }
    const TensorSlice want = r.wanted();
    want.check(t.globalShape, "training state: requested slice of '" + r.name + "'");
    at::Tensor values = at::empty({want.numel}, at::TensorOptions().dtype(r.dtype));
    readSlice(source, r.name, want, values);
    StateTensor& copy = out.tensors[r.name];  // several requests of one name: several pieces
    copy.globalShape = t.globalShape;
    copy.replicated = t.replicated && want.isWhole(t.globalShape);
    copy.pieces.push_back(StatePiece{values.view(want.localShape()), want});
  }
  return out;
}

}  // namespace tessera::checkpoint
