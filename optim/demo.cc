// DeMo (see the header for the algorithm and the wire format). The transform
// works on a per-parameter "chunk layout": the chunk size of each dimension,
// the DCT matrices in the parameter's dtype (built once), and how many
// components each chunk sends.
#include "tessera/optim/demo.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::optim {

namespace {
// Indices travel as 16 bits, so a chunk (chunk x chunk positions for a 2-D
// parameter) must have at most 2^16 positions.
constexpr int64_t kMaxChunk = 256;
constexpr int64_t kBytesPerComponent = sizeof(float) + sizeof(uint16_t);
}  // namespace

void DemoConfig::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(compression_decay >= 0 && compression_decay < 1, prefix + "compression_decay",
                       "must be in [0, 1), got " << compression_decay);
  TESSERA_CHECK_CONFIG(compression_topk >= 1, prefix + "compression_topk", "must be >= 1, got " << compression_topk);
  TESSERA_CHECK_CONFIG(compression_chunk >= 1 && compression_chunk <= kMaxChunk, prefix + "compression_chunk",
                       "must be in [1, " << kMaxChunk << "] (indices inside a chunk travel as 16 bits), got "
                                         << compression_chunk);
  TESSERA_CHECK_CONFIG(weight_decay >= 0 && std::isfinite(weight_decay), prefix + "weight_decay",
                       "must be >= 0, got " << weight_decay);
}

namespace demo {

int64_t chunkSize(int64_t size, int64_t limit) {
  TESSERA_CHECK_ARG(size >= 1 && limit >= 1, "chunkSize: size and limit must be >= 1, got " << size << ", " << limit);
  if (size < limit) return size;
  for (int64_t d = limit; d > 1; --d) {
    if (size % d == 0) return d;
  }
  return 1;
}

at::Tensor dctMatrix(int64_t n) {
  TESSERA_CHECK_ARG(n >= 1, "dctMatrix: n must be >= 1, got " << n);
  at::Tensor d = at::empty({n, n}, at::kDouble);
  auto a = d.accessor<double, 2>();
  for (int64_t k = 0; k < n; ++k) {
    const double scale = std::sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) {
      a[k][i] = scale * std::cos(M_PI * static_cast<double>((2 * i + 1) * k) / static_cast<double>(2 * n));
    }
  }
  return d;
}

namespace {

// The DCT matrices of one tensor shape (rows; columns for 2-D) in one dtype.
struct DctPair {
  at::Tensor rows;  // (n1, n1)
  at::Tensor cols;  // (n2, n2); undefined for 1-D
};

DctPair dctPairFor(at::IntArrayRef shape, int64_t limit, at::ScalarType dtype) {
  TESSERA_CHECK_ARG(shape.size() == 1 || shape.size() == 2,
                    "DeMo transform: only 1-D and 2-D tensors are supported, got shape " << shape);
  DctPair pair;
  pair.rows = dctMatrix(chunkSize(shape[0], limit)).to(dtype);
  if (shape.size() == 2) pair.cols = dctMatrix(chunkSize(shape[1], limit)).to(dtype);
  return pair;
}

at::Tensor encodeWith(const at::Tensor& x, const DctPair& dct) {
  const int64_t n1 = dct.rows.size(0);
  if (x.dim() == 1) {
    return x.reshape({x.size(0) / n1, n1}).matmul(dct.rows.t());  // (L/n, n)
  }
  const int64_t n2 = dct.cols.size(0);
  // (R, C) -> (R/n1, n1, C/n2, n2) -> blocks (R/n1, C/n2, n1, n2)
  const at::Tensor blocks = x.reshape({x.size(0) / n1, n1, x.size(1) / n2, n2}).permute({0, 2, 1, 3});
  return at::matmul(at::matmul(dct.rows, blocks), dct.cols.t());
}

at::Tensor decodeWith(const at::Tensor& coefficients, at::IntArrayRef shape, const DctPair& dct) {
  if (shape.size() == 1) return coefficients.matmul(dct.rows).reshape(shape);
  // Orthonormal: the inverse of D1 B D2^T is D1^T C D2.
  const at::Tensor blocks = at::matmul(at::matmul(dct.rows.t(), coefficients), dct.cols);  // (R/n1, C/n2, n1, n2)
  return blocks.permute({0, 2, 1, 3}).reshape(shape);
}

}  // namespace

at::Tensor encode(const at::Tensor& x, int64_t limit) {
  return encodeWith(x, dctPairFor(x.sizes(), limit, x.scalar_type()));
}

at::Tensor decode(const at::Tensor& coefficients, const std::vector<int64_t>& shape, int64_t limit) {
  const DctPair dct = dctPairFor(shape, limit, coefficients.scalar_type());
  const int64_t chunkDims = static_cast<int64_t>(shape.size());
  TESSERA_CHECK_ARG(coefficients.dim() == 2 * chunkDims,
                    "decode: coefficients of shape " << coefficients.sizes() << " do not match a tensor of shape "
                                                     << at::IntArrayRef(shape));
  return decodeWith(coefficients, shape, dct);
}

}  // namespace demo

namespace {

// How one parameter is cut into chunks and how much of each chunk travels.
struct ChunkLayout {
  demo::DctPair dct;
  std::vector<int64_t> coefficientShape;  // encode()'s output shape
  int64_t chunks = 0;                     // number of chunks
  int64_t chunkNumel = 0;                 // positions per chunk
  int64_t keep = 0;                       // components sent per chunk: min(topk, chunkNumel)
  int64_t offset = 0;                     // first component of this parameter in the payload
};

ChunkLayout layoutFor(const at::Tensor& p, size_t index, const DemoConfig& config) {
  TESSERA_CHECK_ARG(p.dim() == 1 || p.dim() == 2, "DeMo: parameter " << index << " has shape " << p.sizes()
                                                                      << "; only 1-D and 2-D parameters are "
                                                                         "supported (reshape it or optimize it "
                                                                         "with another optimizer)");
  TESSERA_CHECK_ARG(p.device().is_cpu(), "DeMo: parameter " << index << " is on " << p.device()
                                                             << "; DeMo runs on CPU tensors only in this version");
  TESSERA_CHECK_ARG(p.numel() > 0 && at::isFloatingType(p.scalar_type()),
                    "DeMo: parameter " << index << " (shape " << p.sizes() << ", dtype " << p.scalar_type()
                                       << ") must be a non-empty floating-point tensor");
  ChunkLayout layout;
  layout.dct = demo::dctPairFor(p.sizes(), config.compression_chunk, p.scalar_type());
  const int64_t n1 = layout.dct.rows.size(0);
  if (p.dim() == 1) {
    layout.coefficientShape = {p.size(0) / n1, n1};
    layout.chunks = p.size(0) / n1;
    layout.chunkNumel = n1;
  } else {
    const int64_t n2 = layout.dct.cols.size(0);
    layout.coefficientShape = {p.size(0) / n1, p.size(1) / n2, n1, n2};
    layout.chunks = (p.size(0) / n1) * (p.size(1) / n2);
    layout.chunkNumel = n1 * n2;
  }
  layout.keep = std::min(config.compression_topk, layout.chunkNumel);
  return layout;
}

class Demo final : public ParameterOptimizer {
 public:
  Demo(const DemoConfig& config, std::vector<at::Tensor> parameters, comm::CommPtr comm, double lr)
      : ParameterOptimizer(std::move(parameters), lr), config_(config), comm_(std::move(comm)) {
    for (size_t i = 0; i < parameters_.size(); ++i) {
      ChunkLayout layout = layoutFor(parameters_[i], i, config_);
      layout.offset = components_;
      components_ += layout.chunks * layout.keep;
      layouts_.push_back(std::move(layout));
      delta_.push_back(at::zeros_like(parameters_[i], at::MemoryFormat::Contiguous));
    }
  }

  std::string name() const override { return "demo"; }

  OptimizerStepResult step() override {
    at::NoGradGuard noGrad;
    // Layout of one worker's payload: [components float32 values][components uint16 indices].
    at::Tensor payload = at::empty({components_ * kBytesPerComponent}, at::kByte);
    auto* bytes = payload.data_ptr<uint8_t>();
    for (size_t i = 0; i < parameters_.size(); ++i) compressInto(i, bytes);

    const int workers = comm_ ? comm_->size() : 1;
    at::Tensor gathered = payload;
    if (workers > 1) {
      gathered = at::empty({workers * payload.numel()}, at::kByte);
      comm_->allGather(payload, gathered);
    }
    for (size_t i = 0; i < parameters_.size(); ++i) applyUpdate(i, gathered.data_ptr<uint8_t>(), workers);
    return {};
  }

  std::vector<comm::CommPtr> communicators() const override {
    return comm_ ? std::vector<comm::CommPtr>{comm_} : std::vector<comm::CommPtr>{};
  }

  OptimizerState state() const override {
    OptimizerState s;
    s.perParameter["demo/delta"] = delta_;
    return s;
  }

  void loadState(const OptimizerState& s) override {
    checkOptimizerState("DeMo", s, parameters_, {"demo/delta"});
    const auto& source = s.perParameter.at("demo/delta");
    for (size_t i = 0; i < source.size(); ++i) {
      TESSERA_CHECK_ARG(source[i].defined(), "DeMo state: 'demo/delta' of parameter " << i << " is undefined");
    }
    copyStateInto(s, "demo/delta", delta_);
  }

 private:
  // Local half of the step for parameter i: weight decay, momentum, top-k of
  // its DCT, error feedback; writes the kept components into the payload.
  void compressInto(size_t i, uint8_t* payload) {
    at::Tensor& p = parameters_[i];
    const ChunkLayout& layout = layouts_[i];
    at::Tensor& delta = delta_[i];
    if (config_.weight_decay != 0) p.mul_(1 - lr_ * config_.weight_decay);
    delta.mul_(config_.compression_decay);
    if (p.grad().defined()) delta.add_(p.grad(), lr_);

    const at::Tensor coefficients = demo::encodeWith(delta, layout.dct).reshape({layout.chunks, layout.chunkNumel});
    const at::Tensor index = std::get<1>(at::topk(coefficients.abs(), layout.keep, /*dim=*/1, /*largest=*/true,
                                                  /*sorted=*/false));  // (chunks, keep) int64
    // What really travels: the value rounded to float32.
    const at::Tensor wireValue = coefficients.gather(1, index).to(at::kFloat).contiguous();
    const at::Tensor sent = at::zeros_like(coefficients).scatter_(1, index, wireValue.to(delta.scalar_type()));
    delta.sub_(demo::decodeWith(sent.reshape(layout.coefficientShape), p.sizes(), layout.dct));

    const int64_t count = layout.chunks * layout.keep;
    std::memcpy(payload + layout.offset * sizeof(float), wireValue.data_ptr<float>(), count * sizeof(float));
    const at::Tensor indexFlat = index.contiguous();
    const int64_t* source = indexFlat.data_ptr<int64_t>();
    uint8_t* indexBytes = payload + components_ * sizeof(float) + layout.offset * sizeof(uint16_t);
    for (int64_t c = 0; c < count; ++c) {
      const auto position = static_cast<uint16_t>(source[c]);
      indexBytes[2 * c] = static_cast<uint8_t>(position & 0xff);
      indexBytes[2 * c + 1] = static_cast<uint8_t>(position >> 8);
    }
  }

  // Global half for parameter i: scatter-mean every worker's components and
  // take a sign step on their decoded sum.
  void applyUpdate(size_t i, const uint8_t* gathered, int workers) {
    at::Tensor& p = parameters_[i];
    const ChunkLayout& layout = layouts_[i];
    const int64_t count = layout.chunks * layout.keep;
    const int64_t workerBytes = components_ * kBytesPerComponent;
    at::Tensor position = at::empty({workers * count}, at::kLong);  // flat position in (chunks * chunkNumel)
    at::Tensor value = at::empty({workers * count}, at::kFloat);
    int64_t* positionOut = position.data_ptr<int64_t>();
    float* valueOut = value.data_ptr<float>();
    for (int w = 0; w < workers; ++w) {
      const uint8_t* base = gathered + w * workerBytes;
      std::memcpy(valueOut + w * count, base + layout.offset * sizeof(float), count * sizeof(float));
      const uint8_t* indexBytes = base + components_ * sizeof(float) + layout.offset * sizeof(uint16_t);
      for (int64_t c = 0; c < count; ++c) {
        const int64_t inChunk = indexBytes[2 * c] | (static_cast<int64_t>(indexBytes[2 * c + 1]) << 8);
        positionOut[w * count + c] = (c / layout.keep) * layout.chunkNumel + inChunk;
      }
    }
    const at::ScalarType dtype = p.scalar_type();
    const int64_t positions = layout.chunks * layout.chunkNumel;
    // Summed in worker order, identically on every rank, so all ranks take the same step.
    at::Tensor sum = at::zeros({positions}, dtype).index_add_(0, position, value.to(dtype));
    at::Tensor hits = at::zeros({positions}, dtype).index_add_(0, position, at::ones({workers * count}, dtype));
    const at::Tensor mean = sum.div_(hits.clamp_min_(1));  // untouched positions: 0 / 1 = 0
    const at::Tensor direction = demo::decodeWith(mean.reshape(layout.coefficientShape), p.sizes(), layout.dct);
    p.sub_(direction.sign(), lr_);
  }

  DemoConfig config_;
  comm::CommPtr comm_;
  std::vector<ChunkLayout> layouts_;
  std::vector<at::Tensor> delta_;  // per parameter, its shape, contiguous
  int64_t components_ = 0;         // components one worker sends per step, all parameters
};

}  // namespace

int64_t demo::payloadBytesPerStep(const DemoConfig& config, const std::vector<at::Tensor>& parameters) {
  config.validate();
  int64_t components = 0;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const ChunkLayout layout = layoutFor(parameters[i], i, config);
    components += layout.chunks * layout.keep;
  }
  return components * kBytesPerComponent;
}

std::unique_ptr<Optimizer> makeDemo(const DemoConfig& config, std::vector<at::Tensor> parameters, comm::CommPtr comm,
                                    double lr) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr > 0 && std::isfinite(lr), "optim.lr", "must be > 0, got " << lr);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeDemo: no parameters to optimize");
  return std::make_unique<Demo>(config, std::move(parameters), std::move(comm), lr);
}

}  // namespace tessera::optim
