// Small models and datasets several test binaries share, so each test says
// only what differs. Inline: header-only, like the GoogleTest helpers.
#pragma once

#include <torch/torch.h>

#include "tessera/core/data/fashion_mnist.h"
#include "tessera/core/models/gpt.h"

namespace tessera::testing {

// A 2-block GPT small enough for exact gradient comparisons in a few ms:
// V = 29 (not a power of two), T_max = 8, C = 16, 2 heads, dropout 0.1.
inline models::GptConfig smallGpt(bool tied) {
  models::GptConfig c;
  c.vocab_size = 29;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 16;
  c.dropout = 0.1;
  c.tie_weights = tied;
  c.seed = 5;
  return c;
}

// 64 random examples of 8 features, 3 classes; the same every call.
inline data::ImageDataset syntheticDataset() {
  torch::manual_seed(7);
  data::ImageDataset d;
  d.images = torch::randn({64, 8});
  d.labels = torch::randint(0, 3, {64}, torch::kLong);
  return d;
}

}  // namespace tessera::testing
