// A format-1 checkpoint written by tessera before N-D slices
// (tests/checkpoint/fixtures/README.md: FSDP on 2 ranks, AdamW, every piece a
// flat range) still loads: whole, into today's GPT under FSDP on 2 ranks
// (this build's layout), as dim-1 boxes (a layout format 1 never had), and
// through the safetensors export. The reference is the safetensors file the
// old build's tessera-export wrote from the same checkpoint.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/core/models/gpt.h"
#include "tessera/parallel/fsdp.h"
#include "tests/harness/multiprocess.h"

namespace tessera::checkpoint {
namespace {

namespace fs = std::filesystem;

// The fixture unpacked once per process into a fresh directory.
std::string fixtureDir() {
  static const std::string dir = [] {
    const std::string out = (fs::temp_directory_path() / ("tessera-v1-fixture-" + std::to_string(::getpid()))).string();
    fs::remove_all(out);
    fs::create_directories(out);
    const std::string command = "tar -xzf " + std::string(TESSERA_CHECKPOINT_FIXTURES) + "/v1-fsdp2-adamw.tar.gz -C " + out;
    TESSERA_CHECK(std::system(command.c_str()) == 0, "cannot unpack the fixture: " << command);
    return out;
  }();
  return dir;
}

// The fixture's model (fixtures/README.md).
models::GptConfig fixtureGpt() {
  models::GptConfig c;
  c.vocab_size = 256;
  c.block_size = 64;
  c.n_layer = 1;
  c.d_model = 16;
  c.n_head = 2;
  c.positions = "rotary";
  c.tie_weights = true;
  return c;
}

// The values of slice `s` of `full`, by tensor indexing.
at::Tensor sliceOf(const at::Tensor& full, const TensorSlice& s) {
  std::vector<at::indexing::TensorIndex> index;
  for (size_t d = 0; d < s.sizes.size(); ++d) {
    index.emplace_back(at::indexing::Slice(s.offsets[d], s.offsets[d] + s.sizes[d]));
  }
  return full.index(index).contiguous().reshape({-1}).narrow(0, s.flatOffset, s.numel);
}

// Removes the unpacked fixture when the tests are done.
class FixtureCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    fs::remove_all((fs::temp_directory_path() / ("tessera-v1-fixture-" + std::to_string(::getpid()))).string());
  }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new FixtureCleanup);

TEST(CheckpointFormat1, FixtureLoadsWholeAndAsDimOneBoxes) {
  const std::string step = fixtureDir() + "/step-00000003";
  const CheckpointIndex index = readIndex(step);
  EXPECT_EQ(index.formatVersion, 1);
  EXPECT_EQ(index.worldSize, 2);
  const SafetensorsFile reference = readSafetensors(fixtureDir() + "/model.safetensors");
  ASSERT_EQ(reference.tensors.size(), 15u);
  std::vector<LoadRequest> requests;
  for (const auto& [name, t] : index.tensors) {
    at::ScalarType dtype;
    ASSERT_TRUE(t.dtype == "float32" || t.dtype == "uint8") << name << " " << t.dtype;
    dtype = t.dtype == "float32" ? at::kFloat : at::kByte;
    requests.push_back(LoadRequest{name, t.globalShape, dtype});
  }
  const StateDict whole = load(step, requests, {});  // every piece read and checksummed
  EXPECT_EQ(whole.metaInt("trainer/step"), 3);
  EXPECT_EQ(whole.tensors.at("trainer/rng").globalShape.size(), 1u) << "format 1 saved rank 0's state, 1-D";
  for (const auto& [name, value] : reference.tensors) {
    testing::expectTensorsEqual(whole.whole("model/" + name), value, "model/" + name);
    // Format 1's flat pieces assembled into a dim-1 box (the right half of the columns).
    if (value.dim() != 2) continue;
    const std::vector<int64_t> shape = value.sizes().vec();
    const TensorSlice half = TensorSlice::box({0, shape[1] / 2}, {shape[0], shape[1] - shape[1] / 2});
    const StateDict box = load(step, {LoadRequest{"model/" + name, shape, at::kFloat, half}}, {});
    testing::expectTensorsEqual(box.tensors.at("model/" + name).pieces.at(0).local, sliceOf(value, half).view(half.sizes),
                                name + " " + half.text());
  }
}

TEST(CheckpointFormat1, FixtureExportsTheSameSafetensors) {
  const std::string out = fixtureDir() + "/again.safetensors";
  EXPECT_EQ(exportSafetensors(fixtureDir() + "/step-00000003", out), 15);
  const SafetensorsFile reference = readSafetensors(fixtureDir() + "/model.safetensors");
  const SafetensorsFile again = readSafetensors(out);
  ASSERT_EQ(again.tensors.size(), reference.tensors.size());
  for (const auto& [name, value] : reference.tensors) testing::expectTensorsEqual(again.tensors.at(name), value, name);
}

// Today's GPT under today's FSDP on 2 ranks asks for its pieces (flat ranges
// of the parameters' boxes) from the format-1 fixture.
TESSERA_WORKER(v1_fixture_into_fsdp) {
  at::set_num_threads(1);
  models::Gpt gpt(fixtureGpt());
  const auto dp = parallel::makeFsdpDataParallel(*gpt, ctx.world());
  const SafetensorsFile reference = readSafetensors(ctx.arg("dir") + "/model.safetensors");
  std::vector<LoadRequest> requests;
  for (const auto& pieces : dp->parameterLayout()) {
    for (const auto& piece : pieces) {
      requests.push_back(LoadRequest{"model/" + piece.name, piece.shape, at::kFloat, piece.slice});
    }
  }
  TESSERA_CHECK(!requests.empty(), "rank " << ctx.world()->rank() << " holds no piece");
  const StateDict loaded = load(ctx.arg("dir") + "/step-00000003", requests, {});
  for (const LoadRequest& r : requests) {
    const at::Tensor expected = sliceOf(reference.tensors.at(r.name.substr(6)), *r.slice);
    for (const StatePiece& p : loaded.tensors.at(r.name).pieces) {
      if (p.slice == *r.slice) testing::expectTensorsEqual(p.local.reshape({-1}), expected, r.name + " " + r.slice->text());
    }
  }
}

TEST(CheckpointFormat1, FixtureLoadsIntoTodaysFsdpLayout) {
  auto result = testing::runWorkers("v1_fixture_into_fsdp", {.ranks = 2, .args = {{"dir", fixtureDir()}}});
  ASSERT_TRUE(result.ok()) << result.report();
}

}  // namespace
}  // namespace tessera::checkpoint
