// Tests of core/models: GPT (names, init, causality, attention against a naive
// loop, dropout sites and keys, the block runner, loss, overfitting one
// batch), the MoE feed-forward (capacity, routing, drops, aux loss, gradients)
// and the fashion-MNIST MLP.
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <array>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/models/gpt.h"
#include "tessera/core/models/init.h"
#include "tessera/core/models/logical_parameters.h"
#include "tessera/core/models/mlp_classifier.h"
#include "tessera/core/models/moe.h"

namespace tessera::models {
namespace {

GptConfig tinyGpt() {
  GptConfig c;
  c.vocab_size = 32;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 16;
  c.mlp_ratio = 2;
  c.seed = 7;
  return c;
}

std::vector<std::string> parameterNames(const torch::nn::Module& m) {
  std::vector<std::string> names;
  for (const auto& p : m.named_parameters()) names.push_back(p.key());
  return names;
}

std::vector<std::string> expectedGptNames(int64_t n_layer, bool learned, bool tied) {
  std::vector<std::string> names = {"wte.weight"};
  if (learned) names.push_back("wpe.weight");
  for (int64_t i = 0; i < n_layer; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    for (const char* leaf : {"ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                             "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias",
                             "mlp.proj.weight", "mlp.proj.bias"}) {
      names.push_back(b + leaf);
    }
  }
  names.push_back("ln_f.weight");
  names.push_back("ln_f.bias");
  if (!tied) names.push_back("head.weight");
  return names;
}

TEST(GptTest, ParameterNamesTiedAndUntied) {
  auto config = tinyGpt();
  EXPECT_EQ(parameterNames(*Gpt(config)), expectedGptNames(2, true, true));
  config.tie_weights = false;
  Gpt untied(config);
  EXPECT_EQ(parameterNames(*untied), expectedGptNames(2, true, false));
  EXPECT_EQ(untied->named_parameters()["head.weight"].sizes(), (std::vector<int64_t>{32, 16}));
  config.positions = "rotary";
  EXPECT_EQ(parameterNames(*Gpt(config)), expectedGptNames(2, false, false));
}

TEST(GptTest, MoeParameterNames) {
  auto config = tinyGpt();
  config.use_moe = true;
  config.moe.num_experts = 3;
  const auto params = Gpt(config)->named_parameters();
  EXPECT_TRUE(params.contains("blocks.1.moe.router.weight"));
  EXPECT_TRUE(params.contains("blocks.1.moe.experts.2.fc.weight"));
  EXPECT_TRUE(params.contains("blocks.0.moe.experts.0.proj.bias"));
  EXPECT_FALSE(params.contains("blocks.0.mlp.fc.weight"));
  EXPECT_EQ(params["blocks.1.moe.router.weight"].sizes(), (std::vector<int64_t>{3, 16}));
}

TEST(GptTest, SameSeedSameParametersWhateverTheGlobalGenerator) {
  auto config = tinyGpt();
  torch::manual_seed(1);
  Gpt a(config);
  torch::manual_seed(2);  // torch::nn's own init draws from this; ours must not
  Gpt b(config);
  config.seed = 8;
  Gpt c(config);
  const auto pa = a->named_parameters(), pb = b->named_parameters(), pc = c->named_parameters();
  bool any_differs = false;
  for (const auto& item : pa) {
    EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
    if (!torch::equal(item.value(), pc[item.key()])) any_differs = true;
  }
  EXPECT_TRUE(any_differs);
  EXPECT_FALSE(torch::equal(pa["wte.weight"], pc["wte.weight"]));
}

TEST(GptTest, InitFollowsGpt2Scales) {
  auto config = tinyGpt();
  config.vocab_size = 256;
  config.d_model = 64;
  config.n_layer = 8;
  const auto p = Gpt(config)->named_parameters();
  EXPECT_NEAR(p["wte.weight"].std().item<double>(), 0.02, 0.002);
  EXPECT_NEAR(p["blocks.0.attn.proj.weight"].std().item<double>(), 0.02 / 4.0, 0.0008);
  EXPECT_TRUE(torch::equal(p["blocks.3.ln1.weight"], torch::ones({64})));
  EXPECT_TRUE(torch::equal(p["blocks.3.mlp.fc.bias"], torch::zeros({128})));
}

TEST(GptTest, InitIsTheLayoutIndependentDrawOfEachName) {
  auto config = tinyGpt();
  config.use_moe = true;
  Gpt model(config);
  const auto logical = logicalParameters(*model);
  const auto named = model->named_parameters();
  ASSERT_EQ(logical.size(), named.size());
  const double residual_std = config.init_std / std::sqrt(2.0 * config.n_layer);
  for (size_t i = 0; i < logical.size(); ++i) {
    const LogicalParameter& p = logical[i];
    EXPECT_EQ(p.name, named[i].key());
    EXPECT_TRUE(p.tensor.is_same(named[i].value())) << p.name;
    EXPECT_EQ(p.globalShape, p.tensor.sizes().vec()) << p.name;
    ASSERT_EQ(p.pieces.size(), 1u) << p.name;
    EXPECT_TRUE(p.pieces.front().isWhole(p.globalShape)) << p.name;
  }
  const auto whole = [](const at::Tensor& t) { return TensorSlice::whole(t.sizes().vec()); };
  for (const char* name : {"wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight", "blocks.1.moe.router.weight",
                           "blocks.1.moe.experts.3.fc.weight"}) {
    const auto& t = named[name];
    EXPECT_TRUE(torch::equal(t, initNormalSlice(7, name, t.sizes().vec(), whole(t), config.init_std))) << name;
  }
  for (const char* name : {"blocks.0.attn.proj.weight", "blocks.1.moe.experts.0.proj.weight"}) {
    const auto& t = named[name];
    EXPECT_TRUE(torch::equal(t, initNormalSlice(7, name, t.sizes().vec(), whole(t), residual_std))) << name;
  }
  EXPECT_TRUE(torch::equal(named["blocks.1.ln2.weight"], torch::ones({16})));
  EXPECT_TRUE(torch::equal(named["ln_f.bias"], torch::zeros({16})));
  EXPECT_TRUE(torch::equal(named["blocks.0.moe.experts.1.proj.bias"], torch::zeros({16})));
}

void expectCausal(const GptConfig& config) {
  Gpt model(config);
  torch::manual_seed(3);
  const auto idx = torch::randint(config.vocab_size, {2, config.block_size}, torch::kLong);  // (B, T)
  const auto logits = model->forward(idx);  // (B, T, V)
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, config.block_size, config.vocab_size}));
  for (int64_t t = 0; t + 1 < config.block_size; ++t) {
    auto changed = idx.clone();
    changed.narrow(1, t + 1, config.block_size - t - 1).random_(config.vocab_size);
    const auto other = model->forward(changed);
    EXPECT_TRUE(torch::allclose(logits.narrow(1, 0, t + 1), other.narrow(1, 0, t + 1), 0, 1e-6)) << "t=" << t;
    EXPECT_FALSE(torch::allclose(logits, other)) << "t=" << t;
  }
}

TEST(GptTest, CausalLearnedAndRotary) {
  auto config = tinyGpt();
  expectCausal(config);
  config.positions = "rotary";
  expectCausal(config);
}

// Attention by loops over batch, head, query and key in double precision,
// reading the module's weights: an independent path to the same numbers.
// probs_mask: (B, H, T, T) multiplier of the attention probabilities (dropout), or undefined.
torch::Tensor naiveAttention(CausalSelfAttentionImpl& attn, const torch::Tensor& x, int64_t n_head, bool rotary,
                             const torch::Tensor& probs_mask = {}) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), D = C / n_head;
  const auto xd = x.to(torch::kDouble);
  const auto qkv = (xd.matmul(attn.qkv->weight.to(torch::kDouble).t()) + attn.qkv->bias.to(torch::kDouble));
  auto a = qkv.accessor<double, 3>();  // (B, T, 3C)
  auto y = torch::zeros({B, T, C}, torch::kDouble);
  auto ya = y.accessor<double, 3>();
  auto rope = [&](std::vector<double> v, int64_t t) {
    if (!rotary) return v;
    std::vector<double> out(v);
    for (int64_t i = 0; i < D / 2; ++i) {
      const double angle = static_cast<double>(t) * std::pow(10000.0, -2.0 * i / D);
      out[i] = v[i] * std::cos(angle) - v[i + D / 2] * std::sin(angle);
      out[i + D / 2] = v[i + D / 2] * std::cos(angle) + v[i] * std::sin(angle);
    }
    return out;
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < n_head; ++h) {
      auto head = [&](int64_t part, int64_t t) {
        std::vector<double> v(D);
        for (int64_t d = 0; d < D; ++d) v[d] = a[b][t][part * C + h * D + d];
        return v;
      };
      for (int64_t i = 0; i < T; ++i) {
        const auto q = rope(head(0, i), i);
        std::vector<double> score(i + 1);
        double max_score = -1e300, denom = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const auto k = rope(head(1, j), j);
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
          score[j] = s / std::sqrt(static_cast<double>(D));
          max_score = std::max(max_score, score[j]);
        }
        for (int64_t j = 0; j <= i; ++j) denom += std::exp(score[j] - max_score);
        for (int64_t j = 0; j <= i; ++j) {
          const auto v = head(2, j);
          double p = std::exp(score[j] - max_score) / denom;
          if (probs_mask.defined()) p *= probs_mask[b][h][i][j].item<double>();
          for (int64_t d = 0; d < D; ++d) ya[b][i][h * D + d] += p * v[d];
        }
      }
    }
  }
  return y.matmul(attn.proj->weight.to(torch::kDouble).t()) + attn.proj->bias.to(torch::kDouble);
}

TEST(GptTest, AttentionMatchesNaiveLoop) {
  for (const char* positions : {"learned", "rotary"}) {
    GptConfig config = tinyGpt();
    config.d_model = 8;
    config.positions = positions;
    torch::manual_seed(4);
    CausalSelfAttention attn(config);
    {
      torch::NoGradGuard no_grad;  // non-zero biases, so they are checked too
      for (auto& p : attn->parameters()) p.normal_(0, 0.5);
    }
    const auto x = torch::randn({2, 5, 8});  // (B, T, C)
    const auto got = attn->forward(x).to(torch::kDouble);
    const auto want = naiveAttention(*attn, x, config.n_head, config.positions == "rotary");
    EXPECT_LE((got - want).abs().max().item<double>(), 1e-5) << positions;
  }
}

TEST(GptTest, AttentionDropoutIsTheMaskOfItsSite) {
  GptConfig config = tinyGpt();
  config.d_model = 8;
  config.dropout = 0.3;
  CausalSelfAttention attn(config, /*block=*/1);
  attn->setRandomKey(2, 5);
  torch::manual_seed(4);
  const auto x = torch::randn({2, 5, 8});  // (B, T, C)
  DropoutKey key;
  key.seed = config.seed;
  key.site = gptDropoutSite(GptDropout::kAttentionProbs, 1);
  key.setStep(2, 5);
  const auto mask = dropoutMask(key, 0.3, {2, 2, 5, 5}, TensorSlice::whole({2, 2, 5, 5}), torch::kDouble);
  const auto got = attn->forward(x).to(torch::kDouble);
  EXPECT_LE((got - naiveAttention(*attn, x, 2, false, mask)).abs().max().item<double>(), 1e-5);
  attn->eval();
  EXPECT_LE((attn->forward(x).to(torch::kDouble) - naiveAttention(*attn, x, 2, false)).abs().max().item<double>(), 1e-5);
}

TEST(GptTest, DropoutSitesAreDistinct) {
  std::set<uint64_t> sites = {gptDropoutSite(GptDropout::kEmbedding)};
  for (int64_t block = 0; block < 100; ++block) {
    for (GptDropout where : {GptDropout::kAttentionProbs, GptDropout::kAttentionBranch, GptDropout::kFeedForwardBranch}) {
      EXPECT_TRUE(sites.insert(gptDropoutSite(where, block)).second) << block;
    }
  }
}

TEST(GptTest, BlockDropoutUsesItsBranchSites) {
  auto config = tinyGpt();
  config.dropout = 0.25;
  Block block(config, /*index=*/1);
  block->setRandomKey(7, 0);
  torch::manual_seed(8);
  const auto x = torch::randn({2, 8, 16});  // (B, T, C)
  auto keyOf = [&](GptDropout where) {
    DropoutKey key;
    key.seed = config.seed;
    key.site = gptDropoutSite(where, 1);
    key.setStep(7, 0);
    return key;
  };
  const auto h = x + dropout(block->attn->forward(block->ln1->forward(x)), 0.25, true, keyOf(GptDropout::kAttentionBranch));
  const auto want = h + dropout(block->mlp->forward(block->ln2->forward(h)), 0.25, true, keyOf(GptDropout::kFeedForwardBranch));
  const auto got = block->forwardWithAux(x);
  EXPECT_TRUE(torch::equal(got.x, want));
  EXPECT_FALSE(got.aux.defined());  // a dense block has no aux loss
}

TEST(GptTest, DropoutMasksFollowTheRandomKey) {
  auto config = tinyGpt();
  config.dropout = 0.2;
  Gpt model(config);
  torch::manual_seed(9);
  const auto idx = torch::randint(config.vocab_size, {2, 8}, torch::kLong);
  model->setRandomKey(5, 0);
  const auto a = model->forward(idx);
  EXPECT_TRUE(torch::equal(a, model->forward(idx)));  // a recomputation draws the same masks
  model->setRandomKey(6, 0);
  EXPECT_FALSE(torch::allclose(a, model->forward(idx)));
  model->setRandomKey(5, 1);
  EXPECT_FALSE(torch::allclose(a, model->forward(idx)));
  // Out of training, dropout is the identity: the model of dropout 0, same seed.
  model->eval();
  config.dropout = 0;
  EXPECT_TRUE(torch::equal(model->forward(idx), Gpt(config)->forward(idx)));
  EXPECT_THROW(model->setRandomKey(-1, 0), InvalidArgument);
}

TEST(GptTest, BlockRunnerAuxLossesAreSummed) {
  auto config = tinyGpt();
  config.use_moe = true;
  config.moe.num_experts = 2;
  Gpt model(config);
  torch::manual_seed(10);
  const auto idx = torch::randint(config.vocab_size, {2, 8}, torch::kLong);
  const auto plain = model->forwardWithAux(idx);
  std::vector<torch::Tensor> seen;
  model->setBlockRunner([&](int64_t index, const torch::Tensor& x) {
    BlockOutput out = model->blocks->at(model->blocks->positionOf(index)).forwardWithAux(x);
    seen.push_back(out.aux);
    return out;
  });
  const auto run = model->forwardWithAux(idx);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_TRUE(torch::equal(run.logits, plain.logits));
  EXPECT_NEAR(run.aux_loss.item<double>(), (seen[0] + seen[1]).item<double>(), 1e-7);
  EXPECT_NEAR(run.aux_loss.item<double>(), plain.aux_loss.item<double>(), 1e-7);
  EXPECT_GT(plain.aux_loss.item<double>(), 0.0);
  // A runner's aux reaches the loss: doubling it doubles the sum.
  model->setBlockRunner([&](int64_t index, const torch::Tensor& x) {
    BlockOutput out = model->blocks->at(model->blocks->positionOf(index)).forwardWithAux(x);
    return BlockOutput{out.x, out.aux * 2};
  });
  EXPECT_NEAR(model->forwardWithAux(idx).aux_loss.item<double>(), 2 * plain.aux_loss.item<double>(), 1e-6);
  model->setBlockRunner(nullptr);
}

TEST(GptTest, LossAtInitIsNearLogVocab) {
  for (bool tied : {true, false}) {
    auto config = tinyGpt();
    config.vocab_size = 64;
    config.tie_weights = tied;
    Gpt model(config);
    torch::manual_seed(5);
    const auto idx = torch::randint(64, {4, 8}, torch::kLong);
    const auto targets = torch::randint(64, {4, 8}, torch::kLong);
    EXPECT_NEAR(model->loss(idx, targets).item<double>(), std::log(64.0), 0.1) << "tied=" << tied;
  }
}

void expectOverfitsOneBatch(const GptConfig& config) {
  Gpt model(config);
  torch::manual_seed(6);
  const auto batch = torch::randint(config.vocab_size, {2, config.block_size + 1}, torch::kLong);
  const auto idx = batch.narrow(1, 0, config.block_size);      // (B, T)
  const auto targets = batch.narrow(1, 1, config.block_size);  // (B, T)
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  const double initial = model->loss(idx, targets).item<double>();
  double last = initial;
  for (int step = 0; step < 30; ++step) {
    optimizer.zero_grad();
    auto loss = model->loss(idx, targets);
    loss.backward();
    optimizer.step();
    last = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * initial) << config.positions << " moe=" << config.use_moe;
}

TEST(GptTest, OverfitsOneBatchLearnedRotaryAndMoe) {
  auto config = tinyGpt();
  expectOverfitsOneBatch(config);
  config.positions = "rotary";
  config.tie_weights = false;
  expectOverfitsOneBatch(config);
  config.use_moe = true;
  config.moe.num_experts = 2;
  config.moe.top_k = 2;
  expectOverfitsOneBatch(config);
}

TEST(GptTest, RejectsBadConfigNamingTheField) {
  auto expectField = [](const GptConfig& config, const std::string& field) {
    try {
      config.validate();
      ADD_FAILURE() << "expected ConfigError for " << field;
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.field(), field) << e.what();
    }
  };
  auto config = tinyGpt();
  config.n_head = 3;
  expectField(config, "model.d_model");
  config = tinyGpt();
  config.positions = "absolute";
  expectField(config, "model.positions");
  config = tinyGpt();
  config.dropout = 1.0;
  expectField(config, "model.dropout");
  config = tinyGpt();
  config.use_moe = true;
  config.moe.top_k = 3;
  expectField(config, "model.moe.top_k");
  EXPECT_THROW(Gpt{config}, ConfigError);
  Gpt model(tinyGpt());
  EXPECT_THROW(model->forward(torch::zeros({1, 9}, torch::kLong)), InvalidArgument);
}

// ---- MoE ----------------------------------------------------------------------

MoeConfig moeConfig(int64_t experts, int64_t top_k, double capacity_factor) {
  MoeConfig c;
  c.num_experts = experts;
  c.top_k = top_k;
  c.capacity_factor = capacity_factor;
  return c;
}

TEST(MoeTest, CapacityFormula) {
  EXPECT_EQ(moeCapacity(16, 4, 1.0, 1), 4);
  EXPECT_EQ(moeCapacity(100, 4, 1.25, 1), 32);   // ceil(31.25)
  EXPECT_EQ(moeCapacity(100, 4, 1.25, 2), 63);   // ceil(62.5)
  EXPECT_EQ(moeCapacity(10, 3, 1.0, 2), 7);      // ceil(6.67)
  EXPECT_EQ(moeCapacity(6, 4, 1.0, 1), 4);       // the minimum
  MoeFeedForward moe(4, 8, moeConfig(4, 2, 1.25));
  EXPECT_EQ(moe->route(torch::randn({100, 4})).capacity, 63);
}

TEST(MoeTest, TopTwoRenormalizesChosenGates) {
  torch::manual_seed(10);
  MoeFeedForward moe(6, 8, moeConfig(4, 2, 8.0));  // capacity for everyone: nothing dropped
  const auto routing = moe->route(torch::randn({12, 6}));
  ASSERT_TRUE((routing.slot >= 0).all().item<bool>());
  EXPECT_TRUE(torch::allclose(routing.weight.sum(-1), torch::ones({12})));
  const auto chosen = routing.gates.gather(1, routing.expert);  // (S, 2)
  EXPECT_TRUE(torch::allclose(routing.weight, chosen / chosen.sum(-1, true)));
  EXPECT_TRUE((chosen.select(1, 0) >= chosen.select(1, 1)).all().item<bool>());
  EXPECT_TRUE((routing.expert.select(1, 0) != routing.expert.select(1, 1)).all().item<bool>());
}

TEST(MoeTest, TokensOverCapacityAreDropped) {
  torch::manual_seed(11);
  MoeFeedForward moe(3, 8, moeConfig(2, 1, 1.0));  // S = 10: C = max(ceil(5), 4) = 5
  {
    torch::NoGradGuard no_grad;
    moe->router->weight.zero_();
    moe->router->weight[0].fill_(1.0);  // positive tokens all prefer expert 0
  }
  const auto x = torch::rand({10, 3}) + 0.1;  // (S, M)
  const auto routing = moe->route(x);
  EXPECT_EQ(routing.capacity, 5);
  EXPECT_TRUE(torch::equal(routing.expert.squeeze(1), torch::zeros({10}, torch::kLong)));
  EXPECT_TRUE(torch::equal(routing.slot.squeeze(1), torch::tensor({0, 1, 2, 3, 4, -1, -1, -1, -1, -1}, torch::kLong)));
  const auto y = moe->forward(x);
  EXPECT_TRUE(torch::equal(y.narrow(0, 5, 5), torch::zeros({5, 3})));
  const auto expert0 = moe->experts->at(0).forward(x.narrow(0, 0, 5));
  const auto gate = routing.gates.narrow(0, 0, 5).select(1, 0).unsqueeze(1);
  EXPECT_TRUE(torch::allclose(y.narrow(0, 0, 5), gate * expert0, 1e-5, 1e-6));
}

TEST(MoeTest, AuxLossMatchesHandComputation) {
  MoeFeedForward moe(2, 4, moeConfig(2, 1, 1.0));
  {
    torch::NoGradGuard no_grad;
    moe->router->weight.copy_(torch::eye(2));  // logits = tokens
  }
  const std::vector<std::array<double, 2>> logits = {{2, 0}, {0, 1}, {1, 0}, {3, 0}};
  const auto x = torch::tensor({2.0f, 0.f, 0.f, 1.f, 1.f, 0.f, 3.f, 0.f}).view({4, 2});
  double mean_gate[2] = {0, 0};
  for (const auto& l : logits) {
    const double z = std::exp(l[0]) + std::exp(l[1]);
    mean_gate[0] += std::exp(l[0]) / z / 4;
    mean_gate[1] += std::exp(l[1]) / z / 4;
  }
  const double fraction[2] = {3.0 / 4, 1.0 / 4};  // first choices: 0, 1, 0, 0
  const double want = 2 * (mean_gate[0] * fraction[0] + mean_gate[1] * fraction[1]);
  torch::Tensor aux;
  moe->forward(x, &aux);
  EXPECT_NEAR(aux.item<double>(), want, 1e-6);
}

TEST(MoeTest, OneExpertWithRoomEqualsTheExpert) {
  torch::manual_seed(12);
  MoeFeedForward moe(5, 10, moeConfig(1, 1, 1.0));  // C = max(S, 4) >= S
  const auto x = torch::randn({2, 7, 5});           // (B, T, M): S = 14
  const auto y = moe->forward(x);
  const auto want = moe->experts->at(0).forward(x);
  EXPECT_TRUE(torch::allclose(y, want, 1e-5, 1e-6));
}

TEST(MoeTest, GradientsReachRouterAndEveryExpert) {
  torch::manual_seed(13);
  MoeFeedForward moe(4, 8, moeConfig(3, 2, 2.0));
  torch::Tensor aux;
  const auto y = moe->forward(torch::randn({16, 4}), &aux);
  (y.pow(2).sum() + aux).backward();
  ASSERT_TRUE(moe->router->weight.grad().defined());
  EXPECT_GT(moe->router->weight.grad().abs().sum().item<double>(), 0);
  for (size_t e = 0; e < moe->experts->size(); ++e) {
    const auto& grad = moe->experts->at(e).fc->weight.grad();
    ASSERT_TRUE(grad.defined());
    EXPECT_GT(grad.abs().sum().item<double>(), 0);
  }
}

// ---- MLP classifier -------------------------------------------------------------

TEST(MlpClassifierTest, ShapesNamesAndOneStep) {
  MlpClassifierConfig config;
  config.hidden_sizes = {32, 16};
  MlpClassifier model(config);
  EXPECT_EQ(parameterNames(*model), (std::vector<std::string>{"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                                              "layers.1.bias", "layers.2.weight", "layers.2.bias"}));
  torch::manual_seed(14);
  const auto images = torch::rand({8, 1, 28, 28});  // (B, 1, H, W)
  const auto labels = torch::randint(10, {8}, torch::kLong);
  EXPECT_EQ(model->forward(images).sizes(), (std::vector<int64_t>{8, 10}));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  auto loss = model->loss(images, labels);
  loss.backward();
  optimizer.step();
  EXPECT_LT(model->loss(images, labels).item<double>(), loss.item<double>());
  const auto a = MlpClassifier(config)->parameters(), b = MlpClassifier(config)->parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << i;
  config.hidden_sizes = {0};
  EXPECT_THROW(MlpClassifier{config}, ConfigError);
}

TEST(MlpClassifierTest, HeUniformInitFromEachName) {
  MlpClassifierConfig config;
  config.hidden_sizes = {32};
  config.seed = 21;
  MlpClassifier model(config);
  const auto p = model->named_parameters();
  const double bound0 = std::sqrt(6.0 / 784), bound1 = std::sqrt(6.0 / 32);
  EXPECT_TRUE(torch::equal(p["layers.0.weight"], initUniformSlice(21, "layers.0.weight", {32, 784},
                                                                  TensorSlice::whole({32, 784}), -bound0, bound0)));
  EXPECT_TRUE(torch::equal(p["layers.1.weight"], initUniformSlice(21, "layers.1.weight", {10, 32},
                                                                  TensorSlice::whole({10, 32}), -bound1, bound1)));
  EXPECT_TRUE(torch::equal(p["layers.0.bias"], torch::zeros({32})));
}

TEST(MlpClassifierTest, DropoutAfterEachHiddenReluFollowsTheKey) {
  MlpClassifierConfig config;
  config.input_dim = 12;
  config.hidden_sizes = {16, 8};
  config.num_classes = 3;
  config.dropout = 0.5;
  MlpClassifier model(config);
  torch::manual_seed(15);
  const auto x = torch::randn({4, 12});
  model->setRandomKey(3, 2);
  auto keyOf = [&](uint64_t site) {
    DropoutKey key;
    key.seed = config.seed;
    key.site = site;
    key.setStep(3, 2);
    return key;
  };
  auto layer = [&](size_t i) { return model->layers[i]->as<LinearImpl>(); };
  auto h = dropout(torch::relu(layer(0)->forward(x)), 0.5, true, keyOf(0));
  h = dropout(torch::relu(layer(1)->forward(h)), 0.5, true, keyOf(1));
  const auto want = layer(2)->forward(h);
  EXPECT_TRUE(torch::equal(model->forward(x), want));
  model->setRandomKey(4, 2);
  EXPECT_FALSE(torch::allclose(model->forward(x), want));
}

}  // namespace
}  // namespace tessera::models
