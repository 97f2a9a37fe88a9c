// tessera-train's --checkpoint-dir / --resume and tessera-export end to end,
// as real processes under tessera-run, on a shrunk gpt-tiny config:
//   - a run resumed from its step-3 checkpoint logs the same losses as the
//     uninterrupted run, step for step (FSDP on 2 ranks);
//   - a checkpoint of FSDP on 4 ranks, resumed on 2 ranks (FSDP) and on one
//     process (no data parallelism) and saved again, holds the same model and
//     optimizer state; its safetensors export parses in Python and matches
//     the checkpoint, and loads into a fresh model;
//   - DiLoCo replicas (different between outer steps) resume exactly too;
//   - resuming into another model or optimizer fails naming the problem.
// About 30 s on 2 cores.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/core/models/gpt.h"
#include "tests/launcher/subprocess.h"

namespace tessera {
namespace {

using testing::ProcessResult;
using testing::runProcess;

const std::vector<std::string>& kForeignLaunchVars = testing::foreignLaunchVariables();

// gpt-tiny with 2 layers of width 48 and 4 sequences per rank: seconds per run.
const std::vector<std::string> kSmallGpt = {"--set", "model.n_layer=2",     "--set", "model.d_model=48",
                                            "--set", "data.batch_size=4",   "--set", "train.log_every=1",
                                            "--set", "train.eval_batches=1"};

models::GptConfig smallGptConfig() {  // kSmallGpt's model
  models::GptConfig c;
  c.vocab_size = 256;
  c.block_size = 64;
  c.n_layer = 2;
  c.n_head = 4;
  c.d_model = 48;
  c.positions = "rotary";
  c.tie_weights = true;
  return c;
}

std::vector<std::string> strategy(const std::string& name, int ranks) {
  if (name == "none") return {"--set", "parallel.strategy=none", "--set", "parallel.dp_replicate=1"};
  return {"--set", "parallel.strategy=fsdp",
          "--set", "parallel.dp_replicate=1",
          "--set", "parallel.dp_shard=" + std::to_string(ranks)};
}

// tessera-run --nproc-per-node <ranks> tessera-train --config <config> <kSmallGpt> <args...>
ProcessResult train(int ranks, const std::vector<std::vector<std::string>>& args,
                    const std::string& config = "gpt-tiny.toml") {
  std::vector<std::string> argv = {TESSERA_RUN_PATH,
                                   "--nproc-per-node",
                                   std::to_string(ranks),
                                   "--master-port",
                                   "0",
                                   TESSERA_TRAIN_PATH,
                                   "--config",
                                   std::string(TESSERA_EXAMPLE_CONFIGS) + "/" + config};
  argv.insert(argv.end(), kSmallGpt.begin(), kSmallGpt.end());
  for (const auto& a : args) argv.insert(argv.end(), a.begin(), a.end());
  return runProcess(argv, std::chrono::seconds(120), {}, kForeignLaunchVars);
}

class StateCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "state_cli_" + std::to_string(getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

std::vector<nlohmann::json> readJsonLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Every tensor of a checkpoint under `prefix`, whole, read by load().
std::map<std::string, at::Tensor> wholeTensors(const std::string& checkpoint, const std::string& prefix) {
  const std::string dir = checkpoint::resolveCheckpoint(checkpoint);
  std::vector<checkpoint::LoadRequest> requests;
  for (const auto& [name, t] : checkpoint::readIndex(dir).tensors) {
    if (name.rfind(prefix, 0) != 0) continue;
    EXPECT_EQ(t.dtype, "float32") << name;
    requests.push_back({name, t.globalShape, at::kFloat, std::nullopt});
  }
  const StateDict loaded = checkpoint::load(dir, requests, {});
  std::map<std::string, at::Tensor> out;
  for (const auto& r : requests) out[r.name] = loaded.whole(r.name).reshape(r.globalShape);
  return out;
}

void expectSameTensors(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b,
                       const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, value] : a) {
    ASSERT_TRUE(b.count(name)) << what << ": " << name;
    EXPECT_TRUE(at::equal(value, b.at(name))) << what << ": " << name;
  }
}

TEST_F(StateCli, ResumedRunLogsTheSameLossesAsTheUninterruptedRun) {
  const ProcessResult full = train(2, {strategy("fsdp", 2),
                                       {"--set", "train.steps=6", "--metrics", path("full.jsonl"), "--checkpoint-dir",
                                        path("ckpt"), "--checkpoint-every", "3", "--checkpoint-keep", "2"}});
  ASSERT_EQ(full.exitCode, 0) << full.output;
  EXPECT_TRUE(std::filesystem::exists(path("ckpt/step-00000003/index.json")));
  EXPECT_TRUE(std::filesystem::exists(path("ckpt/step-00000006/index.json")));

  const ProcessResult resumed = train(
      2, {strategy("fsdp", 2),
          {"--set", "train.steps=6", "--metrics", path("resumed.jsonl"), "--resume", path("ckpt/step-00000003")}});
  ASSERT_EQ(resumed.exitCode, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("at step 3"), std::string::npos) << resumed.output;

  const auto a = readJsonLines(path("full.jsonl"));
  const auto b = readJsonLines(path("resumed.jsonl"));
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(b[i]["step"], a[3 + i]["step"]);
    EXPECT_EQ(b[i]["loss"].get<double>(), a[3 + i]["loss"].get<double>()) << "step " << 4 + i;
    EXPECT_EQ(b[i]["tokens"], a[3 + i]["tokens"]);
    EXPECT_EQ(b[i]["lr"].get<double>(), a[3 + i]["lr"].get<double>());
  }
  EXPECT_EQ(b.back()["val_loss"].get<double>(), a.back()["val_loss"].get<double>());
}

// DiLoCo replicas differ between outer steps: each saves and restores its
// own "replica-<k>/" state. Step 3 falls inside a round (H = 2).
TEST_F(StateCli, DilocoReplicasResumeMidRoundExactly) {
  const std::vector<std::string> diloco = {
      "--set", "diloco.inner_steps=2", "--set", "parallel.strategy=none", "--set", "parallel.dp_replicate=2",
      "--set", "parallel.dp_shard=1",  "--set", "train.steps=6"};
  const ProcessResult full =
      train(2, {diloco, {"--metrics", path("full.jsonl"), "--checkpoint-dir", path("ckpt"), "--checkpoint-every", "3"}},
            "gpt-tiny-diloco.toml");
  ASSERT_EQ(full.exitCode, 0) << full.output;
  const auto index = checkpoint::readIndex(path("ckpt/step-00000003"));
  EXPECT_EQ(index.meta.at("replicas"), "2");
  EXPECT_TRUE(index.tensors.count("replica-0/model/wte.weight"));
  EXPECT_TRUE(index.tensors.count("replica-1/model/wte.weight"));
  EXPECT_FALSE(index.tensors.count("model/wte.weight"));

  const ProcessResult resumed =
      train(2, {diloco, {"--metrics", path("resumed.jsonl"), "--resume", path("ckpt/step-00000003")}},
            "gpt-tiny-diloco.toml");
  ASSERT_EQ(resumed.exitCode, 0) << resumed.output;
  const auto a = readJsonLines(path("full.jsonl"));
  const auto b = readJsonLines(path("resumed.jsonl"));
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(b[i]["loss"].get<double>(), a[3 + i]["loss"].get<double>()) << "step " << 4 + i;
  }
  EXPECT_EQ(b.back()["val_loss"].get<double>(), a.back()["val_loss"].get<double>());
}

// What Python's json + struct see in the export: the safetensors layout, and
// every tensor's values (written as JSON for the test to compare).
constexpr const char* kPythonDump = R"PY(
import json, struct, sys
data = open(sys.argv[1], 'rb').read()
(n,) = struct.unpack('<Q', data[:8])
header = json.loads(data[8:8 + n])
body = data[8 + n:]
names = [k for k in header if k != '__metadata__']
assert names == sorted(names), names
assert header['__metadata__']['format'] == 'pt'
out, end = {}, 0
for name in names:
    h = header[name]
    b, e = h['data_offsets']
    assert b == end and h['dtype'] == 'F32', (name, h)
    count = 1
    for d in h['shape']:
        count *= d
    assert e - b == 4 * count, (name, h)
    out[name] = {'shape': h['shape'], 'values': list(struct.unpack('<%df' % count, body[b:e]))}
    end = e
assert end == len(body)
json.dump(out, open(sys.argv[2], 'w'))
print('OK', len(names))
)PY";

TEST_F(StateCli, FourRankFsdpCheckpointReshardsExportsAndLoads) {
  const std::vector<std::string> twoSteps = {"--set", "train.steps=2"};
  const ProcessResult four = train(4, {strategy("fsdp", 4), twoSteps, {"--checkpoint-dir", path("fsdp4")}});
  ASSERT_EQ(four.exitCode, 0) << four.output;
  // Resumed with nothing left to train, each run saves the restored state in its own layout.
  const ProcessResult two =
      train(2, {strategy("fsdp", 2), twoSteps, {"--resume", path("fsdp4"), "--checkpoint-dir", path("fsdp2")}});
  ASSERT_EQ(two.exitCode, 0) << two.output;
  const ProcessResult one =
      train(1, {strategy("none", 1), twoSteps, {"--resume", path("fsdp4"), "--checkpoint-dir", path("none1")}});
  ASSERT_EQ(one.exitCode, 0) << one.output;
  EXPECT_EQ(checkpoint::readIndex(checkpoint::resolveCheckpoint(path("fsdp2"))).worldSize, 2);

  const auto model4 = wholeTensors(path("fsdp4"), "model/");
  ASSERT_EQ(model4.size(), 27u);  // wte + 2 x 12 per block + ln_f (2); the head is tied
  EXPECT_EQ(model4.at("model/blocks.1.mlp.fc.weight").sizes(), at::IntArrayRef({192, 48}));
  expectSameTensors(wholeTensors(path("fsdp2"), "model/"), model4, "model, 2-rank FSDP");
  expectSameTensors(wholeTensors(path("none1"), "model/"), model4, "model, one process");
  const auto optim4 = wholeTensors(path("fsdp4"), "optim/exp_avg");  // exp_avg and exp_avg_sq
  EXPECT_EQ(optim4.size(), 2 * 27u);
  expectSameTensors(wholeTensors(path("fsdp2"), "optim/exp_avg"), optim4, "optimizer, 2-rank FSDP");
  expectSameTensors(wholeTensors(path("none1"), "optim/exp_avg"), optim4, "optimizer, one process");

  // Export, then read the file with Python.
  const std::string file = path("model.safetensors");
  const ProcessResult exported =
      runProcess({TESSERA_EXPORT_PATH, "--format", "safetensors", path("fsdp4"), file}, std::chrono::seconds(60));
  ASSERT_EQ(exported.exitCode, 0) << exported.output;
  EXPECT_NE(exported.output.find("wrote 27 tensors"), std::string::npos) << exported.output;
  if (std::system("python3 -c pass >/dev/null 2>&1") == 0) {
    std::ofstream(path("dump.py")) << kPythonDump;
    const ProcessResult python =
        runProcess({"python3", path("dump.py"), file, path("dump.json")}, std::chrono::seconds(60));
    ASSERT_EQ(python.exitCode, 0) << python.output;
    std::ifstream in(path("dump.json"));
    const nlohmann::json dump = nlohmann::json::parse(in);
    ASSERT_EQ(dump.size(), model4.size());
    for (const auto& [name, value] : model4) {
      const auto& entry = dump.at(name.substr(6));
      EXPECT_EQ(entry["shape"].get<std::vector<int64_t>>(), value.sizes().vec()) << name;
      const auto values = entry["values"].get<std::vector<double>>();
      EXPECT_TRUE(at::equal(torch::tensor(values, torch::kDouble).to(torch::kFloat).reshape(value.sizes()), value))
          << name;
    }
  }

  // The export as a fresh model's initial weights.
  models::Gpt fresh(smallGptConfig());
  checkpoint::loadSafetensorsInto(*fresh, file);
  for (const auto& item : fresh->named_parameters()) {
    EXPECT_TRUE(at::equal(item.value().detach(), model4.at("model/" + item.key()))) << item.key();
  }

  // bf16 conversion on the way out.
  const ProcessResult bf16 = runProcess(
      {TESSERA_EXPORT_PATH, path("fsdp4"), path("bf16.safetensors"), "--dtype", "bf16"}, std::chrono::seconds(60));
  ASSERT_EQ(bf16.exitCode, 0) << bf16.output;
  const auto half = checkpoint::readSafetensors(path("bf16.safetensors"));
  EXPECT_EQ(half.tensors.at("wte.weight").scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(half.tensors.at("wte.weight"), model4.at("model/wte.weight").to(at::kBFloat16)));

  // FP8 export: weights as E4M3 codes of w * s with "<name>_scale_inv" = 1 / s, vectors as float32.
  const ProcessResult fp8 = runProcess(
      {TESSERA_EXPORT_PATH, path("fsdp4"), path("fp8.safetensors"), "--dtype", "f8e4m3"}, std::chrono::seconds(60));
  ASSERT_EQ(fp8.exitCode, 0) << fp8.output;
  const auto eight = checkpoint::readSafetensors(path("fp8.safetensors"));
  EXPECT_EQ(eight.fp8.at("wte.weight"), "F8_E4M3");
  EXPECT_EQ(eight.fp8.count("ln_f.weight"), 0u);  // a vector stays float32
  const at::Tensor w = model4.at("model/wte.weight");
  const double scale = std::exp2(std::floor(std::log2(448.0 / w.abs().max().item<double>())));
  EXPECT_FLOAT_EQ(eight.tensors.at("wte.weight_scale_inv").item<float>(), static_cast<float>(1.0 / scale));
  // Independent of the codec: every decoded value is within E4M3's half ulp (2^-4 relative, or the
  // subnormal step 2^-10 absolute) of w * s, and the largest hits 448 or below.
  const at::Tensor decoded = eight.tensors.at("wte.weight");
  const at::Tensor scaled = w * scale;
  const at::Tensor err = (decoded - scaled).abs();
  EXPECT_TRUE((err <= scaled.abs() * 0.0625 + std::ldexp(1.0, -10)).all().item<bool>());
  EXPECT_LE(decoded.abs().max().item<float>(), 448.0f);
  // model.init_from reads it back: decoded * scale_inv, within FP8's rounding of the original.
  models::Gpt fromFp8(smallGptConfig());
  checkpoint::loadSafetensorsInto(*fromFp8, path("fp8.safetensors"));
  const at::Tensor loaded = fromFp8->named_parameters()["wte.weight"].detach();
  EXPECT_TRUE(at::equal(loaded, decoded / scale));
  EXPECT_TRUE(at::equal(fromFp8->named_parameters()["ln_f.weight"].detach(), model4.at("model/ln_f.weight")));
}

TEST_F(StateCli, ResumingAnotherModelOrOptimizerFailsNamingIt) {
  const ProcessResult saved =
      train(1, {strategy("none", 1), {"--set", "train.steps=1", "--checkpoint-dir", path("ckpt")}});
  ASSERT_EQ(saved.exitCode, 0) << saved.output;

  const ProcessResult wider = train(
      1, {strategy("none", 1), {"--set", "train.steps=2", "--set", "model.d_model=64", "--resume", path("ckpt")}});
  EXPECT_EQ(wider.exitCode, 1);
  EXPECT_NE(wider.output.find("another model"), std::string::npos) << wider.output;
  EXPECT_NE(wider.output.find("wte.weight: checkpoint [256, 48], model [256, 64]"), std::string::npos) << wider.output;

  const ProcessResult deeper =
      train(1, {strategy("none", 1), {"--set", "train.steps=2", "--set", "model.n_layer=3", "--resume", path("ckpt")}});
  EXPECT_EQ(deeper.exitCode, 1);
  EXPECT_NE(deeper.output.find("missing parameters: blocks.2.attn.proj.bias, blocks.2.attn.proj.weight"),
            std::string::npos)
      << deeper.output;

  const ProcessResult sgd =
      train(1, {strategy("none", 1), {"--set", "train.steps=2", "--set", "optim.name=sgd", "--resume", path("ckpt")}});
  EXPECT_EQ(sgd.exitCode, 1);
  EXPECT_NE(sgd.output.find("optimizer 'sgd' needs optimizer state kind 'momentum_buffer'"), std::string::npos)
      << sgd.output;
}

}  // namespace
}  // namespace tessera
