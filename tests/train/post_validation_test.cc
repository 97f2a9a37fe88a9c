// The training step's non-finite check (a step whose global gradient norm is
// NaN/Inf is skipped and reported) and optimizer post-validation across
// pipeline stages (Zero Bubble §4): two real stage processes stepping
// optimistically end with the same bits as an independent synchronous loop
// written here, with steps that clip, steps that do not, and an Inf step.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <thread>

#include "tessera/optim/grad_clip.h"
#include "tessera/parallel/pipeline/post_validation.h"
#include "tessera/train/trainer.h"
#include "tests/harness/multiprocess.h"
#include "tests/harness/fixtures.h"

namespace tessera {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

using testing::syntheticDataset;

std::unique_ptr<BatchSource> makeTrainSource() {
  data::DistributedSampler::Options so;
  so.batchSize = 8;
  so.seed = 3;
  return makeBatchSource(syntheticDataset(), so);
}

optim::LrSchedule schedule(int64_t steps) {
  optim::LrScheduleConfig lc;
  lc.lr = 0.05;
  lc.min_lr = 0.005;
  lc.warmup_steps = 2;
  return optim::makeLrSchedule(lc, steps);
}

// Wraps a model so that the training forwards of `infSteps` (0-based, as the
// executor passes them) make every gradient non-finite: the loss times Inf.
class InjectInf final : public TrainableModel {
 public:
  InjectInf(std::unique_ptr<TrainableModel> inner, std::set<int64_t> infSteps)
      : inner_(std::move(inner)), infSteps_(std::move(infSteps)) {}
  torch::nn::Module& module() override { return inner_->module(); }
  at::Tensor loss(const Batch& batch) override {
    at::Tensor l = inner_->loss(batch);
    return infSteps_.count(step_) != 0 ? l * kInf : l;
  }
  void setRandomKey(int64_t step, int64_t microBatch) override {
    step_ = step;
    inner_->setRandomKey(step, microBatch);
  }

 private:
  std::unique_ptr<TrainableModel> inner_;
  std::set<int64_t> infSteps_;
  int64_t step_ = -1;
};

at::Tensor flat(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> parts;
  for (const auto& t : tensors) parts.push_back(t.detach().flatten().clone());
  return torch::cat(parts);
}

// ---- One process: the Inf step is skipped and reported. ----

TEST(NonFiniteStep, IsSkippedAndReported) {
  const std::string path = ::testing::TempDir() + "postval_metrics_" + std::to_string(getpid()) + ".jsonl";
  constexpr int64_t kInfStep = 2;  // the third step: report.step 3
  models::MlpClassifierConfig mc;
  mc.input_dim = 8;
  mc.hidden_sizes = {16};
  mc.num_classes = 3;
  models::MlpClassifier mlp(mc);
  InjectInf model(makeTrainable(mlp), {kInfStep});
  auto dp = parallel::makeNoDataParallel(*mlp);
  auto optimizer = optim::makeOptimizer(optim::OptimizerConfig{}, dp->optimizerParameters(), 0.05);
  auto train = makeTrainSource();
  std::vector<StepReport> reports;
  {
    MetricsWriter writer(path);
    TrainerParts p;
    p.model = &model;
    p.dp = dp.get();
    p.optimizer = optimizer.get();
    p.schedule = schedule(6);
    p.train = train.get();
    p.metrics = &writer;
    TrainConfig c;
    c.steps = 6;
    c.clip = 1.0;
    c.eval_batches = 0;
    c.log_every = 4;  // lines after steps 4 and 6, plus the skipped step 3
    c.progress = false;
    Trainer trainer(p, c);

    at::Tensor before;
    optim::OptimizerState stateBefore;
    trainer.callbacks().beforeStep.push_back([&](int64_t step) {
      if (step != kInfStep) return;
      before = flat(dp->optimizerParameters());
      stateBefore = trainer.snapshot().optimizer;
    });
    trainer.callbacks().afterStep.push_back([&](const StepReport& r) {
      reports.push_back(r);
      const at::Tensor now = flat(dp->optimizerParameters());
      if (r.step == kInfStep + 1) {  // skipped: nothing changed
        testing::expectTensorsEqual(now, before, "parameters across the skipped step");
        const optim::OptimizerState after = trainer.snapshot().optimizer;
        EXPECT_EQ(after.scalars, stateBefore.scalars);
        for (const char* kind : {"exp_avg", "exp_avg_sq"}) {
          testing::expectTensorsEqual(flat(after.perParameter.at(kind)), flat(stateBefore.perParameter.at(kind)),
                                      std::string(kind) + " across the skipped step");
        }
        for (const auto& p : dp->optimizerParameters()) {
          EXPECT_TRUE(p.grad().defined() && (p.grad() == 0).all().item<bool>()) << "gradients not zeroed";
        }
      } else if (r.step == kInfStep + 2) {  // the next step updates again
        EXPECT_FALSE(torch::equal(now, before)) << "the step after the skipped one changed nothing";
      }
    });
    trainer.run();
    EXPECT_EQ(trainer.step(), 6);
    EXPECT_EQ(trainer.snapshot().optimizer.scalars.at("step"), "5");  // AdamW stepped 5 times of 6
  }
  ASSERT_EQ(reports.size(), 6u);
  for (const StepReport& r : reports) {
    const bool infStep = r.step == kInfStep + 1;
    EXPECT_EQ(r.skipped, infStep) << "step " << r.step;
    EXPECT_EQ(std::isfinite(r.gradNorm), !infStep) << "step " << r.step << " norm " << r.gradNorm;
    EXPECT_EQ(r.skippedSteps, r.step > kInfStep ? 1 : 0) << "step " << r.step;
    EXPECT_EQ(r.tokens, r.step * 8) << "the skipped step's batch still counts";
  }

  std::ifstream in(path);
  std::string line;
  std::vector<nlohmann::json> lines;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["step"], 3);
  EXPECT_EQ(lines[0]["skipped"], true) << lines[0].dump();
  EXPECT_EQ(lines[0]["skipped_steps"], 1) << lines[0].dump();
  for (size_t i = 1; i < lines.size(); ++i) {
    EXPECT_FALSE(lines[i].contains("skipped")) << lines[i].dump();
    EXPECT_EQ(lines[i]["skipped_steps"], 1) << lines[i].dump();
  }
  EXPECT_EQ(lines[1]["step"], 4);
  EXPECT_EQ(lines[2]["step"], 6);
  std::remove(path.c_str());
}

TEST(NonFiniteStep, PostValidationConfigIsChecked) {
  TrainConfig c;
  c.post_validation = "on";
  try {
    c.validate();
    FAIL() << "post_validation 'on' accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "train.post_validation");
  }
  c.post_validation = "off";
  c.validate();
}

// ---- Two stages. ----

// Stage s of a two-layer tanh MLP (8 -> 16 -> 3, no biases) trains layer s
// and holds the other layer frozen at its initial value, so the stages own
// disjoint parameters with different gradient norms, as pipeline stages do.
struct HalfMlpImpl : torch::nn::Module {
  explicit HalfMlpImpl(int stage) {
    torch::manual_seed(5);
    const at::Tensor w1 = torch::randn({16, 8}) * 0.6;
    const at::Tensor w2 = torch::randn({3, 16}) * 0.6;
    first = stage == 0 ? register_parameter("w1", w1) : w1;
    second = stage == 1 ? register_parameter("w2", w2) : w2;
  }
  at::Tensor loss(const Batch& b) {
    const at::Tensor logits = torch::tanh(b.inputs.matmul(first.t())).matmul(second.t());  // (B, 3)
    return torch::nn::functional::cross_entropy(logits, b.targets);
  }
  at::Tensor first, second;
};
TORCH_MODULE(HalfMlp);

class HalfMlpModel final : public TrainableModel {
 public:
  explicit HalfMlpModel(HalfMlp m) : m_(std::move(m)) {}
  torch::nn::Module& module() override { return *m_; }
  at::Tensor loss(const Batch& batch) override { return m_->loss(batch); }

 private:
  HalfMlp m_;
};

constexpr int64_t kSteps = 10;
// Inf steps, on stage 1 only: stage 0's own norm is finite, so it steps
// optimistically and must roll back. Step 0 also un-creates the state its
// optimistic step created (SGD's momentum buffer starts as the first gradient).
const std::set<int64_t> kStageInfSteps = {0, 4};
constexpr int kInfStage = 1;
constexpr double kClip = 1.75;        // between the run's norms: some steps clip, some do not

struct Stage {
  HalfMlp mlp;
  std::unique_ptr<TrainableModel> model;
  std::unique_ptr<parallel::DataParallel> dp;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<BatchSource> train;

  Stage(int stage, const std::string& optimizerName) : mlp(stage) {
    const std::set<int64_t> infSteps = stage == kInfStage ? kStageInfSteps : std::set<int64_t>{};
    model = std::make_unique<InjectInf>(std::make_unique<HalfMlpModel>(mlp), infSteps);
    dp = parallel::makeNoDataParallel(*mlp);
    optim::OptimizerConfig oc;
    oc.name = optimizerName;
    oc.momentum = optimizerName == "sgd" ? 0.9 : 0.0;
    optimizer = optim::makeOptimizer(oc, dp->optimizerParameters(), 0.05);
    train = makeTrainSource();
  }
};

// The synchronous step written out, both stages in this process: norm over
// both stages, skip when not finite, else clip then step. Returns each
// stage's parameters; counts the steps that clipped and that did not.
std::vector<at::Tensor> referenceRun(const std::string& optimizerName, int& clipped, int& unclipped, int& skipped,
                                     std::string& norms) {
  Stage stages[2] = {Stage(0, optimizerName), Stage(1, optimizerName)};
  const optim::LrSchedule lr = schedule(kSteps);
  for (int64_t step = 0; step < kSteps; ++step) {
    double squares[2];
    for (int s = 0; s < 2; ++s) {
      stages[s].optimizer->setLearningRate(lr(step));
      stages[s].model->setRandomKey(step, 0);
      stages[s].model->loss(stages[s].train->next()).backward();
      const double n = parallel::localGradNorm(stages[s].dp->optimizerParameters());
      squares[s] = n * n;
    }
    const double norm = std::sqrt(squares[0] + squares[1]);
    norms += " " + std::to_string(norm);
    if (!std::isfinite(norm)) {
      ++skipped;
    } else {
      const double scale = optim::clipScale(norm, kClip);
      (scale < 1.0 ? clipped : unclipped)++;
      for (Stage& st : stages) {
        if (scale < 1.0) {
          for (auto& p : st.dp->optimizerParameters()) p.mutable_grad().mul_(scale);
        }
        st.optimizer->step();
      }
    }
    for (Stage& st : stages) st.optimizer->zeroGrad();
  }
  return {flat(stages[0].dp->optimizerParameters()), flat(stages[1].dp->optimizerParameters())};
}

// This rank is stage `rank`; the Trainer with a CrossStageNorm over the world.
at::Tensor stageRun(const comm::CommPtr& world, const std::string& optimizerName, const std::string& postValidation,
                    std::vector<StepReport>& reports) {
  Stage stage(world->rank(), optimizerName);
  TrainerParts p;
  p.model = stage.model.get();
  p.dp = stage.dp.get();
  p.optimizer = stage.optimizer.get();
  p.schedule = schedule(kSteps);
  p.train = stage.train.get();
  p.reportsProgress = world->rank() == 1;
  p.stageNorm = parallel::pipeline::makeCrossStageNorm(world);
  TrainConfig c;
  c.steps = kSteps;
  c.clip = kClip;
  c.eval_batches = 0;
  c.progress = false;
  c.post_validation = postValidation;
  Trainer trainer(p, c);
  TESSERA_CHECK(trainer.postValidates() == (postValidation == "auto"),
                "post_validation '" << postValidation << "' but postValidates() = " << trainer.postValidates());
  trainer.callbacks().afterStep.push_back([&](const StepReport& r) { reports.push_back(r); });
  trainer.run();
  return flat(stage.dp->optimizerParameters());
}

TESSERA_WORKER(post_validation_matches_synchronous) {
  const comm::CommPtr world = ctx.world();
  const std::string optimizerName = ctx.arg("optim");
  int clipped = 0, unclipped = 0, skipped = 0;
  std::string norms;
  const std::vector<at::Tensor> reference = referenceRun(optimizerName, clipped, unclipped, skipped, norms);
  TESSERA_CHECK(clipped >= 2 && unclipped >= 2 && skipped == 2,
                "the run must have steps that clip and steps that do not: clipped " << clipped << ", unclipped "
                                                                                    << unclipped << ", skipped "
                                                                                    << skipped << "; norms" << norms);
  for (const std::string mode : {"auto", "off"}) {
    std::vector<StepReport> reports;
    const at::Tensor mine = stageRun(world, optimizerName, mode, reports);
    testing::expectTensorsEqual(mine, reference[world->rank()],
                                "stage " + std::to_string(world->rank()) + " parameters, post_validation " + mode);
    TESSERA_CHECK(reports.size() == static_cast<size_t>(kSteps), "reports: " << reports.size());
    for (const StepReport& r : reports) {
      const bool infStep = kStageInfSteps.count(r.step - 1) != 0;
      int64_t skippedSoFar = 0;
      for (int64_t s : kStageInfSteps) skippedSoFar += s < r.step ? 1 : 0;
      TESSERA_CHECK(r.skipped == infStep, mode << ": step " << r.step << " skipped = " << r.skipped);
      TESSERA_CHECK(r.skippedSteps == skippedSoFar, mode << ": step " << r.step << " skipped_steps " << r.skippedSteps);
    }
  }
}

TEST(PostValidation, TwoStagesAdamWMatchTheSynchronousStepBitForBit) {
  auto result = testing::runWorkers("post_validation_matches_synchronous", {.ranks = 2, .args = {{"optim", "adamw"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

// SGD with momentum creates its buffer on the first step: a rolled-back first
// step must un-create it.
TEST(PostValidation, TwoStagesSgdMomentumMatchTheSynchronousStepBitForBit) {
  auto result = testing::runWorkers("post_validation_matches_synchronous", {.ranks = 2, .args = {{"optim", "sgd"}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

// A stage that never contributes: the others' finish() times out naming it.
TESSERA_WORKER(cross_stage_norm_names_missing_stage) {
  const comm::CommPtr world = ctx.world(std::chrono::seconds(1));
  if (world->rank() == 1) {
    // Alive but never starting, for longer than rank 0's 1 s timeout plus its diagnosis grace.
    std::this_thread::sleep_for(std::chrono::seconds(3));
    return;
  }
  auto norm = parallel::pipeline::makeCrossStageNorm(world);
  norm->start(1.0);
  try {
    norm->finish();
  } catch (const TimeoutError& e) {
    const std::string what = e.what();
    TESSERA_CHECK(what.find("missing stages") != std::string::npos &&
                      what.find("did not arrive") != std::string::npos && what.find(": 1") != std::string::npos,
                  "message does not name stage 1: " << what);
    return;
  }
  TESSERA_CHECK(false, "finish() returned without stage 1");
}

TEST(PostValidation, MissingStageTimesOutNamingIt) {
  auto result = testing::runWorkers("cross_stage_norm_names_missing_stage", {.ranks = 2});
  ASSERT_TRUE(result.ok()) << result.report();
}

// Three stages sum in stage order; the sum is the same on every stage.
TESSERA_WORKER(cross_stage_norm_sums_stages) {
  const comm::CommPtr world = ctx.world();
  auto norm = parallel::pipeline::makeCrossStageNorm(world);
  for (int step = 0; step < 3; ++step) {
    const double mine = step == 2 && world->rank() == 2 ? kInf : 0.1 * (world->rank() + 1) + step;
    norm->start(mine);
    const double total = norm->finish();
    double expected = 0;
    for (int r = 0; r < world->size(); ++r) expected += step == 2 && r == 2 ? kInf : 0.1 * (r + 1) + step;
    TESSERA_CHECK(total == expected, "step " << step << ": " << total << " != " << expected);
  }
  bool threw = false;
  try {
    norm->finish();  // no start(): a caller bug
  } catch (const InvalidArgument&) {
    threw = true;
  }
  TESSERA_CHECK(threw, "finish() without start() did not throw");
}

TEST(PostValidation, CrossStageNormSumsEveryStage) {
  auto result = testing::runWorkers("cross_stage_norm_sums_stages", {.ranks = 3});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera
