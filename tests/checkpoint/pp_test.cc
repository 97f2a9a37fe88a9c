// Checkpoints of pipeline stages (issue 16 §1): each stage holds a part of
// the GPT (models::GptPart) under the whole model's names, so
//  - 2 real stage processes (strategy none, or FSDP over 2 ranks per stage)
//    save one checkpoint through the Checkpointer, which one process restores
//    into the whole model (pp = 2 -> pp = 1);
//  - a whole-model checkpoint restores into 2 stages (pp = 1 -> pp = 2), each
//    requesting only what it holds (TrainingParts::wholeModel);
//  - with tied embeddings the last stage's copy of wte saves as "wte.weight"
//    like the first stage's: once under DDP/none (one stored piece), and as
//    overlapping FSDP ranges under FSDP, read back as one tensor;
//  - model.init_from: a whole safetensors file loads into every stage.
//
// The reference never goes through checkpoint/: one process builds the whole
// model from the same seed, applies the same synthetic gradients (a function
// of the parameter's name) and one AdamW step; the parts' values and moments
// must equal its slices bit for bit.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <functional>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/checkpoint/training_state.h"
#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/optim/optimizer.h"
#include "tessera/parallel/data_parallel.h"
#include "tessera/parallel/fsdp.h"
#include "tessera/train/trainer.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"

namespace tessera {
namespace {

using testing::sliceOf;

namespace fs = std::filesystem;
using Tensors = std::map<std::string, at::Tensor>;
using Shapes = std::map<std::string, std::vector<int64_t>>;

constexpr uint64_t kSeed = 5;     // the saved state's init
constexpr uint64_t kOtherSeed = 9;  // a restoring run's: every value differs before the restore

models::GptConfig gptConfig(bool tie, uint64_t seed) {
  models::GptConfig c;
  c.vocab_size = 23;
  c.block_size = 8;
  c.n_layer = 4;
  c.n_head = 2;
  c.d_model = 16;
  c.mlp_ratio = 2;
  c.tie_weights = tie;
  c.seed = seed;
  return c;
}

// Stage s of 2 (blocks [0, 2) with the embedding, [2, 4) with the head); -1: the whole model.
models::GptPart stagePart(int stage) {
  if (stage < 0) return models::GptPart::whole();
  const auto ranges = models::gptChunkBlocks(4, 2, {});
  return models::GptPart::ofChunks({ranges[stage]}, stage == 0, stage == 1);
}

// The flat elements of `slice` of `whole`.

// A gradient that depends only on the parameter's name and shape: every
// layout (a stage, an FSDP shard, the whole model) sees the same one, as the
// tied copies do after the pipeline's embedding-group all-reduce.
at::Tensor syntheticGradient(const std::string& name, const std::vector<int64_t>& shape) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::hash<std::string>{}(name) % 1000003 + 1);
  return at::randn(shape, gen);
}

// One rank of a stage (or of the whole model): the part, a strategy over
// `stageComm`, AdamW, and a Trainer that is never run (it carries the state).
struct StageRun {
  models::Gpt gpt;
  std::unique_ptr<TrainableModel> model;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train;
  std::unique_ptr<Trainer> trainer;
  Shapes whole;

  StageRun(bool tie, uint64_t seed, int stage, const std::string& strategy, comm::CommPtr stageComm)
      : gpt(gptConfig(tie, seed), stagePart(stage)), whole(models::gptParameterShapes(gptConfig(tie, seed))) {
    model = makeTrainable(gpt);
    if (strategy == "fsdp") {
      dp = parallel::makeFsdpDataParallel(*gpt, stageComm);
    } else if (strategy == "ddp") {
      dp = parallel::makeDdpDataParallel(*gpt, stageComm);
    } else {
      dp = parallel::makeNoDataParallel(*gpt);
    }
    optimizer = optim::makeOptimizer(optim::OptimizerConfig{}, dp->optimizerParameters(), 0.01);
    data::DistributedSampler::Options so;
    so.batchSize = 2;
    train = makeBatchSource(data::LmDataset(torch::zeros({200}, torch::kByte), 8), so);
    TrainerParts p;
    p.model = model.get();
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    p.schedule = optim::makeLrSchedule(optim::LrScheduleConfig{}, 10);
    p.train = train.get();
    p.reportsProgress = false;
    TrainConfig c;
    c.steps = 1;
    c.eval_every = 0;
    c.eval_batches = 0;
    c.progress = false;
    trainer = std::make_unique<Trainer>(p, c);
  }

  // The synthetic gradients on the strategy's tensors, then one AdamW step.
  void step() {
    const auto params = dp->optimizerParameters();
    const auto layout = dp->parameterLayout();
    for (size_t i = 0; i < params.size(); ++i) {
      at::Tensor flat = at::zeros({params[i].numel()});
      for (const auto& piece : layout[i]) {
        flat.narrow(0, piece.tensorOffset, piece.slice.numel)
            .copy_(sliceOf(syntheticGradient(piece.name, piece.shape), piece.slice));
      }
      params[i].mutable_grad() = flat.view(params[i].sizes());
    }
    optimizer->step();
  }

  checkpoint::TrainingParts parts(int rank, int worldSize, bool withWholeModel) {
    checkpoint::TrainingParts p;
    p.trainer = trainer.get();
    p.model = &model->module();
    p.wholeModel = withWholeModel ? &whole : nullptr;
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    p.rank = rank;
    p.worldSize = worldSize;
    return p;
  }
};

// The reference: model/<p> and optim/<kind>/<p> of the whole model after the step.
Tensors referenceState(bool tie) {
  StageRun whole(tie, kSeed, -1, "none", nullptr);
  whole.step();
  Tensors out;
  const auto params = whole.dp->optimizerParameters();
  const auto layout = whole.dp->parameterLayout();
  const auto state = whole.optimizer->state().perParameter;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = layout[i].at(0).name;
    out["model/" + name] = params[i].detach().clone();
    for (const auto& [kind, tensors] : state) out["optim/" + kind + "/" + name] = tensors[i].clone();
  }
  return out;
}

// Every piece this run holds of every parameter and moment equals the
// reference's slice. Returns the number of pieces compared.
int checkHeld(StageRun& run, const Tensors& expected, const std::string& what) {
  const auto params = run.dp->optimizerParameters();
  const auto layout = run.dp->parameterLayout();
  std::vector<std::pair<std::string, std::vector<at::Tensor>>> sources = {{"model/", params}};
  for (const auto& [kind, tensors] : run.optimizer->state().perParameter) sources.emplace_back("optim/" + kind + "/", tensors);
  int compared = 0;
  for (const auto& [prefix, tensors] : sources) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      TESSERA_CHECK(tensors[i].defined(), what << ": " << prefix << " tensor " << i << " is not restored");
      const at::Tensor flat = tensors[i].detach().reshape({-1});
      for (const auto& piece : layout[i]) {
        const at::Tensor want = sliceOf(expected.at(prefix + piece.name), piece.slice);
        testing::expectTensorsEqual(flat.narrow(0, piece.tensorOffset, piece.slice.numel), want,
                                    what + " " + prefix + piece.name + " " + piece.slice.text());
        ++compared;
      }
    }
  }
  return compared;
}

// This rank's stage and the communicator over the ranks of its stage
// (ranks [s * perStage, (s + 1) * perStage) form stage s).
std::pair<int, comm::CommPtr> stageOf(const comm::CommPtr& world, int perStage) {
  const int stage = world->rank() / perStage;
  return {stage, world->split(stage, world->rank(), "stage")};
}

// pp = 2 stages (x dp_shard = perStage ranks each) take the step and save.
TESSERA_WORKER(pp_stages_save) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  const std::string strategy = ctx.arg("strategy", "none");
  const auto [stage, stageComm] = stageOf(world, world->size() / 2);
  StageRun run(ctx.arg("tie") == "1", kSeed, stage, strategy, stageComm);
  TESSERA_CHECK_EQ(run.gpt->holdsTiedCopy(), ctx.arg("tie") == "1" && stage == 1);
  run.step();
  checkpoint::CheckpointOptions options;
  options.dir = ctx.arg("dir");
  options.compressionThreads = 1;
  checkpoint::Checkpointer ckpt(options, world);
  TESSERA_CHECK(ckpt.save(1, checkpoint::collectTrainingState(run.parts(world->rank(), world->size(), true))),
                "save skipped");
  ckpt.wait();
}

// A checkpoint (of the whole model or of stages) restored into 2 stages.
TESSERA_WORKER(pp_stages_restore) {
  at::set_num_threads(1);
  const comm::CommPtr world = ctx.world();
  const bool tie = ctx.arg("tie") == "1";
  const auto [stage, stageComm] = stageOf(world, world->size() / 2);
  StageRun run(tie, kOtherSeed, stage, ctx.arg("strategy", "none"), stageComm);
  checkpoint::restoreTrainingStateFromCheckpoint(run.parts(world->rank(), world->size(), true), ctx.arg("dir"));
  const int compared = checkHeld(run, referenceState(tie), "stage " + std::to_string(stage));
  TESSERA_CHECK(compared > 0, "stage " << stage << " holds nothing");
}

// ---- The tests ---------------------------------------------------------------

struct Scratch {
  std::string dir;
  explicit Scratch(const std::string& name)
      : dir((fs::temp_directory_path() / ("tessera-ppckpt-" + name + "-" + std::to_string(::getpid()))).string()) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() { fs::remove_all(dir); }
};

::testing::AssertionResult runOk(const std::string& worker, int ranks, std::map<std::string, std::string> args) {
  const auto result = testing::runWorkers(worker, {.ranks = ranks, .deadline = std::chrono::seconds(120), .args = args});
  if (result.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << worker << " on " << ranks << " ranks\n" << result.report();
}

// pp = 2 -> pp = 1: the whole model restored in one process.
void restoreWhole(const std::string& dir, bool tie) {
  StageRun whole(tie, kOtherSeed, -1, "none", nullptr);
  checkpoint::restoreTrainingStateFromCheckpoint(whole.parts(0, 1, false), dir);
  EXPECT_EQ(checkHeld(whole, referenceState(tie), "whole"), static_cast<int>(3 * whole.whole.size()));
}

class PipelineCheckpoint : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(PipelineCheckpoint, TwoStagesRestoreIntoTheWholeModelAndBack) {
  const auto& [strategy, tie] = GetParam();
  Scratch s(strategy + (tie ? "-tied" : "-untied"));
  const int ranks = strategy == "fsdp" ? 4 : 2;
  const std::map<std::string, std::string> args = {
      {"dir", s.dir + "/stages"}, {"strategy", strategy}, {"tie", tie ? "1" : "0"}};
  ASSERT_TRUE(runOk("pp_stages_save", ranks, args));

  const checkpoint::CheckpointIndex index = checkpoint::readIndex(checkpoint::resolveCheckpoint(s.dir + "/stages"));
  std::set<std::string> names;
  for (const auto& [name, t] : index.tensors) {
    if (name.rfind("model/", 0) == 0) names.insert(name.substr(6));
  }
  std::set<std::string> wholeNames;
  for (const auto& [name, shape] : models::gptParameterShapes(gptConfig(tie, kSeed))) wholeNames.insert(name);
  EXPECT_EQ(names, wholeNames) << "the stages' checkpoint holds the whole model's names";
  if (tie && strategy != "fsdp") {
    // Both stages hold wte.weight whole: the lowest rank writes it, once.
    EXPECT_EQ(index.tensors.at("model/wte.weight").pieces.size(), 1u);
    EXPECT_EQ(index.tensors.at("optim/exp_avg/wte.weight").pieces.size(), 1u);
  }
  restoreWhole(s.dir + "/stages", tie);

  // pp = 1 -> pp = 2: the whole model's checkpoint into the stages.
  {
    StageRun whole(tie, kSeed, -1, "none", nullptr);
    whole.step();
    checkpoint::CheckpointOptions options;
    options.dir = s.dir + "/whole";
    options.compressionThreads = 1;
    checkpoint::Checkpointer ckpt(options, comm::makeSingleRankCommunicator());
    ASSERT_TRUE(ckpt.save(1, checkpoint::collectTrainingState(whole.parts(0, 1, false))));
    ckpt.wait();
  }
  auto wholeArgs = args;
  wholeArgs["dir"] = s.dir + "/whole";
  ASSERT_TRUE(runOk("pp_stages_restore", ranks, wholeArgs));
  // pp = 2 -> pp = 2 (the same layout) too.
  ASSERT_TRUE(runOk("pp_stages_restore", ranks, args));
}

// FSDP only tied: the case where the two stages' wte pieces overlap (their
// root units flatten other parameters next to it); untied adds nothing there.
INSTANTIATE_TEST_SUITE_P(Strategies, PipelineCheckpoint,
                         ::testing::Values(std::make_tuple(std::string("none"), false),
                                           std::make_tuple(std::string("none"), true),
                                           std::make_tuple(std::string("fsdp"), true)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + (std::get<1>(info.param) ? "Tied" : "Untied");
                         });

// Without TrainingParts::wholeModel a stage sees the other stage's
// parameters as unexpected; with it, a name the whole model lacks still is.
TEST(PipelineCheckpoint, AStageNeedsTheWholeModelsNamesToRestore) {
  StageRun whole(true, kSeed, -1, "none", nullptr);
  whole.step();
  const StateDict state = checkpoint::collectTrainingState(whole.parts(0, 1, false));
  StageRun stage(true, kOtherSeed, 1, "none", nullptr);
  const checkpoint::StateSummary summary = checkpoint::StateSummary::of(state);
  try {
    checkpoint::trainingStateRequests(stage.parts(0, 1, false), summary);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unexpected parameters: blocks.0."), std::string::npos) << e.what();
  }
  const auto requests = checkpoint::trainingStateRequests(stage.parts(0, 1, true), summary);
  for (const auto& r : requests) {
    EXPECT_EQ(r.name.find("blocks.0."), std::string::npos) << "stage 1 requests " << r.name;
  }
  checkpoint::restoreTrainingState(stage.parts(0, 1, true), checkpoint::extractRanges(state, requests));
  checkHeld(stage, referenceState(true), "in memory");

  StateDict extra = state;
  extra.putReplicated("model/blocks.9.ln1.weight", at::ones({16}));
  try {
    checkpoint::trainingStateRequests(stage.parts(0, 1, true), checkpoint::StateSummary::of(extra));
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unexpected parameters: blocks.9.ln1.weight"), std::string::npos) << e.what();
  }
}

// model.init_from: the whole model's safetensors file into every stage.
TEST(PipelineCheckpoint, InitFromLoadsAWholeFileIntoEachStage) {
  Scratch s("init-from");
  const std::string file = s.dir + "/whole.safetensors";
  models::Gpt source(gptConfig(true, kSeed));
  Tensors values;
  for (const auto& item : source->named_parameters()) values[item.key()] = item.value().detach() * 3 + 1;
  checkpoint::writeSafetensors(file, values);
  const Shapes whole = models::gptParameterShapes(gptConfig(true, kSeed));

  for (int stage : {0, 1}) {
    models::Gpt part(gptConfig(true, kOtherSeed), stagePart(stage));
    EXPECT_THROW(checkpoint::loadSafetensorsInto(*part, file), InvalidArgument) << "other stage's names unexpected";
    checkpoint::loadSafetensorsInto(*part, file, &whole);
    for (const auto& item : part->named_parameters()) {
      EXPECT_TRUE(at::equal(item.value(), values.at(item.key()))) << "stage " << stage << " " << item.key();
    }
  }
  // Still an error: a name the whole model lacks, and a held name missing.
  Tensors bogus = values;
  bogus["blocks.7.ln1.weight"] = at::ones({16});
  checkpoint::writeSafetensors(file, bogus);
  models::Gpt last(gptConfig(true, kOtherSeed), stagePart(1));
  EXPECT_THROW(checkpoint::loadSafetensorsInto(*last, file, &whole), InvalidArgument);
  Tensors partial = values;
  partial.erase("wte.weight");  // the last stage's tied copy needs it
  checkpoint::writeSafetensors(file, partial);
  try {
    checkpoint::loadSafetensorsInto(*last, file, &whole);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("missing: wte.weight"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tessera
