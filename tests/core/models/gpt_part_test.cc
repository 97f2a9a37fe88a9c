// Pipeline parts of the GPT (gpt_part.h): a part's names, shapes and values
// are the whole model's; the chunks of a pipeline layout run in sequence in
// one process -- activations handed over detached, as between stages, and
// the received gradients backpropagated chunk by chunk -- give the whole
// model's loss and every parameter's gradient (two and three stages, an
// interleaved 4-chunk layout on 2 "ranks", a V-shape whose rank 0 holds both
// the embedding and the head; tied and untied; dropout); a tied copy's
// gradient plus the first stage's is the whole model's; the chunk split; and
// tensor parallelism inside the parts on 2 real ranks.
//
// The reference is the whole model's own forward and backward (forwardWithAux
// and loss), which never calls the pipeline code path's hand-over.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/parallel/tp_regions.h"
#include "tests/harness/checks.h"
#include "tests/harness/multiprocess.h"

namespace tessera::models {
namespace {

GptConfig smallConfig(bool tie, double dropout = 0.1) {
  GptConfig c;
  c.vocab_size = 29;
  c.block_size = 16;
  c.n_layer = 6;
  c.n_head = 2;
  c.d_model = 16;
  c.mlp_ratio = 2;
  c.tie_weights = tie;
  c.dropout = dropout;
  c.seed = 21;
  return c;
}

std::pair<at::Tensor, at::Tensor> tokens(int64_t vocab, int64_t batch = 2, int64_t length = 8) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const at::Tensor all = at::randint(0, vocab, {batch, length + 1}, gen, at::kLong);
  return {all.narrow(1, 0, length).contiguous(), all.narrow(1, 1, length).contiguous()};
}

// A pipeline layout: `chunks` chunks (block counts `counts`, empty: balanced),
// rank k holding the chunks ranks[k].
struct Layout {
  std::string name;
  int64_t chunks;
  std::vector<int64_t> counts;
  std::vector<std::vector<int64_t>> ranks;
};

struct Pipeline {
  std::vector<std::pair<int64_t, int64_t>> ranges;  // per chunk
  std::vector<int> rankOf;                           // per chunk
  std::vector<Gpt> parts;                            // per rank
};

Pipeline buildPipeline(const GptConfig& config, const Layout& layout) {
  Pipeline p;
  p.ranges = gptChunkBlocks(config.n_layer, layout.chunks, layout.counts);
  p.rankOf.assign(layout.chunks, -1);
  for (size_t r = 0; r < layout.ranks.size(); ++r) {
    std::vector<std::pair<int64_t, int64_t>> mine;
    for (int64_t c : layout.ranks[r]) {
      p.rankOf[c] = static_cast<int>(r);
      mine.push_back(p.ranges[c]);
    }
    const auto& held = layout.ranks[r];
    const bool first = std::count(held.begin(), held.end(), 0) > 0;
    const bool last = std::count(held.begin(), held.end(), layout.chunks - 1) > 0;
    p.parts.emplace_back(config, GptPart::ofChunks(mine, first, last));
  }
  return p;
}

// Forward of every chunk in order, each on the part holding it, the
// activation handed over as detach().requires_grad_() (what a stage
// receives); then backward from the loss, chunk by chunk, each chunk's
// output backpropagating the gradient its successor's input received.
at::Tensor runChunks(Pipeline& p, const at::Tensor& idx, const at::Tensor& targets) {
  const size_t chunks = p.ranges.size();
  std::vector<at::Tensor> inputs(chunks), outputs(chunks);
  for (size_t c = 0; c < chunks; ++c) {
    GptImpl& part = *p.parts[p.rankOf[c]];
    at::Tensor x;
    if (c == 0) {
      x = part.embed(idx);
    } else {
      inputs[c] = outputs[c - 1].detach().requires_grad_();
      x = inputs[c];
    }
    BlockOutput body = part.runBlocks(x, p.ranges[c].first, p.ranges[c].second);
    outputs[c] = c + 1 == chunks ? part.lossFromLogits(part.logits(body.x), targets) : body.x;
  }
  outputs.back().backward();
  for (size_t c = chunks - 1; c-- > 0;) outputs[c].backward(inputs[c + 1].grad());
  return outputs.back().detach();
}

// Every parameter of every part, its gradient summed by name (a tied copy's
// with the first stage's wte), equals the whole model's; names cover the
// whole model; returns how many parts hold each name.
std::map<std::string, int> expectGradientsMatch(GptImpl& whole, std::vector<Gpt>& parts, double tol) {
  std::map<std::string, at::Tensor> sum;
  std::map<std::string, int> holders;
  for (Gpt& part : parts) {
    for (const auto& item : part->named_parameters()) {
      TESSERA_CHECK(item.value().grad().defined(), item.key() << " got no gradient");
      const at::Tensor g = item.value().grad().detach();
      sum[item.key()] = sum.count(item.key()) ? sum[item.key()] + g : g.clone();
      ++holders[item.key()];
    }
  }
  size_t n = 0;
  for (const auto& item : whole.named_parameters()) {
    ++n;
    EXPECT_TRUE(sum.count(item.key())) << item.key() << " is in no part";
    if (!sum.count(item.key())) continue;
    const double err = (sum[item.key()] - item.value().grad()).abs().max().item<double>();
    EXPECT_LE(err, tol) << item.key();
  }
  EXPECT_EQ(sum.size(), n) << "the parts hold other parameters than the whole model";
  return holders;
}

class ChunkComposition : public ::testing::TestWithParam<std::tuple<Layout, bool>> {};

TEST_P(ChunkComposition, LossAndEveryGradientEqualTheWholeModel) {
  const auto& [layout, tie] = GetParam();
  const GptConfig config = smallConfig(tie);
  Gpt whole(config);
  Pipeline p = buildPipeline(config, layout);
  whole->setRandomKey(3, 1);
  for (Gpt& part : p.parts) part->setRandomKey(3, 1);
  const auto [idx, targets] = tokens(config.vocab_size);

  const at::Tensor expected = whole->loss(idx, targets);
  expected.backward();
  const at::Tensor loss = runChunks(p, idx, targets);
  EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-6);

  const auto holders = expectGradientsMatch(*whole, p.parts, 1e-6);
  // The tied copy: on the rank with the head when another rank has the embedding.
  const int headRank = p.rankOf.back();
  const bool copy = tie && p.rankOf.front() != headRank;
  EXPECT_EQ(holders.at("wte.weight"), copy ? 2 : 1);
  EXPECT_EQ(p.parts[headRank]->holdsTiedCopy(), copy);
  if (copy) {
    // Neither copy alone has the whole gradient: only their sum does.
    const at::Tensor own = p.parts[headRank]->wte->weight.grad();
    EXPECT_GT((own - whole->wte->weight.grad()).abs().max().item<double>(), 1e-4);
  }
}

const Layout kLayouts[] = {
    {"TwoStages", 2, {}, {{0}, {1}}},
    {"ThreeStagesEmbeddingAlone", 3, {0, 4, 2}, {{0}, {1}, {2}}},
    {"Interleaved4ChunksOn2Ranks", 4, {}, {{0, 2}, {1, 3}}},
    {"VShapeRank0HoldsEmbeddingAndHead", 4, {}, {{0, 3}, {1, 2}}},
};

INSTANTIATE_TEST_SUITE_P(Layouts, ChunkComposition, ::testing::Combine(::testing::ValuesIn(kLayouts), ::testing::Bool()),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + (std::get<1>(info.param) ? "Tied" : "Untied");
                         });

// ---- Names, shapes, values ---------------------------------------------------------

std::map<std::string, std::vector<int64_t>> shapesOf(GptImpl& gpt) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& p : logicalParameters(gpt)) out[p.name] = p.globalShape;
  return out;
}

TEST(GptParameterShapes, EqualABuiltWholeModelsForEveryOption) {
  GptConfig c = smallConfig(true, 0.0);
  EXPECT_EQ(gptParameterShapes(c), shapesOf(*Gpt(c)));
  c.tie_weights = false;
  c.positions = "rotary";
  EXPECT_EQ(gptParameterShapes(c), shapesOf(*Gpt(c)));
  c.use_moe = true;
  c.moe.num_experts = 3;
  const auto moe = gptParameterShapes(c);
  EXPECT_EQ(moe, shapesOf(*Gpt(c)));
  EXPECT_EQ(moe.at("blocks.5.moe.experts.2.proj.weight"), (std::vector<int64_t>{16, 32}));
}

TEST(GptPart, NamesShapesAndValuesAreTheWholeModels) {
  const GptConfig config = smallConfig(/*tie=*/true, 0.0);
  Gpt whole(config);
  std::map<std::string, at::Tensor> reference;
  for (const auto& item : whole->named_parameters()) reference[item.key()] = item.value();

  GptPart middle;
  middle.embedding = false;
  middle.head = false;
  middle.all_blocks = false;
  middle.blocks = {2, 3};
  Gpt part(config, middle);
  std::vector<std::string> names;
  for (const auto& item : part->named_parameters()) {
    names.push_back(item.key());
    ASSERT_TRUE(reference.count(item.key())) << item.key();
    EXPECT_TRUE(at::equal(item.value(), reference.at(item.key()))) << item.key();
  }
  EXPECT_EQ(names.front(), "blocks.2.ln1.weight");
  EXPECT_EQ(names.back(), "blocks.3.mlp.proj.bias");
  EXPECT_EQ(names.size(), 2 * 12u);
  EXPECT_FALSE(part->wte);
  EXPECT_FALSE(part->ln_f);
  EXPECT_EQ(part->blocks->globalIndex(1), 3);
  EXPECT_EQ(part->blocks->positionOf(3), 1u);
  EXPECT_TRUE(part->blocks->contains(2));
  EXPECT_FALSE(part->blocks->contains(4));
  EXPECT_THROW(part->blocks->positionOf(4), InvalidArgument);
  EXPECT_FALSE(part->holdsWholeModel());
  const auto [idx, targets] = tokens(config.vocab_size);
  EXPECT_THROW(part->forward(idx), InvalidArgument);
  EXPECT_THROW(part->embed(idx), InvalidArgument);
  EXPECT_THROW(part->logits(torch::zeros({1, 2, 16})), InvalidArgument);

  // The last stage of a tied model: its own wte, equal to the first's.
  GptPart last;
  last.embedding = false;
  last.all_blocks = false;
  last.blocks = {5};
  Gpt tail(config, last);
  EXPECT_TRUE(tail->holdsTiedCopy());
  EXPECT_TRUE(at::equal(tail->wte->weight, reference.at("wte.weight")));
  EXPECT_FALSE(tail->wpe);
  EXPECT_TRUE(tail->named_parameters().contains("ln_f.bias"));

  // An untied one holds the head and no wte.
  GptConfig untied = config;
  untied.tie_weights = false;
  Gpt untiedTail(untied, last);
  EXPECT_FALSE(untiedTail->holdsTiedCopy());
  EXPECT_FALSE(untiedTail->wte);
  EXPECT_TRUE(untiedTail->head);

  // A part listing every block with both ends is the whole model, by content.
  GptPart all = GptPart::ofChunks({{0, 3}, {3, 6}}, true, true);
  EXPECT_FALSE(all.isWhole());
  EXPECT_TRUE(Gpt(config, all)->holdsWholeModel());
}

TEST(GptPart, BadPartsAreRejected) {
  const GptConfig config = smallConfig(true, 0.0);
  GptPart p;
  p.all_blocks = false;
  p.blocks = {3, 1};
  EXPECT_THROW(Gpt(config, p), InvalidArgument);
  p.blocks = {6};
  EXPECT_THROW(Gpt(config, p), InvalidArgument);
  p.blocks = {};
  p.embedding = false;
  p.head = false;
  EXPECT_THROW(Gpt(config, p), InvalidArgument);
  EXPECT_THROW(GptPart::ofChunks({{0, 3}, {2, 4}}, true, false), InvalidArgument);
}

TEST(GptPart, BuildsForMoe) {
  GptConfig c = smallConfig(false, 0.0);
  c.use_moe = true;
  Gpt part(c, GptPart::ofChunks({{4, 6}}, false, true));
  EXPECT_TRUE(part->named_parameters().contains("blocks.4.moe.router.weight"));
  const at::Tensor x = torch::randn({2, 8, 16});
  BlockOutput out = part->runBlocks(x, 4, 6);
  EXPECT_TRUE(out.aux.defined());
  EXPECT_FALSE(part->runBlocks(x, 0, 4).aux.defined()) << "no held block in [0, 4)";
}

// ---- The chunk split ---------------------------------------------------------

TEST(GptChunkBlocks, BalancedGivesTheRemainderToTheFirstChunks) {
  using Ranges = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(gptChunkBlocks(7, 3, {}), (Ranges{{0, 3}, {3, 5}, {5, 7}}));
  EXPECT_EQ(gptChunkBlocks(8, 4, {}), (Ranges{{0, 2}, {2, 4}, {4, 6}, {6, 8}}));
  EXPECT_EQ(gptChunkBlocks(3, 3, {}), (Ranges{{0, 1}, {1, 2}, {2, 3}}));
  EXPECT_EQ(gptChunkBlocks(5, 1, {}), (Ranges{{0, 5}}));
  EXPECT_EQ(gptChunkBlocks(6, 3, {0, 4, 2}), (Ranges{{0, 0}, {0, 4}, {4, 6}}));
  EXPECT_EQ(gptChunkBlocks(6, 3, {3, 3, 0}), (Ranges{{0, 3}, {3, 6}, {6, 6}}));
}

TEST(GptChunkBlocks, ErrorsNameTheKeyAndBothNumbers) {
  auto message = [](const std::function<void()>& fn) {
    ConfigError e = testing::configErrorOf(fn);
    EXPECT_EQ(e.field(), "pipeline.layers_per_stage");
    return std::string(e.what());
  };
  std::string m = message([] { gptChunkBlocks(3, 4, {}); });
  EXPECT_NE(m.find("n_layer = 3"), std::string::npos) << m;
  EXPECT_NE(m.find("4 pipeline chunks"), std::string::npos) << m;
  m = message([] { gptChunkBlocks(6, 3, {2, 2}); });
  EXPECT_NE(m.find("2 entries"), std::string::npos) << m;
  EXPECT_NE(m.find("3 chunks"), std::string::npos) << m;
  m = message([] { gptChunkBlocks(6, 3, {2, 2, 1}); });
  EXPECT_NE(m.find("sums to 5"), std::string::npos) << m;
  EXPECT_NE(m.find("is 6"), std::string::npos) << m;
  m = message([] { gptChunkBlocks(6, 3, {3, 0, 3}); });
  EXPECT_NE(m.find("entry 1 is 0"), std::string::npos) << m;
  m = message([] { gptChunkBlocks(6, 3, {7, -1, 0}); });
  EXPECT_NE(m.find("entry 1 is -1"), std::string::npos) << m;
  ConfigError named = testing::configErrorOf([] { gptChunkBlocks(2, 3, {}, "pipeline.virtual_stages"); });
  EXPECT_EQ(named.field(), "pipeline.virtual_stages");
}

// ---- Tensor parallelism inside the parts (2 real ranks) -------------------------

// The flat elements of `slice` of `whole`.
at::Tensor sliceOf(const at::Tensor& whole, const TensorSlice& slice) {
  at::Tensor out = at::empty({slice.numel}, whole.options());
  copyOverlap(TensorSlice::whole(whole.sizes().vec()), whole.contiguous().reshape({-1}), slice, out);
  return out;
}

// Two stages, each split over tp = 2 (optionally with sequence parallelism),
// in fp64 with dropout: the loss and every gradient piece (the tied copy's
// added to the first stage's wte, which holds the same vocabulary slice)
// equal one process running the whole model.
TESSERA_WORKER(gpt_parts_under_tensor_parallelism) {
  const comm::CommPtr world = ctx.world();
  const bool sequence = ctx.arg("sequence", "0") == "1";
  GptConfig config = smallConfig(ctx.arg("tie", "1") == "1");
  config.n_head = 4;
  Gpt whole(config);
  whole->to(at::kDouble);
  Pipeline p = buildPipeline(config, {"TwoStages", 2, {}, {{0}, {1}}});
  const auto group = parallel::makeTensorParallelGroup(world);
  for (Gpt& part : p.parts) {
    part->to(at::kDouble);
    part->applyTensorParallel(group, sequence);
  }
  whole->setRandomKey(2, 0);
  for (Gpt& part : p.parts) part->setRandomKey(2, 0);
  const auto [idx, targets] = tokens(config.vocab_size);
  const at::Tensor expected = whole->loss(idx, targets);
  expected.backward();
  const at::Tensor loss = runChunks(p, idx, targets);
  TESSERA_CHECK(std::abs(loss.item<double>() - expected.item<double>()) < 1e-10,
                "loss " << loss.item<double>() << " vs one process " << expected.item<double>());

  std::map<std::string, at::Tensor> reference;
  for (const auto& item : whole->named_parameters()) reference[item.key()] = item.value().grad();
  std::map<std::string, at::Tensor> sum;  // name -> this rank's pieces, flat
  std::map<std::string, std::vector<TensorSlice>> pieces;
  for (Gpt& part : p.parts) {
    for (const auto& lp : logicalParameters(*part)) {
      const at::Tensor g = lp.tensor.grad().detach().reshape({-1});
      if (sum.count(lp.name)) {
        TESSERA_CHECK(pieces[lp.name] == lp.pieces, lp.name << ": the tied copy holds other slices");
        sum[lp.name] = sum[lp.name] + g;
      } else {
        sum[lp.name] = g.clone();
        pieces[lp.name] = lp.pieces;
      }
    }
  }
  TESSERA_CHECK_EQ(sum.size(), reference.size());
  for (const auto& [name, local] : sum) {
    int64_t offset = 0;
    for (const TensorSlice& slice : pieces[name]) {
      const double err = (local.narrow(0, offset, slice.numel) - sliceOf(reference.at(name), slice)).abs().max().item<double>();
      TESSERA_CHECK(err < 1e-10, name << " " << slice.text() << ": gradient differs by " << err);
      offset += slice.numel;
    }
  }
}

void runTp(std::map<std::string, std::string> args) {
  const auto result = testing::runWorkers("gpt_parts_under_tensor_parallelism", {.ranks = 2, .args = std::move(args)});
  ASSERT_TRUE(result.ok()) << result.report();
}

TEST(GptPartTensorParallel, Tp2TiedCopy) { runTp({{"tie", "1"}}); }
TEST(GptPartTensorParallel, Tp2UntiedSequenceParallel) { runTp({{"tie", "0"}, {"sequence", "1"}}); }

}  // namespace
}  // namespace tessera::models
