// tessera-train's config reader: every bad key, type, value and degree is a
// ConfigError naming the exact dotted key (and, for keys, the valid ones).
#include <gtest/gtest.h>

#include <ATen/Context.h>
#include <torch/cuda.h>

#include "launcher/train_config.h"
#include "tessera/comm/nccl.h"
#include "tests/harness/checks.h"

namespace tessera::launcher {
namespace {

using testing::configErrorOf;

const std::string kMinimalGpt = R"(
[model]
kind = "gpt"
n_layer = 2
[data]
seq_len = 32
[train]
steps = 10
)";


ConfigError parseError(const std::string& toml, const std::vector<std::string>& overrides = {}) {
  return configErrorOf([&] { parseTrainJobConfig(toml, overrides); });
}

TEST(TrainConfig, ReadsEverySectionIntoTheStructs) {
  const TrainJobConfig c = parseTrainJobConfig(kMinimalGpt + R"(
[optim]
name = "sgd"
lr = 1      # an integer where a float is expected is fine
momentum = 0.5
[parallel]
dp_replicate = 2
bucket_mb = 4
)");
  EXPECT_EQ(c.model.kind, "gpt");
  EXPECT_EQ(c.model.gpt.n_layer, 2);
  EXPECT_EQ(c.data.seq_len, 32);
  EXPECT_EQ(c.train.steps, 10);
  EXPECT_EQ(c.optim.name, "sgd");
  EXPECT_DOUBLE_EQ(c.schedule.lr, 1.0);
  EXPECT_DOUBLE_EQ(c.optim.momentum, 0.5);
  EXPECT_EQ(c.parallel.mesh.dp_replicate, 2);
  EXPECT_NO_THROW(c.parallel.validate(2));
}

TEST(TrainConfig, OverridesApplyAfterTheFile) {
  const TrainJobConfig c = parseTrainJobConfig(
      kMinimalGpt, {"train.steps=3", "optim.name=sgd", "optim.lr=0.5", "model.moe.top_k=2", "data.dir=\"/tmp/x\""});
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.optim.name, "sgd");  // a bare word is a string
  EXPECT_DOUBLE_EQ(c.schedule.lr, 0.5);
  EXPECT_EQ(c.model.gpt.moe.top_k, 2);
  EXPECT_EQ(c.data.dir, "/tmp/x");
}

TEST(TrainConfig, UnknownKeyNamesItAndTheValidKeys) {
  const ConfigError e = parseError(kMinimalGpt + "[optim]\nlrr = 0.1\n");
  EXPECT_EQ(e.field(), "optim.lrr");
  EXPECT_NE(std::string(e.what()).find("unknown key (valid: name, lr, min_lr,"), std::string::npos) << e.what();
  EXPECT_EQ(parseError(kMinimalGpt, {"train.stepz=4"}).field(), "train.stepz");
  EXPECT_EQ(parseError(kMinimalGpt + "[model.moe]\nexperts = 4\n").field(), "model.moe.experts");
}

TEST(TrainConfig, ModelKeysDependOnTheKind) {
  const ConfigError e = parseError(kMinimalGpt, {"model.kind=mlp"});
  EXPECT_EQ(e.field(), "model.n_layer");
  EXPECT_NE(std::string(e.what()).find("model.kind = \"mlp\""), std::string::npos) << e.what();
  EXPECT_EQ(parseError("[model]\nkind = \"cnn\"\n").field(), "model.kind");
}

TEST(TrainConfig, UnknownSectionNamesTheValidSections) {
  const ConfigError e = parseError(kMinimalGpt + "[optimizer]\nlr = 0.1\n");
  EXPECT_EQ(e.field(), "optimizer");
  EXPECT_NE(std::string(e.what()).find("model, data, optim, diloco, demo, mt_dao, train, parallel"), std::string::npos) << e.what();
  EXPECT_EQ(parseError("steps = 3\n").field(), "steps");
}

TEST(TrainConfig, WrongTypeNamesTheKeyAndBothTypes) {
  ConfigError e = parseError(kMinimalGpt + "[parallel]\ndp_shard = \"2\"\n");
  EXPECT_EQ(e.field(), "parallel.dp_shard");
  EXPECT_NE(std::string(e.what()).find("expected an integer, got a string"), std::string::npos) << e.what();
  EXPECT_EQ(parseError(kMinimalGpt, {"train.steps=1.5"}).field(), "train.steps");
  EXPECT_EQ(parseError(kMinimalGpt, {"train.progress=1"}).field(), "train.progress");
  EXPECT_EQ(parseError(kMinimalGpt + "[optim]\nlr = \"fast\"\n").field(), "optim.lr");
  EXPECT_EQ(parseError("[model]\nkind = \"mlp\"\nhidden_sizes = [1, \"a\"]\n[data]\ndataset = \"fashion-mnist\"\n")
                .field(),
            "model.hidden_sizes");
}

TEST(TrainConfig, BadValuesNameTheField) {
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.min_lr=1.0"}).field(), "optim.min_lr");
  EXPECT_EQ(parseError(kMinimalGpt, {"model.n_head=0"}).field(), "model.n_head");
  EXPECT_EQ(parseError(kMinimalGpt, {"data.seq_len=1000"}).field(), "data.seq_len");  // > block_size
  EXPECT_EQ(parseError(kMinimalGpt, {"data.dataset=fashion-mnist"}).field(), "data.dataset");
  EXPECT_EQ(parseError(kMinimalGpt, {"train.grad_accum=0"}).field(), "train.grad_accum");
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.schedule=linear"}).field(), "optim.schedule");
}

TEST(TrainConfig, DegreesMustMultiplyToTheWorldSize) {
  TrainJobConfig c = parseTrainJobConfig(kMinimalGpt, {"parallel.dp_replicate=3"});
  ConfigError e = configErrorOf([&] { c.parallel.validate(2); });
  EXPECT_EQ(e.field(), "parallel");
  EXPECT_NE(std::string(e.what()).find("dp_replicate(3)"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("the world has 2 ranks"), std::string::npos) << e.what();

  c = parseTrainJobConfig(kMinimalGpt, {"parallel.dp_replicate=0"});
  EXPECT_EQ(configErrorOf([&] { c.parallel.validate(1); }).field(), "parallel.dp_replicate");
  c = parseTrainJobConfig(kMinimalGpt, {"parallel.tp=2"});  // tp x dp_replicate = 2 x 1
  EXPECT_NO_THROW(c.parallel.validate(2));
  e = configErrorOf([&] { c.parallel.validate(3); });  // 2 does not fill 3 ranks
  EXPECT_EQ(e.field(), "parallel");
  EXPECT_NE(std::string(e.what()).find("tp(2)"), std::string::npos) << e.what();
  c = parseTrainJobConfig(kMinimalGpt, {"parallel.dp_shard=2"});  // ddp does not shard
  EXPECT_EQ(configErrorOf([&] { c.parallel.validate(2); }).field(), "parallel.dp_shard");
  c = parseTrainJobConfig(kMinimalGpt, {"parallel.strategy=none", "parallel.dp_replicate=2"});
  EXPECT_EQ(configErrorOf([&] { c.parallel.validate(2); }).field(), "parallel.strategy");
  c = parseTrainJobConfig(kMinimalGpt, {"parallel.strategy=zero"});
  e = configErrorOf([&] { c.parallel.validate(1); });
  EXPECT_EQ(e.field(), "parallel.strategy");
  EXPECT_NE(std::string(e.what()).find("none, ddp, fsdp, hybrid"), std::string::npos) << e.what();
}

TEST(TrainConfig, TensorParallelKeysAreRead) {
  const TrainJobConfig c = parseTrainJobConfig(kMinimalGpt + R"(
[parallel]
tp = 2
dp_replicate = 2
sequence_parallel = true
)");
  EXPECT_EQ(c.parallel.mesh.tp, 2);
  EXPECT_TRUE(c.parallel.sequence_parallel);
  EXPECT_NO_THROW(c.parallel.validate(4));
  EXPECT_FALSE(parseTrainJobConfig(kMinimalGpt).parallel.sequence_parallel);  // off by default
  // With tp = 1 sequence parallelism has nothing to split: accepted, no effect.
  EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.sequence_parallel=true", "data.seq_len=31"}));
  EXPECT_EQ(parseError(kMinimalGpt, {"parallel.sequence_parallel=1"}).field(), "parallel.sequence_parallel");
  // Every strategy and optimizer composes with tp, on a GPT (DeMo: not fsdp, with or without tp).
  for (const std::string& strategy : {"none", "ddp", "fsdp", "hybrid"}) {
    EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.tp=2", "parallel.strategy=" + strategy})) << strategy;
  }
  for (const std::string& optimizer : {"sgd", "diloco", "demo", "mt-dao"}) {
    EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.tp=2", "optim.name=" + optimizer})) << optimizer;
  }
  EXPECT_EQ(parseError(kMinimalGpt, {"parallel.tp=2", "optim.name=demo", "parallel.strategy=fsdp"}).field(),
            "parallel.strategy");
}

// The errors name the key to change and both numbers, at parse time (before any process builds a mesh).
TEST(TrainConfig, TensorParallelErrorsNameTheKeyAndBothNumbers) {
  ConfigError e = parseError(kMinimalGpt, {"parallel.tp=3"});  // n_head = 4 by default
  EXPECT_EQ(e.field(), "model.n_head");
  EXPECT_NE(std::string(e.what()).find("model.n_head (4) must be divisible by parallel.tp (3)"), std::string::npos)
      << e.what();
  EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.tp=3", "model.n_head=6", "model.d_model=96"}));

  e = parseError(kMinimalGpt, {"parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=30"});
  EXPECT_EQ(e.field(), "data.seq_len");
  EXPECT_NE(std::string(e.what()).find("data.seq_len (30) must be divisible by parallel.tp (4)"), std::string::npos)
      << e.what();
  EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.tp=4", "data.seq_len=30"}));  // no SP: any length

  e = parseError("[model]\nkind = \"mlp\"\n[data]\ndataset = \"fashion-mnist\"\n[parallel]\ntp = 2\n");
  EXPECT_EQ(e.field(), "parallel.tp");
  EXPECT_NE(std::string(e.what()).find("model.kind = \"mlp\" runs with parallel.tp = 1, got 2"), std::string::npos)
      << e.what();

  // Experts: ep needs an MoE model whose experts it divides; DTD needs tp.
  e = parseError(kMinimalGpt, {"parallel.ep=2"});
  EXPECT_EQ(e.field(), "parallel.ep");
  EXPECT_NE(std::string(e.what()).find("model.use_moe = true"), std::string::npos) << e.what();
  e = parseError(kMinimalGpt, {"parallel.ep=3", "model.use_moe=true", "model.moe.num_experts=4"});
  EXPECT_EQ(e.field(), "model.moe.num_experts");
  EXPECT_NE(std::string(e.what()).find("(4) must be divisible by parallel.ep (3)"), std::string::npos) << e.what();
  e = parseError(kMinimalGpt, {"parallel.moe_dtd=true", "model.use_moe=true"});
  EXPECT_EQ(e.field(), "parallel.moe_dtd");

  // A vocabulary tp does not divide is padded (257 -> 2 x 129); one that leaves a rank no row is refused.
  EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, {"parallel.tp=2", "model.vocab_size=257"}));
  e = parseError(kMinimalGpt, {"parallel.tp=4", "model.vocab_size=5"});  // rows of 2: 2 + 2 + 1 + 0
  EXPECT_EQ(e.field(), "model.vocab_size");
  EXPECT_NE(std::string(e.what()).find("model.vocab_size (5)"), std::string::npos) << e.what();
}

TEST(TrainConfig, SyntaxErrorsAndBadOverridesAreInvalidArguments) {
  EXPECT_THROW(parseTrainJobConfig("[model\n"), InvalidArgument);
  EXPECT_THROW(parseTrainJobConfig(kMinimalGpt, {"steps=3"}), InvalidArgument);
  EXPECT_THROW(parseTrainJobConfig(kMinimalGpt, {"train.steps"}), InvalidArgument);
  EXPECT_THROW(loadTrainJobConfig("/nonexistent/tessera.toml"), InvalidArgument);
}

TEST(TrainConfig, ShippedConfigsAreValidOnTwoRanks) {
  for (const char* name : {"gpt-tiny.toml", "mnist-mlp.toml"}) {
    const TrainJobConfig c = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/" + name);
    EXPECT_NO_THROW(c.parallel.validate(2)) << name;
  }
}

TEST(TrainConfig, ShippedTensorParallelConfigIsValidOnFourRanks) {
  const TrainJobConfig c = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-tp2.toml");
  EXPECT_EQ(c.parallel.mesh.tp, 2);
  EXPECT_NO_THROW(c.parallel.validate(4));
  EXPECT_NO_THROW(loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-tp2.toml",
                                     {"parallel.sequence_parallel=true"}));
}

TEST(TrainConfig, PipelineKeysAreRead) {
  const TrainJobConfig c = parseTrainJobConfig(
      kMinimalGpt, {"parallel.pp=2", "pipeline.schedule=zb_v", "pipeline.microbatches=4", "model.n_layer=4",
                    "pipeline.layers_per_stage=[1, 1, 1, 1]", "pipeline.offload=selective",
                    "pipeline.offload_budget_mb=64", "train.post_validation=off"});
  EXPECT_EQ(c.parallel.mesh.pp, 2);
  EXPECT_EQ(c.parallel.pipeline.schedule, "zb_v");
  EXPECT_EQ(c.parallel.pipeline.microBatchesFor(2), 4);
  EXPECT_EQ(c.parallel.pipeline.chunksPerRank(), 2);
  EXPECT_EQ(c.parallel.pipeline.layers_per_stage, (std::vector<int64_t>{1, 1, 1, 1}));
  EXPECT_EQ(c.parallel.pipeline.offload, "selective");
  EXPECT_EQ(c.parallel.pipeline.offload_budget_mb, 64);
  EXPECT_EQ(c.train.post_validation, "off");
  EXPECT_EQ(parseTrainJobConfig(kMinimalGpt, {"parallel.pp=2"}).parallel.pipeline.microBatchesFor(2), 2);  // M = pp
}

TEST(TrainConfig, PipelineErrorsNameTheKeyAndTheChoices) {
  ConfigError e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.schedule=zb_h3"});
  EXPECT_EQ(e.field(), "pipeline.schedule");
  EXPECT_NE(std::string(e.what()).find("zb_v"), std::string::npos) << e.what();  // lists the valid ones
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.microbatches=3"});  // data.batch_size = 8 by default
  EXPECT_EQ(e.field(), "pipeline.microbatches");
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.schedule=interleaved_1f1b", "pipeline.microbatches=1",
                               "model.n_layer=4"});
  EXPECT_EQ(e.field(), "pipeline.microbatches") << e.what();  // M % p
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.schedule=interleaved_1f1b", "pipeline.virtual_stages=1"});
  EXPECT_EQ(e.field(), "pipeline.virtual_stages");
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.schedule=zb_v"});  // 4 chunks, 2 blocks
  EXPECT_EQ(e.field(), "pipeline.layers_per_stage") << e.what();
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.layers_per_stage=[2, 1]"});
  EXPECT_EQ(e.field(), "pipeline.layers_per_stage") << e.what();
  e = parseError(kMinimalGpt, {"parallel.pp=2", "pipeline.offload=some"});
  EXPECT_EQ(e.field(), "pipeline.offload");
  EXPECT_EQ(parseError(kMinimalGpt, {"train.post_validation=maybe"}).field(), "train.post_validation");
}

TEST(TrainConfig, ShippedPipelineConfigsAreValid) {
  const TrainJobConfig tiny = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-pp2.toml");
  EXPECT_EQ(tiny.parallel.mesh.pp, 2);
  EXPECT_NO_THROW(tiny.parallel.validate(4));
  const TrainJobConfig bench = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-pp-bench.toml");
  EXPECT_NO_THROW(bench.parallel.validate(2));
}

TEST(TrainConfig, ShippedDilocoConfigIsValidOnFourRanks) {
  const TrainJobConfig c = loadTrainJobConfig(std::string(TESSERA_EXAMPLE_CONFIGS) + "/gpt-tiny-diloco.toml");
  EXPECT_EQ(c.optimizer, "diloco");
  EXPECT_EQ(c.optim.name, "adamw");  // the inner optimizer
  EXPECT_EQ(c.diloco.compression, "int8");
  EXPECT_NO_THROW(c.parallel.validate(4, c.localUpdates()));
}

TEST(TrainConfig, CommunicationLightOptimizersReadTheirSections) {
  const TrainJobConfig d = parseTrainJobConfig(kMinimalGpt + R"(
[optim]
name = "diloco"
[diloco]
inner = "sgd"
inner_steps = 7
fragments = 7
delay = 0
mixing = 0.5
[parallel]
strategy = "none"
dp_replicate = 2
)");
  EXPECT_TRUE(d.localUpdates());
  EXPECT_EQ(d.optim.name, "sgd");
  EXPECT_EQ(d.diloco.inner_steps, 7);
  EXPECT_EQ(d.diloco.fragments, 7);
  EXPECT_DOUBLE_EQ(d.diloco.mixing, 0.5);
  EXPECT_NO_THROW(d.parallel.validate(2, true));

  const TrainJobConfig m = parseTrainJobConfig(kMinimalGpt + R"(
[optim]
name = "mt-dao"
[mt_dao]
betas = [0.9, 0.999]
nus = [0.3, 0.5]
sync_momenta = [4, 8]
sync_params = 16
)");
  EXPECT_EQ(m.mt_dao.betas, (std::vector<double>{0.9, 0.999}));
  EXPECT_EQ(m.mt_dao.sync_momenta, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(m.mt_dao.sync_params, 16);

  const TrainJobConfig demo = parseTrainJobConfig(kMinimalGpt, {"optim.name=demo", "demo.compression_topk=8"});
  EXPECT_EQ(demo.demo.compression_topk, 8);
}

TEST(TrainConfig, CommunicationLightOptimizerErrorsNameTheField) {
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=adam"}).field(), "optim.name");
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=diloco", "diloco.inner=demo"}).field(), "diloco.inner");
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=diloco", "diloco.inner_steps=0"}).field(), "diloco.inner_steps");
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=demo", "parallel.strategy=fsdp"}).field(), "parallel.strategy");
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=mt-dao", "mt_dao.nus=[0.9, 0.9]"}).field().rfind("mt_dao.", 0), 0u);
  EXPECT_EQ(parseError(kMinimalGpt, {"optim.name=mt-dao", "mt_dao.betas=[\"x\"]"}).field(), "mt_dao.betas");
  // Inside a replica: hybrid would replicate twice; none needs one rank per replica.
  const TrainJobConfig hybrid = parseTrainJobConfig(kMinimalGpt, {"optim.name=diloco", "parallel.strategy=hybrid"});
  EXPECT_EQ(configErrorOf([&] { hybrid.parallel.validate(1, true); }).field(), "parallel.strategy");
  const TrainJobConfig none =
      parseTrainJobConfig(kMinimalGpt, {"optim.name=diloco", "parallel.strategy=none", "parallel.dp_shard=2"});
  EXPECT_EQ(configErrorOf([&] { none.parallel.validate(2, true); }).field(), "parallel.dp_shard");
}

TEST(TrainConfig, ElasticAndFaultSectionsAreReadAndChecked) {
  const TrainJobConfig c = parseTrainJobConfig(
      kMinimalGpt, {"elastic.heartbeat_interval_s=0.5", "elastic.heartbeat_timeout_s=3.0", "elastic.min_nodes=2",
                    "faults.plan=\"kill:rank=1,step=7;slow:rank=0,factor=2\""});
  EXPECT_EQ(c.elastic.heartbeat_interval_s, 0.5);
  EXPECT_EQ(c.elastic.heartbeat_timeout_s, 3.0);
  EXPECT_EQ(c.elastic.min_nodes, 2);
  EXPECT_EQ(c.fault_plan, "kill:rank=1,step=7;slow:rank=0,factor=2");
  EXPECT_EQ(parseError(kMinimalGpt, {"elastic.heartbeat_timeout_s=1.0"}).field(), "elastic.heartbeat_timeout_s");
  EXPECT_EQ(parseError(kMinimalGpt, {"elastic.max_retries=0"}).field(), "elastic.max_retries");
  EXPECT_EQ(parseError(kMinimalGpt, {"faults.plan=\"explode:rank=1\""}).field(), "faults.plan");
  EXPECT_EQ(parseError(kMinimalGpt, {"elastic.bogus=1"}).field(), "elastic.bogus");
  // The run's plan joins the config's with --fault; a bad flag is a config error too.
  const comm::FaultPlan plan = runFaultPlan(c, "delay:fraction=0.5,ms=3");
  EXPECT_EQ(plan.kills.size(), 1u);
  EXPECT_EQ(plan.slow.size(), 1u);
  EXPECT_EQ(plan.delays.size(), 1u);
  EXPECT_EQ(configErrorOf([&] { runFaultPlan(c, "kill:step=3"); }).field(), "faults.plan");
}

// train.device: its spelling is the parser's check (no CUDA call: "cuda"
// parses on a machine without one); the device's existence is startup's.
TEST(TrainConfig, TrainDeviceIsReadAndItsSpellingChecked) {
  EXPECT_EQ(parseTrainJobConfig(kMinimalGpt).train.device, "cpu");
  for (const std::string device : {"cpu", "cuda", "cuda:0", "cuda:3"}) {
    EXPECT_EQ(parseTrainJobConfig(kMinimalGpt, {"train.device=" + device}).train.device, device);
  }
  for (const std::string bad : {"gpu", "CUDA", "cuda:", "cuda:-1", "cuda:1x", "cuda0", ""}) {
    const ConfigError e = parseError(kMinimalGpt, {"train.device=\"" + bad + "\""});
    EXPECT_EQ(e.field(), "train.device") << bad;
    EXPECT_NE(std::string(e.what()).find("\"cuda:N\""), std::string::npos) << e.what();
  }
  const DeviceSpec local = parseDeviceSpec("cuda");
  EXPECT_TRUE(local.cuda);
  EXPECT_EQ(local.index, -1);
  EXPECT_EQ(parseDeviceSpec("cuda:2").index, 2);
  EXPECT_FALSE(parseDeviceSpec("cpu").cuda);
  EXPECT_TRUE(resolveDevice("cpu", 3).is_cpu());
}

// The startup check on a machine without CUDA (this one: CPU-only libtorch).
TEST(TrainConfig, CudaDeviceWithoutCudaNamesTrainDevice) {
  if (at::hasCUDA() && torch::cuda::device_count() > 0) GTEST_SKIP() << "CUDA is available here";
  for (const std::string device : {"cuda", "cuda:0"}) {
    const ConfigError e = configErrorOf([&] { resolveDevice(device, 0); });
    EXPECT_EQ(e.field(), "train.device");
    const std::string text = e.what();
    EXPECT_TRUE(text.find("has no CUDA") != std::string::npos ||
                text.find("no CUDA device is visible") != std::string::npos) << text;
    EXPECT_NE(text.find("train.device = \"cpu\""), std::string::npos) << text;  // the fix
  }
}

TEST(TrainConfig, NcclBackendNeedsACudaDevice) {
  const ConfigError onCpu = parseError(kMinimalGpt, {"parallel.backend=nccl"});
  EXPECT_EQ(onCpu.field(), "parallel.backend");
  EXPECT_NE(std::string(onCpu.what()).find("set train.device = \"cuda\""), std::string::npos) << onCpu.what();
  if (comm::ncclBackendBuilt()) {
    EXPECT_EQ(parseTrainJobConfig(kMinimalGpt, {"parallel.backend=nccl", "train.device=cuda"}).parallel.backend,
              "nccl");
  } else {
    const ConfigError e = parseError(kMinimalGpt, {"parallel.backend=nccl", "train.device=cuda"});
    EXPECT_EQ(e.field(), "parallel.backend");
    EXPECT_NE(std::string(e.what()).find("-DTESSERA_WITH_NCCL=ON"), std::string::npos) << e.what();
  }
  EXPECT_EQ(parseTrainJobConfig(kMinimalGpt, {"train.device=cuda"}).parallel.backend, "auto");
  const TrainJobConfig ucc = parseTrainJobConfig(kMinimalGpt, {"parallel.backend=ucc"});
  EXPECT_EQ(configErrorOf([&] { ucc.parallel.validate(1); }).field(), "parallel.backend");  // resolve()'s check
}

// What keeps CPU buffers or CPU codecs is refused on CUDA at parse time,
// naming the key to change; the same keys are fine on the CPU.
TEST(TrainConfig, CudaRefusesWhatRunsOnTheCpuOnly) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"parallel.backend=gloo"}, "parallel.backend"},
      {{"parallel.strategy=fsdp", "parallel.dp_shard=2"}, "parallel.strategy"},
      {{"parallel.pp=2"}, "parallel.pp"},
      {{"optim.name=diloco"}, "optim.name"},
      {{"optim.name=demo"}, "optim.name"},
      {{"precision.mode=fp8"}, "precision.mode"},
      {{"parallel.grad_comm=fp8"}, "parallel.grad_comm"},
  };
  for (const auto& [overrides, key] : cases) {
    EXPECT_NO_THROW(parseTrainJobConfig(kMinimalGpt, overrides)) << key;
    std::vector<std::string> onCuda = overrides;
    onCuda.push_back("train.device=cuda");
    const ConfigError e = parseError(kMinimalGpt, onCuda);
    EXPECT_EQ(e.field(), key) << e.what();
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
  }
  // What runs there: DDP, SGD, bf16.
  EXPECT_NO_THROW(parseTrainJobConfig(
      kMinimalGpt, {"train.device=cuda", "optim.name=sgd", "precision.mode=bf16", "parallel.grad_comm=bf16"}));
}

}  // namespace
}  // namespace tessera::launcher
