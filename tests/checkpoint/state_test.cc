// The training state as a StateDict (checkpoint/training_state.h) without
// files: names and pieces, exact resumption, replica mapping, the errors for
// a state of another model or optimizer, a failed restore changing nothing;
// FSDP's parameter layout and resharding on 2 real ranks; safetensors files
// (checked by an independent Python reader) and loading them into a module.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/core/models/precision.h"
#include "tessera/train/trainer.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/multiprocess.h"

namespace tessera {
namespace {

using checkpoint::ReplicaInfo;
using checkpoint::StateSummary;
using checkpoint::TrainingParts;

// ---- A small run: model + strategy + optimizer + data + Trainer ---------------

data::ImageDataset syntheticImages() {
  torch::manual_seed(7);
  data::ImageDataset d;
  d.images = torch::randn({64, 8});
  d.labels = torch::randint(0, 3, {64}, torch::kLong);
  return d;
}

data::LmDataset syntheticText() {
  torch::manual_seed(9);
  return data::LmDataset(torch::randint(0, 64, {4000}, torch::kByte), 16);
}

models::GptConfig tinyGpt(uint64_t seed) {
  models::GptConfig c;
  c.vocab_size = 64;
  c.block_size = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.d_model = 32;
  c.seed = seed;
  return c;  // tied head: wte.weight in FSDP's root unit
}

struct RigOptions {
  std::string model = "mlp";           // "mlp" or "gpt"
  std::vector<int64_t> hidden = {16};  // mlp
  uint64_t seed = 1;                   // parameter init
  double dropout = 0.0;                // mlp: exercises the RNG state
  std::string optimizer = "adamw";
  double momentum = 0.0;   // sgd
  comm::CommPtr fsdpComm;  // gpt: FSDP over it; null: no data parallelism
  int64_t steps = 6;
  bool fp8 = false;        // FP8 Linears (delayed scaling) and AdamW with FP8 / FP16 moments (precision O2)
};

struct Rig {
  models::MlpClassifier mlp{nullptr};
  models::Gpt gpt{nullptr};
  std::unique_ptr<TrainableModel> model;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train, val;
  std::unique_ptr<Trainer> trainer;
  std::vector<double> losses;  // per step, from the afterStep hook

  explicit Rig(const RigOptions& o) {
    data::DistributedSampler::Options so;
    so.batchSize = 4;
    so.seed = 3;
    so.dpRank = o.fsdpComm ? o.fsdpComm->rank() : 0;
    so.dpSize = o.fsdpComm ? o.fsdpComm->size() : 1;
    if (o.model == "mlp") {
      models::MlpClassifierConfig mc;
      mc.input_dim = 8;
      mc.hidden_sizes = o.hidden;
      mc.num_classes = 3;
      mc.dropout = o.dropout;
      mc.seed = o.seed;
      mlp = models::MlpClassifier(mc);
      if (o.fp8) models::setPrecision(*mlp, models::Precision::kFp8);
      model = makeTrainable(mlp);
      dp = parallel::makeNoDataParallel(*mlp);
      train = makeBatchSource(syntheticImages(), so);
      so.shuffle = false;
      val = makeBatchSource(syntheticImages(), so);
    } else {
      gpt = models::Gpt(tinyGpt(o.seed));
      model = makeTrainable(gpt);
      dp = o.fsdpComm ? parallel::makeFsdpDataParallel(*gpt, o.fsdpComm) : parallel::makeNoDataParallel(*gpt);
      train = makeBatchSource(syntheticText(), so);
      so.shuffle = false;
      val = makeBatchSource(syntheticText(), so);
    }
    optim::OptimizerConfig oc;
    oc.name = o.optimizer;
    oc.momentum = o.momentum;
    if (o.fp8) oc.states = "fp8";
    optimizer = optim::makeOptimizer(oc, dp->optimizerParameters(), 0.01);

    TrainerParts p;
    p.model = model.get();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    optim::LrScheduleConfig lc;
    lc.lr = 0.01;
    lc.min_lr = 0.001;
    lc.warmup_steps = 2;
    p.schedule = optim::makeLrSchedule(lc, 8);
    p.train = train.get();
    p.val = val.get();
    p.dataComm = o.fsdpComm;
    TrainConfig c;
    c.steps = o.steps;
    c.clip = 1.0;
    c.eval_every = 0;
    c.eval_batches = 1;
    c.log_every = 1;
    c.seed = 11;
    c.progress = false;
    trainer = std::make_unique<Trainer>(p, c);
    trainer->callbacks().afterStep.push_back([this](const StepReport& r) { losses.push_back(r.loss); });
  }

  torch::nn::Module& module() { return model->module(); }

  TrainingParts parts(ReplicaInfo replica = {}) {
    TrainingParts p;
    p.trainer = trainer.get();
    p.model = &module();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    p.replica = replica;
    return p;
  }

  // Trainable parameters by (first) name, cloned.
  std::map<std::string, at::Tensor> parameters() {
    std::map<std::string, at::Tensor> out;
    for (const auto& item : module().named_parameters()) out.emplace(item.key(), item.value().detach().clone());
    return out;
  }

  // Shifts every parameter so that a restore that skipped one is visible.
  void perturb() {
    at::NoGradGuard noGrad;
    for (auto& p : dp->optimizerParameters()) p.add_(1.0);
  }
};

// What a checkpoint round trip does, in memory: requests from the target's
// layout, ranges taken from the source state, restore.
void restoreFrom(const StateDict& source, const TrainingParts& target) {
  const auto requests = checkpoint::trainingStateRequests(target, StateSummary::of(source));
  checkpoint::restoreTrainingState(target, checkpoint::extractRanges(source, requests));
}

std::string errorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

void expectSameParameters(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, value] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_TRUE(at::equal(value, b.at(name))) << name;
  }
}

// ---- Names, pieces, meta -------------------------------------------------------

TEST(TrainingState, NamesShapesAndMetaOfAnUnshardedRun) {
  Rig rig({});
  rig.trainer->run();
  const StateDict s = checkpoint::collectTrainingState(rig.parts(), {{"config/text", "x = 1"}});
  for (const auto& item : rig.module().named_parameters()) {
    const std::string name = "model/" + item.key();
    ASSERT_TRUE(s.tensors.count(name)) << name;
    const StateTensor& t = s.tensors.at(name);
    EXPECT_EQ(t.globalShape, item.value().sizes().vec());
    EXPECT_TRUE(t.replicated);
    EXPECT_TRUE(at::equal(s.whole(name).reshape(item.value().sizes()), item.value().detach()));
    for (const char* kind : {"exp_avg", "exp_avg_sq"}) {
      EXPECT_TRUE(s.tensors.count(std::string("optim/") + kind + "/" + item.key())) << kind << " " << item.key();
    }
  }
  EXPECT_EQ(s.metaInt("trainer/step"), 6);
  EXPECT_EQ(s.metaInt("trainer/tokens"), 6 * 4);
  EXPECT_EQ(s.metaInt("trainer/sampler/offset"), 6 * 4 % 64);
  EXPECT_EQ(s.metaString("optim/name"), "adamw");
  EXPECT_EQ(s.metaString("optim/kinds"), "exp_avg,exp_avg_sq");
  EXPECT_EQ(s.metaInt("replicas"), 1);
  EXPECT_EQ(s.metaString("config/text"), "x = 1");
  ASSERT_TRUE(s.tensors.count("optim/scalars"));
  const at::Tensor text = s.whole("optim/scalars");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(text.data_ptr<uint8_t>()), text.numel()), "step=6\n");
  EXPECT_EQ(s.whole("trainer/rng").scalar_type(), at::kByte);

  // Replica-local names carry the replica's prefix.
  const StateDict r = checkpoint::collectTrainingState(rig.parts({1, 2}));
  EXPECT_TRUE(r.tensors.count("replica-1/model/layers.0.weight"));
  EXPECT_TRUE(r.tensors.count("replica-1/optim/exp_avg/layers.0.weight"));
  EXPECT_TRUE(r.tensors.count("replica-1/optim/scalars"));
  EXPECT_FALSE(r.tensors.count("model/layers.0.weight"));
  EXPECT_EQ(r.metaInt("replicas"), 2);
}

// SGD without momentum keeps no per-parameter tensors: nothing is saved
// for them and the restored optimizer has none either.
// Every rank's generator state is saved as its row of trainer/rng; a
// checkpoint gives each rank its own row back, a rank beyond the saved world
// size keeps its generator as seeded.
TEST(TrainingState, EachRankRestoresItsOwnGeneratorRow) {
  Rig run({.dropout = 0.2, .steps = 1});
  StateDict merged;  // what a 2-rank checkpoint holds: rows 0 and 1
  std::vector<at::Tensor> states;
  for (int rank = 0; rank < 2; ++rank) {
    torch::manual_seed(100 + rank);  // a different generator state per "rank"
    states.push_back(at::detail::getDefaultCPUGenerator().get_state());
    TrainingParts parts = run.parts();
    parts.rank = rank;
    parts.worldSize = 2;
    StateDict mine = checkpoint::collectTrainingState(parts).clone();
    const StateTensor& rng = mine.tensors.at("trainer/rng");
    ASSERT_EQ(rng.globalShape, (std::vector<int64_t>{2, states.back().numel()}));
    ASSERT_EQ(rng.pieces.at(0).slice, TensorSlice::box({rank, 0}, {1, states.back().numel()}));
    if (rank == 0) merged = mine;
    else merged.tensors.at("trainer/rng").pieces.push_back(rng.pieces.at(0));
  }
  StateSummary summary = StateSummary::of(merged);
  summary.onePeer = false;  // as from a checkpoint's index: every rank's rows
  const auto restoreAs = [&](int rank, int worldSize) {
    torch::manual_seed(999);
    TrainingParts parts = run.parts();
    parts.rank = rank;
    parts.worldSize = worldSize;
    checkpoint::restoreTrainingState(parts,
                                     checkpoint::extractRanges(merged, checkpoint::trainingStateRequests(parts, summary)));
    return at::detail::getDefaultCPUGenerator().get_state();
  };
  EXPECT_TRUE(at::equal(restoreAs(1, 2), states[1])) << "rank 1 of 2 gets row 1";
  EXPECT_TRUE(at::equal(restoreAs(0, 2), states[0])) << "rank 0 of 2 gets row 0";
  EXPECT_TRUE(at::equal(restoreAs(1, 4), states[1])) << "4 ranks: row 1 exists";
  torch::manual_seed(999);
  const at::Tensor seeded = at::detail::getDefaultCPUGenerator().get_state();
  EXPECT_TRUE(at::equal(restoreAs(3, 4), seeded)) << "4 ranks: rank 3 has no row and keeps the seeded generator";
}

TEST(TrainingState, StateNotCreatedYetIsNotSaved) {
  Rig a({.optimizer = "sgd"});
  a.trainer->run();
  const StateDict s = checkpoint::collectTrainingState(a.parts()).clone();
  for (const auto& item : s.tensors) EXPECT_NE(item.first.rfind("optim/momentum_buffer/", 0), 0u) << item.first;
  EXPECT_EQ(s.metaString("optim/kinds"), "momentum_buffer");
  Rig b({.seed = 2, .optimizer = "sgd"});
  restoreFrom(s, b.parts());
  const optim::OptimizerState restored = b.optimizer->state();
  for (const auto& t : restored.perParameter.at("momentum_buffer")) EXPECT_FALSE(t.defined());
  expectSameParameters(a.parameters(), b.parameters());
}

// ---- Exact resumption ----------------------------------------------------------

// The reference is an uninterrupted run of 6 steps; the other run stops after
// 3, its state goes (cloned) into a fresh run with other parameters, which
// continues: steps 4..6 must give the same losses bit for bit. Dropout makes
// the losses depend on the RNG state as well.
TEST(TrainingState, ResumedRunMatchesTheUninterruptedRunExactly) {
  for (const std::string optimizer : {"adamw", "sgd"}) {
    SCOPED_TRACE(optimizer);
    RigOptions o{.dropout = 0.2, .optimizer = optimizer, .momentum = 0.9};
    Rig reference(o);
    reference.trainer->run();

    o.steps = 3;
    Rig first(o);
    first.trainer->run();
    const StateDict saved = checkpoint::collectTrainingState(first.parts()).clone();

    o.steps = 6;  // same model seed: it also keys dropout; perturb() makes the parameters differ
    Rig resumed(o);
    resumed.perturb();
    torch::manual_seed(12345);  // the restored RNG must override this
    restoreFrom(saved, resumed.parts());
    resumed.trainer->run();
    ASSERT_EQ(resumed.losses.size(), 3u);
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], reference.losses[3 + i]) << "step " << 4 + i;
    expectSameParameters(resumed.parameters(), reference.parameters());
  }
}

// FP8 state (precision O2): the Linears' amax histories and scales
// (trainer/rank-<r>/fp8_scaling) and the optimizer's FP8 / FP16 moments with
// their scales (codes in optim/, scales in trainer/rank-<r>/optim_aux/) come
// back exactly -- from a checkpoint (this rank's entries) and from one peer's
// state as live recovery sends it (the joiner, whatever its rank, takes the
// peer's) -- and the resumed run continues bit for bit.
TEST(TrainingState, Fp8ScalesHistoriesAndMomentsResumeBitForBit) {
  RigOptions o{.fp8 = true};
  Rig reference(o);
  reference.trainer->run();

  o.steps = 3;
  Rig first(o);
  first.trainer->run();
  TrainingParts saving = first.parts();
  saving.rank = 1;  // its per-rank entries are rank 1's
  saving.worldSize = 2;
  const StateDict saved = checkpoint::collectTrainingState(saving).clone();
  ASSERT_TRUE(saved.tensors.count("trainer/rank-1/fp8_scaling"));
  EXPECT_TRUE(saved.tensors.count("trainer/rank-1/optim_aux/exp_avg.scale/0"));
  const at::Tensor histories = models::fp8ScalingState(first.module());
  EXPECT_GT(histories.numel(), 0);

  for (const bool peer : {false, true}) {
    SCOPED_TRACE(peer ? "from one peer (live recovery), as rank 0" : "from a checkpoint, as rank 1");
    o.steps = 6;
    Rig resumed(o);
    resumed.perturb();
    TrainingParts target = resumed.parts();
    target.rank = peer ? 0 : 1;
    target.worldSize = 2;
    StateSummary summary = StateSummary::of(saved);
    summary.onePeer = peer;
    checkpoint::restoreTrainingState(target,
                                     checkpoint::extractRanges(saved, checkpoint::trainingStateRequests(target, summary)));
    EXPECT_TRUE(at::equal(models::fp8ScalingState(resumed.module()), histories));
    resumed.trainer->run();
    ASSERT_EQ(resumed.losses.size(), 3u);
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], reference.losses[3 + i]) << "step " << 4 + i;
    expectSameParameters(resumed.parameters(), reference.parameters());
  }

  // Without the optimizer's scales (another mesh's checkpoint) the codes cannot be decoded: a named error.
  StateDict noScales = saved.clone();
  for (auto it = noScales.tensors.begin(); it != noScales.tensors.end();) {
    it = it->first.find("optim_aux/") != std::string::npos ? noScales.tensors.erase(it) : std::next(it);
  }
  Rig other(o);
  TrainingParts target = other.parts();
  target.rank = 1;
  target.worldSize = 2;
  const std::string error = errorOf([&] { restoreFrom(noScales, target); });
  EXPECT_NE(error.find("scale"), std::string::npos) << error;
}

// ---- Replicas ---------------------------------------------------------------------

TEST(TrainingState, ReplicaKLoadsSavedReplicaKModuloTheSavedCount) {
  Rig replica0({.seed = 1, .steps = 2}), replica1({.seed = 2, .steps = 3});
  replica0.trainer->run();
  replica1.trainer->run();
  // A checkpoint of a 2-replica run holds both replicas' pieces.
  StateDict merged = checkpoint::collectTrainingState(replica0.parts({0, 2})).clone();
  for (auto& [name, t] : checkpoint::collectTrainingState(replica1.parts({1, 2})).clone().tensors) {
    if (name.rfind("replica-1/", 0) == 0) merged.tensors[name] = t;
  }
  const std::vector<std::pair<ReplicaInfo, Rig*>> cases = {
      {{3, 4}, &replica1}, {{2, 4}, &replica0}, {{1, 2}, &replica1}, {{0, 1}, &replica0}};
  for (const auto& [replica, expected] : cases) {
    SCOPED_TRACE("replica " + std::to_string(replica.index) + " of " + std::to_string(replica.count));
    Rig target({.seed = 7});
    restoreFrom(merged, target.parts(replica));
    expectSameParameters(target.parameters(), expected->parameters());
  }
  // A one-replica state feeds every replica of a larger run.
  const StateDict single = checkpoint::collectTrainingState(replica1.parts()).clone();
  Rig target({.seed = 7});
  restoreFrom(single, target.parts({2, 3}));
  expectSameParameters(target.parameters(), replica1.parameters());
}

// ---- Bad input ----------------------------------------------------------------------

TEST(TrainingState, AnotherModelIsListedNameByName) {
  Rig saved({.hidden = {16}});
  const StateDict s = checkpoint::collectTrainingState(saved.parts()).clone();
  Rig other({.hidden = {24, 5}});
  const auto before = other.parameters();
  const std::string message = errorOf([&] { restoreFrom(s, other.parts()); });
  // hidden {16}: layers.0 (16x8), layers.1 (3x16); hidden {24, 5}: layers.0 (24x8), layers.1 (5x24), layers.2 (3x5).
  EXPECT_NE(message.find("another model"), std::string::npos) << message;
  EXPECT_NE(message.find("missing parameters: layers.2.bias, layers.2.weight"), std::string::npos) << message;
  EXPECT_NE(message.find("shape mismatches: layers.0.weight: checkpoint [16, 8], model [24, 8]; layers.0.bias: "
                         "checkpoint [16], model [24]"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("layers.1.weight: checkpoint [3, 16], model [5, 24]"), std::string::npos) << message;
  expectSameParameters(other.parameters(), before);

  Rig fewer({.hidden = {}});  // only layers.0 (3x8)
  const std::string unexpected = errorOf([&] { restoreFrom(s, fewer.parts()); });
  EXPECT_NE(unexpected.find("unexpected parameters: layers.1.bias [3], layers.1.weight [3, 16]"), std::string::npos)
      << unexpected;
}

TEST(TrainingState, AnotherOptimizerNamesTheMissingStateKind) {
  Rig adam({.optimizer = "adamw", .steps = 1});
  adam.trainer->run();
  Rig sgd({.optimizer = "sgd", .momentum = 0.9, .steps = 1});
  sgd.trainer->run();
  const StateDict adamState = checkpoint::collectTrainingState(adam.parts()).clone();
  const StateDict sgdState = checkpoint::collectTrainingState(sgd.parts()).clone();

  Rig toSgd({.optimizer = "sgd", .momentum = 0.9});
  const std::string a = errorOf([&] { restoreFrom(adamState, toSgd.parts()); });
  EXPECT_NE(a.find("optimizer 'sgd' needs optimizer state kind 'momentum_buffer'"), std::string::npos) << a;
  EXPECT_NE(a.find("saved optimizer 'adamw'"), std::string::npos) << a;
  Rig toAdam({.optimizer = "adamw"});
  const std::string b = errorOf([&] { restoreFrom(sgdState, toAdam.parts()); });
  EXPECT_NE(b.find("'exp_avg', 'exp_avg_sq'"), std::string::npos) << b;
}

// A problem found while staging (a range nobody holds) or by the Trainer
// (a sampler of another dataset) leaves parameters, optimizer and step as they were.
TEST(TrainingState, AFailedRestoreChangesNothing) {
  Rig saved({.steps = 2});
  saved.trainer->run();
  const StateDict s = checkpoint::collectTrainingState(saved.parts()).clone();
  Rig target({.seed = 5, .steps = 1});
  target.trainer->run();
  const auto params = target.parameters();
  const at::Tensor expAvg = target.optimizer->state().perParameter.at("exp_avg")[0].clone();

  StateDict holed = s.clone();
  StatePiece& piece = holed.tensors.at("model/layers.1.weight").pieces[0];
  piece.local = piece.local.reshape({-1}).narrow(0, 0, 10).clone();  // covers 10 of 48 elements
  piece.slice = piece.slice.narrowFlat(0, 10);
  const std::string hole = errorOf([&] { checkpoint::restoreTrainingState(target.parts(), holed); });
  EXPECT_NE(hole.find("'model/layers.1.weight' [3, 16]: slice [0:3, 0:16] is not covered: element 10 of the slice "
                      "(38 in all) is in no piece held"),
            std::string::npos)
      << hole;

  StateDict otherData = s.clone();
  otherData.putMeta("trainer/sampler/num_examples", int64_t{65});
  const std::string data = errorOf([&] { restoreFrom(otherData, target.parts()); });
  EXPECT_NE(data.find("65 examples"), std::string::npos) << data;

  expectSameParameters(target.parameters(), params);
  EXPECT_TRUE(at::equal(target.optimizer->state().perParameter.at("exp_avg")[0], expAvg));
  EXPECT_EQ(target.trainer->snapshot().step, 1);
}

// ---- FSDP on 2 ranks ----------------------------------------------------------------

// Sums every rank's pieces of each name into a whole tensor (plus how many
// ranks covered each element), so the result is the same on every rank.
std::map<std::string, std::pair<at::Tensor, at::Tensor>> gatherPieces(
    const StateDict& mine, const std::map<std::string, std::vector<int64_t>>& names, comm::Communicator& comm) {
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> out;
  for (const auto& [name, shape] : names) {
    at::Tensor values = at::zeros(shape, at::kFloat), count = at::zeros(shape, at::kFloat);
    auto it = mine.tensors.find(name);
    if (it != mine.tensors.end()) {
      TESSERA_CHECK_EQ(it->second.globalShape, shape);
      for (const StatePiece& p : it->second.pieces) {
        // FSDP's pieces are flat ranges of the whole-tensor box.
        TESSERA_CHECK(p.slice.sizes == shape, name << ": piece " << p.slice.text() << " is not of the whole box");
        values.view({-1}).narrow(0, p.slice.flatOffset, p.slice.numel).copy_(p.local.reshape({-1}));
        count.view({-1}).narrow(0, p.slice.flatOffset, p.slice.numel).add_(1);
      }
    }
    comm.allReduce(values, comm::ReduceOp::kSum);
    comm.allReduce(count, comm::ReduceOp::kSum);
    out[name] = {values, count};
  }
  return out;
}

// The reference's trainable parameters by first name (tied once), with shapes.
std::map<std::string, std::vector<int64_t>> parameterShapes(torch::nn::Module& module, const std::string& prefix) {
  std::map<std::string, std::vector<int64_t>> out;
  std::set<const void*> seen;
  for (const auto& item : module.named_parameters()) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) out[prefix + item.key()] = item.value().sizes().vec();
  }
  return out;
}

TESSERA_WORKER(fsdp_layout_and_reshard) {
  at::set_num_threads(1);
  auto world = ctx.world();

  // 1. The layout: every element of every parameter held by exactly one rank,
  //    with the values of the unsharded model (same seed), padding in no piece.
  models::Gpt reference(tinyGpt(5));
  const auto shapes = parameterShapes(*reference, "model/");
  {
    Rig rig({.model = "gpt", .seed = 5, .fsdpComm = world});
    const auto layout = rig.dp->parameterLayout();
    const auto shards = rig.dp->optimizerParameters();
    TESSERA_CHECK_EQ(layout.size(), shards.size());
    for (size_t i = 0; i < layout.size(); ++i) {
      int64_t next = 0;
      for (const auto& piece : layout[i]) {
        TESSERA_CHECK(piece.tensorOffset >= next && piece.tensorOffset + piece.slice.numel <= shards[i].numel(),
                      "piece " << piece.name << " at " << piece.tensorOffset << " out of order or outside the shard");
        TESSERA_CHECK(piece.slice.sizes == piece.shape && !piece.slice.isWholeBox() == (piece.slice.numel < c10::multiply_integers(piece.shape)),
                      "FSDP piece " << piece.name << " " << piece.slice.text() << " is not a flat range of the whole box");
        next = piece.tensorOffset + piece.slice.numel;
      }
    }
    const StateDict mine = checkpoint::collectTrainingState(rig.parts());
    for (const auto& [name, t] : mine.tensors) {
      if (name.rfind("model/", 0) == 0) TESSERA_CHECK(!t.replicated, name << " is marked replicated under FSDP");
    }
    const auto gathered = gatherPieces(mine, shapes, *world);
    for (const auto& item : reference->named_parameters()) {
      const auto& [values, count] = gathered.at("model/" + item.key());
      TESSERA_CHECK(at::equal(count, at::ones_like(count)), item.key() << ": not every element held exactly once");
      testing::expectTensorsEqual(values, item.value().detach(), item.key());
    }
  }

  // 2. Train 2 steps under FSDP; its state, reassembled, restores into a
  //    fresh FSDP run (which then continues exactly like the original) and
  //    into a single process without data parallelism (same parameters).
  Rig original({.model = "gpt", .seed = 5, .fsdpComm = world, .steps = 2});
  original.trainer->run();
  const StateDict mine = checkpoint::collectTrainingState(original.parts()).clone();
  std::map<std::string, std::vector<int64_t>> names = shapes;
  for (const auto& [name, shape] : shapes) {
    for (const char* kind : {"exp_avg", "exp_avg_sq"}) names["optim/" + std::string(kind) + name.substr(5)] = shape;
  }
  StateDict whole;
  whole.meta = mine.meta;
  for (const auto& [name, pair] : gatherPieces(mine, names, *world)) whole.putReplicated(name, pair.first);
  for (const char* name : {"optim/scalars", "trainer/rng"}) whole.tensors[name] = mine.tensors.at(name);

  Rig fsdp({.model = "gpt", .seed = 8, .fsdpComm = world, .steps = 4});
  restoreFrom(whole, fsdp.parts());
  fsdp.trainer->run();
  original.trainer = nullptr;
  Rig continued({.model = "gpt", .seed = 5, .fsdpComm = world, .steps = 4});
  continued.trainer->run();  // the uninterrupted 4-step run
  TESSERA_CHECK_EQ(fsdp.losses.size(), 2u);
  for (size_t i = 0; i < 2; ++i) TESSERA_CHECK_EQ(fsdp.losses[i], continued.losses[2 + i]);

  Rig single({.model = "gpt", .seed = 9, .steps = 2});
  restoreFrom(whole, single.parts());
  for (const auto& item : single.module().named_parameters()) {
    testing::expectTensorsEqual(item.value().detach(), whole.whole("model/" + item.key()).reshape(item.value().sizes()),
                                "single-process " + item.key());
  }
  const auto singleExpAvg = single.optimizer->state().perParameter.at("exp_avg");
  const auto singleParams = single.dp->optimizerParameters();
  const auto layout = single.dp->parameterLayout();
  for (size_t i = 0; i < layout.size(); ++i) {
    testing::expectTensorsEqual(singleExpAvg[i],
                                whole.whole("optim/exp_avg/" + layout[i][0].name).reshape(singleParams[i].sizes()),
                                "exp_avg of " + layout[i][0].name);
  }
  TESSERA_CHECK_EQ(single.trainer->snapshot().step, 2);
}

TEST(TrainingStateFsdp, TwoRankLayoutReassemblesTheModelAndReshards) {
  const auto result =
      testing::runWorkers("fsdp_layout_and_reshard", {.ranks = 2, .deadline = std::chrono::seconds(120)});
  ASSERT_TRUE(result.ok()) << result.report();
}

// ---- safetensors ----------------------------------------------------------------------

std::string tempFile(const std::string& name) {
  return ::testing::TempDir() + "state_test_" + std::to_string(getpid()) + "_" + name;
}

// The file as Python's json + struct read it (numpy too when installed), with
// the expected values written out from their formulas, independent of the C++ reader.
constexpr const char* kPythonCheck = R"PY(
import json, struct, sys
path = sys.argv[1]
data = open(path, 'rb').read()
(n,) = struct.unpack('<Q', data[:8])
assert n % 8 == 0, 'header not padded to 8 bytes'
header = json.loads(data[8:8 + n].decode('utf-8'))
body = data[8 + n:]
assert header['__metadata__'] == {'format': 'pt', 'step': '7'}, header['__metadata__']
names = [k for k in header if k != '__metadata__']
assert names == sorted(names) == ['a.bf16', 'b.f32', 'c.i64', 'd.u8'], names
end = 0
for name in names:  # packed in name order without gaps
    b, e = header[name]['data_offsets']
    assert b == end, (name, b, end)
    end = e
assert end == len(body), (end, len(body))
def raw(name):
    b, e = header[name]['data_offsets']
    return body[b:e]
def check(name, dtype, shape, fmt, expected):
    h = header[name]
    assert h['dtype'] == dtype and h['shape'] == shape, (name, h)
    got = list(struct.unpack('<' + fmt * len(expected), raw(name)))
    assert got == expected, (name, got, expected)
check('b.f32', 'F32', [2, 3], 'f', [i * 0.5 for i in range(6)])
check('c.i64', 'I64', [2], 'q', [-3, 2 ** 40])
check('d.u8', 'U8', [3], 'B', [0, 255, 7])
h = header['a.bf16']
assert h['dtype'] == 'BF16' and h['shape'] == [3], h
bits = struct.unpack('<3H', raw('a.bf16'))
got = [struct.unpack('<f', struct.pack('<I', b << 16))[0] for b in bits]
assert got == [1.0, -2.5, 0.15625], got
try:
    import numpy as np
except ImportError:
    print('OK (no numpy)')
    sys.exit(0)
b, e = header['b.f32']['data_offsets']
assert (np.frombuffer(body[b:e], dtype='<f4').reshape(2, 3) == np.arange(6).reshape(2, 3) * 0.5).all()
print('OK')
)PY";

TEST(Safetensors, PythonReadsWhatTheWriterWrites) {
  if (std::system("python3 -c pass >/dev/null 2>&1") != 0) GTEST_SKIP() << "python3 not installed";
  const std::string file = tempFile("check.safetensors"), script = tempFile("check.py");
  checkpoint::writeSafetensors(file,
                               {{"b.f32", torch::arange(6, torch::kFloat).reshape({2, 3}) * 0.5},
                                {"a.bf16", torch::tensor({1.0, -2.5, 0.15625}).to(torch::kBFloat16)},
                                {"c.i64", torch::tensor({int64_t{-3}, int64_t{1} << 40})},
                                {"d.u8", torch::tensor({0, 255, 7}).to(torch::kByte)}},
                               {{"step", "7"}});
  std::ofstream(script) << kPythonCheck;
  const std::string command = "python3 " + script + " " + file + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[512];
  while (fgets(buffer, sizeof buffer, pipe)) output += buffer;
  EXPECT_EQ(pclose(pipe), 0) << output;
  EXPECT_EQ(output.rfind("OK", 0), 0u) << output;

  const checkpoint::SafetensorsFile back = checkpoint::readSafetensors(file);
  EXPECT_TRUE(at::equal(back.tensors.at("b.f32"), torch::arange(6, torch::kFloat).reshape({2, 3}) * 0.5));
  EXPECT_EQ(back.tensors.at("a.bf16").scalar_type(), at::kBFloat16);
  EXPECT_EQ(back.metadata.at("step"), "7");
  std::remove(file.c_str());
  std::remove(script.c_str());
}

TEST(Safetensors, RejectsTruncatedAndMalformedFiles) {
  const std::string file = tempFile("bad.safetensors");
  checkpoint::writeSafetensors(file, {{"w", torch::ones({4, 4})}});
  std::ifstream in(file, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 4);
  EXPECT_THROW(checkpoint::readSafetensors(file), checkpoint::CheckpointError);
  std::ofstream(file, std::ios::binary | std::ios::trunc) << std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10);
  EXPECT_THROW(checkpoint::readSafetensors(file), checkpoint::CheckpointError);
  std::remove(file.c_str());
}

TEST(Safetensors, LoadsIntoAModuleAndListsEveryMismatch) {
  Rig source({.model = "gpt", .seed = 3}), target({.model = "gpt", .seed = 4});
  const std::map<std::string, at::Tensor> tensors = source.parameters();  // the tied head is wte.weight
  const std::string file = tempFile("gpt.safetensors");
  checkpoint::writeSafetensors(file, tensors);
  checkpoint::loadSafetensorsInto(target.module(), file);
  expectSameParameters(target.parameters(), source.parameters());

  std::map<std::string, at::Tensor> bad = tensors;
  bad.erase("ln_f.weight");
  bad["blocks.0.attn.qkv.weight"] = torch::zeros({3, 3});
  bad["extra.weight"] = torch::zeros({2});
  checkpoint::writeSafetensors(file, bad);
  Rig untouched({.model = "gpt", .seed = 6});
  const auto before = untouched.parameters();
  const std::string message = errorOf([&] { checkpoint::loadSafetensorsInto(untouched.module(), file); });
  EXPECT_NE(message.find("missing: ln_f.weight"), std::string::npos) << message;
  EXPECT_NE(message.find("unexpected: extra.weight [2]"), std::string::npos) << message;
  EXPECT_NE(message.find("shape mismatches: blocks.0.attn.qkv.weight: file [3, 3], model [96, 32]"), std::string::npos)
      << message;
  expectSameParameters(untouched.parameters(), before);
  std::remove(file.c_str());
}

}  // namespace
}  // namespace tessera
