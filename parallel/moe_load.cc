#include "tessera/parallel/moe_load.h"

#include <ATen/ops/zeros.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::parallel {

namespace {

// Per layer in the all-reduced table: routed[E], choices, dropped, capacity,
// holders (ranks holding the layer; 0: no rank has it, left out of reports).
constexpr int64_t kExtraColumns = 4;

// The global block index in a module name: the component after the last
// "blocks" component ("blocks.3.moe", "module.blocks.3.moe" -> 3), or -1.
int64_t blockIndexOf(const std::string& name) {
  std::vector<std::string> parts;
  for (size_t begin = 0;;) {
    const size_t dot = name.find('.', begin);
    parts.push_back(name.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin));
    if (dot == std::string::npos) break;
    begin = dot + 1;
  }
  for (size_t i = parts.size(); i-- > 1;) {
    const std::string& index = parts[i];
    const bool numeric = !index.empty() && index.size() < 18 &&
                         std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (parts[i - 1] == "blocks" && numeric) return std::stoll(index);
  }
  return -1;
}

double rounded(double value, double scale) { return std::round(value * scale) / scale; }

}  // namespace

double MoeLoadReport::droppedFraction() const {
  models::MoeLoad total;
  for (const MoeLayerLoad& layer : layers) {
    total.choices += layer.counts.choices;
    total.dropped += layer.counts.dropped;
  }
  return total.droppedFraction();
}

MetricsRecord MoeLoadReport::toMetrics() const {
  MetricsRecord byLayer;
  for (const MoeLayerLoad& layer : layers) {
    MetricsRecord load;
    const std::vector<double> perExpert = layer.load();
    for (size_t e = 0; e < perExpert.size(); ++e) load.add(std::to_string(e), rounded(perExpert[e], 1e3));
    byLayer.add(std::to_string(layer.block),
                MetricsRecord().add("dropped", rounded(layer.droppedFraction(), 1e4)).add("load", load));
  }
  return MetricsRecord().add("dropped", rounded(droppedFraction(), 1e4)).add("layers", byLayer);
}

MoeLoadCollector::MoeLoadCollector(torch::nn::Module& module, int64_t numLayers, int64_t numExperts,
                                   comm::CommPtr comm)
    : numLayers_(numLayers), numExperts_(numExperts), comm_(std::move(comm)) {
  TESSERA_CHECK_ARG(comm_ != nullptr, "MoeLoadCollector needs a communicator spanning every rank (the world)");
  TESSERA_CHECK_ARG(numLayers_ >= 0 && numExperts_ >= 1,
                    "MoeLoadCollector: want n_layer >= 0 and num_experts >= 1, got " << numLayers_ << " and "
                                                                                       << numExperts_);
  for (const auto& item : module.named_modules()) {
    auto moe = std::dynamic_pointer_cast<models::MoeFeedForwardImpl>(item.value());
    if (!moe) continue;
    const int64_t block = blockIndexOf(item.key());
    TESSERA_CHECK_ARG(block >= 0, "MoeLoadCollector: MoE layer \"" << item.key()
                                      << "\" is not inside a block named \"blocks.<global index>\"; the metrics "
                                         "key layers by that index");
    TESSERA_CHECK_ARG(block < numLayers_, "MoeLoadCollector: MoE layer \"" << item.key() << "\" is block " << block
                                              << ", outside the model's n_layer = " << numLayers_
                                              << "; pass the whole model's n_layer");
    TESSERA_CHECK_ARG(moe->config().num_experts == numExperts_,
                      "MoeLoadCollector: MoE layer \"" << item.key() << "\" has " << moe->config().num_experts
                                                       << " experts, the collector was given " << numExperts_);
    for (const Layer& held : layers_) {
      TESSERA_CHECK_ARG(held.block != block, "MoeLoadCollector: two MoE layers in block " << block);
    }
    layers_.push_back({block, moe});
  }
  std::sort(layers_.begin(), layers_.end(), [](const Layer& a, const Layer& b) { return a.block < b.block; });
  for (Layer& layer : layers_) layer.moe->takeLoad();  // count from here
}

MoeLoadReport MoeLoadCollector::collect() {
  const int64_t E = numExperts_;
  const int64_t width = E + kExtraColumns;
  at::Tensor table = at::zeros({numLayers_, width}, at::kLong);  // (n_layer, E + 4)
  int64_t* t = table.data_ptr<int64_t>();
  for (Layer& layer : layers_) {
    const models::MoeLoad load = layer.moe->takeLoad();
    int64_t* row = t + layer.block * width;
    for (int64_t e = 0; e < E; ++e) row[e] = load.routed[static_cast<size_t>(e)];
    row[E] = load.choices;
    row[E + 1] = load.dropped;
    row[E + 2] = load.capacity;
    row[E + 3] = 1;
  }
  if (comm_->size() > 1) comm_->allReduce(table, comm::ReduceOp::kSum);  // collective

  MoeLoadReport report;
  for (int64_t block = 0; block < numLayers_; ++block) {
    const int64_t* row = t + block * width;
    if (row[E + 3] == 0) continue;  // no rank holds an MoE layer there
    MoeLayerLoad layer;
    layer.block = block;
    layer.counts.routed.assign(row, row + E);
    layer.counts.choices = row[E];
    layer.counts.dropped = row[E + 1];
    layer.counts.capacity = row[E + 2];
    report.layers.push_back(std::move(layer));
  }
  return report;
}

std::function<void(MetricsRecord&)> MoeLoadCollector::metricsHook() {
  return [this](MetricsRecord& record) {
    const MoeLoadReport report = collect();
    if (!report.layers.empty()) record.add("moe", report.toMetrics());
  };
}

std::vector<int64_t> MoeLoadCollector::heldBlocks() const {
  std::vector<int64_t> out;
  out.reserve(layers_.size());
  for (const Layer& layer : layers_) out.push_back(layer.block);
  return out;
}

}  // namespace tessera::parallel
