// DeMo (see the header for the algorithm and the wire format). The transform
// works on a per-parameter "chunk layout": the chunk size of each dimension
// (of the logical tensor when the parameter is an aligned shard of it), the
// boxes of the parameter's memory chunked one by one, the DCT matrices in the
// parameter's dtype (built once), and how many components each chunk sends.
#include "tessera/optim/demo.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: <ATen/ATen.h> stops including it in libtorch 2.x

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::optim {

namespace {
// Indices travel as 16 bits, so a chunk (chunk x chunk positions for a 2-D
// parameter) must have at most 2^16 positions.
constexpr int64_t kMaxChunk = 256;
constexpr int64_t kBytesPerComponent = sizeof(float) + sizeof(uint16_t);
constexpr const char* kStepKey = "demo/step";
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

// The DCT matrices of chunks of `chunk` (one size per dimension, 1-D or 2-D).
DctPair dctPairOfChunks(const std::vector<int64_t>& chunk, at::ScalarType dtype) {
  DctPair pair;
  pair.rows = dctMatrix(chunk[0]).to(dtype);
  if (chunk.size() == 2) pair.cols = dctMatrix(chunk[1]).to(dtype);
  return pair;
}

// The chunk sizes of a tensor of `shape`: chunkSize of each dimension.
std::vector<int64_t> chunksOf(at::IntArrayRef shape, int64_t limit) {
  std::vector<int64_t> chunk;
  for (int64_t size : shape) chunk.push_back(chunkSize(size, limit));
  return chunk;
}

DctPair dctPairFor(at::IntArrayRef shape, int64_t limit, at::ScalarType dtype) {
  TESSERA_CHECK_ARG(shape.size() == 1 || shape.size() == 2,
                    "DeMo transform: only 1-D and 2-D tensors are supported, got shape " << shape);
  return dctPairOfChunks(chunksOf(shape, limit), dtype);
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

// One box of a parameter's logical tensor, at [offset, offset + numel) of
// the parameter's flat memory (row-major inside the box). A tensor chunked
// by its own shape is one box: itself.
struct ChunkedBox {
  int64_t offset = 0;
  std::vector<int64_t> shape;  // 1-D or 2-D; multiples of the layout's chunk sizes
  int64_t chunks = 0;          // chunks in this box
};

// How one parameter is cut into chunks and how much of each chunk travels.
// Chunk c of the parameter is chunk c - (chunks of earlier boxes) of its box,
// numbered as encode() numbers a tensor's chunks.
struct ChunkLayout {
  demo::DctPair dct;
  std::vector<int64_t> chunk;       // chunk size per dimension
  std::vector<ChunkedBox> boxes;    // in memory order
  int64_t chunks = 0;               // number of chunks, all boxes
  int64_t chunkNumel = 0;           // positions per chunk
  int64_t keep = 0;                 // components sent per chunk: min(topk, chunkNumel)
  int64_t offset = 0;               // first component of this parameter in the payload
};

// encode()'s output shape for one box.
std::vector<int64_t> coefficientShape(const ChunkedBox& box, const std::vector<int64_t>& chunk) {
  std::vector<int64_t> shape;
  for (size_t d = 0; d < chunk.size(); ++d) shape.push_back(box.shape[d] / chunk[d]);
  shape.insert(shape.end(), chunk.begin(), chunk.end());
  return shape;
}

// The chunk sizes of the logical tensor when every piece of `pieces` is an
// aligned box of it (the header's condition) covering the parameter's
// `numel` elements; else nullopt and *why says what fails.
std::optional<std::vector<int64_t>> logicalChunks(const std::vector<parallel::ParameterPiece>& pieces, int64_t numel,
                                                  int64_t limit, std::string* why) {
  std::ostringstream reason;
  const parallel::ParameterPiece& first = pieces.front();
  const size_t dims = first.shape.size();
  int64_t covered = 0;
  for (const parallel::ParameterPiece& piece : pieces) {
    if (piece.name != first.name) {
      reason << "it holds pieces of several parameters (" << first.name << ", " << piece.name
             << ": an FSDP flat shard)";
    } else if (dims != 1 && dims != 2) {
      reason << "its logical tensor is " << dims << "-D (logical chunks are 1-D or 2-D)";
    } else if (!piece.slice.isWholeBox()) {
      reason << "it holds " << piece.slice.text() << ", a flat range rather than a box (an FSDP shard)";
    } else if (piece.tensorOffset != covered) {
      reason << "its pieces leave a gap before element " << piece.tensorOffset;
    }
    if (!reason.str().empty()) break;
    covered += piece.slice.numel;
  }
  if (reason.str().empty() && covered != numel) {
    reason << "its pieces cover " << covered << " of its " << numel << " elements (padding)";
  }
  if (!reason.str().empty()) {
    *why = reason.str();
    return std::nullopt;
  }
  const std::vector<int64_t> chunk = demo::chunksOf(first.shape, limit);
  for (const parallel::ParameterPiece& piece : pieces) {
    for (size_t d = 0; d < dims; ++d) {
      if (piece.slice.offsets[d] % chunk[d] != 0 || piece.slice.sizes[d] % chunk[d] != 0) {
        reason << "its piece " << piece.slice.text() << " of the " << at::IntArrayRef(first.shape)
               << " tensor straddles the logical chunks of " << at::IntArrayRef(chunk) << " (compression_chunk "
               << limit << ") in dimension " << d;
        *why = reason.str();
        return std::nullopt;
      }
    }
  }
  return chunk;
}

// `pieces`: what p holds of its logical tensor (empty: p is whole). When p is
// chunked by its own shape although pieces were given, *fallback says why.
ChunkLayout layoutFor(const at::Tensor& p, size_t index, const DemoConfig& config,
                      const std::vector<parallel::ParameterPiece>& pieces, std::string* fallback) {
  TESSERA_CHECK_ARG(p.device().is_cpu(), "DeMo: parameter " << index << " is on " << p.device()
                                                             << "; DeMo runs on CPU tensors only in this version");
  TESSERA_CHECK_ARG(p.numel() > 0 && at::isFloatingType(p.scalar_type()),
                    "DeMo: parameter " << index << " (shape " << p.sizes() << ", dtype " << p.scalar_type()
                                       << ") must be a non-empty floating-point tensor");
  ChunkLayout layout;
  std::optional<std::vector<int64_t>> logical;
  if (!pieces.empty()) logical = logicalChunks(pieces, p.numel(), config.compression_chunk, fallback);
  if (logical) {
    layout.chunk = *logical;
    for (const parallel::ParameterPiece& piece : pieces) {
      layout.boxes.push_back(ChunkedBox{piece.tensorOffset, piece.slice.sizes, 0});
    }
  } else {
    TESSERA_CHECK_ARG(p.dim() == 1 || p.dim() == 2,
                      "DeMo: parameter " << index << " has shape " << p.sizes()
                                         << "; only 1-D and 2-D parameters are supported (reshape it or optimize "
                                            "it with another optimizer)");
    layout.chunk = demo::chunksOf(p.sizes(), config.compression_chunk);
    layout.boxes.push_back(ChunkedBox{0, p.sizes().vec(), 0});
  }
  layout.dct = demo::dctPairOfChunks(layout.chunk, p.scalar_type());
  layout.chunkNumel = 1;
  for (int64_t c : layout.chunk) layout.chunkNumel *= c;
  for (ChunkedBox& box : layout.boxes) {
    box.chunks = 1;
    for (size_t d = 0; d < layout.chunk.size(); ++d) box.chunks *= box.shape[d] / layout.chunk[d];
    layout.chunks += box.chunks;
  }
  layout.keep = std::min(config.compression_topk, layout.chunkNumel);
  return layout;
}

// The chunked DCT of x (a tensor shaped like the parameter), as (chunks, chunkNumel).
at::Tensor encodeChunks(const at::Tensor& x, const ChunkLayout& layout) {
  const at::Tensor flat = x.reshape({-1});
  std::vector<at::Tensor> parts;
  for (const ChunkedBox& box : layout.boxes) {
    const int64_t numel = box.chunks * layout.chunkNumel;
    parts.push_back(demo::encodeWith(flat.narrow(0, box.offset, numel).view(box.shape), layout.dct)
                        .reshape({box.chunks, layout.chunkNumel}));
  }
  return parts.size() == 1 ? parts.front() : at::cat(parts);
}

// The inverse: (chunks, chunkNumel) coefficients to a tensor of `shape`.
at::Tensor decodeChunks(const at::Tensor& coefficients, const ChunkLayout& layout, at::IntArrayRef shape) {
  if (layout.boxes.size() == 1) {
    const ChunkedBox& box = layout.boxes.front();
    return demo::decodeWith(coefficients.reshape(coefficientShape(box, layout.chunk)), box.shape, layout.dct)
        .reshape(shape);
  }
  at::Tensor out = at::empty({layout.chunks * layout.chunkNumel}, coefficients.options());
  int64_t chunk = 0;
  for (const ChunkedBox& box : layout.boxes) {
    const at::Tensor part = coefficients.narrow(0, chunk, box.chunks).reshape(coefficientShape(box, layout.chunk));
    out.narrow(0, box.offset, box.chunks * layout.chunkNumel)
        .copy_(demo::decodeWith(part, box.shape, layout.dct).reshape({-1}));
    chunk += box.chunks;
  }
  return out.view(shape);
}

// The layout of every parameter; logs once which are chunked as shards although
// a layout was given, and why.
std::vector<ChunkLayout> layoutsFor(const std::vector<at::Tensor>& parameters, const DemoConfig& config,
                                    const DemoLayout& pieces, bool log) {
  TESSERA_CHECK_ARG(pieces.empty() || pieces.size() == parameters.size(),
                    "DeMo: the layout describes " << pieces.size() << " tensors but there are " << parameters.size()
                                                  << " parameters (pass DataParallel::parameterLayout() of the "
                                                     "strategy whose optimizerParameters() these are, or none)");
  std::vector<ChunkLayout> layouts;
  std::ostringstream fallbacks;
  int shards = 0;
  static const std::vector<parallel::ParameterPiece> kWhole;
  for (size_t i = 0; i < parameters.size(); ++i) {
    std::string why;
    layouts.push_back(layoutFor(parameters[i], i, config, pieces.empty() ? kWhole : pieces[i], &why));
    if (!why.empty()) {
      fallbacks << (shards++ == 0 ? "" : "; ") << pieces[i].front().name << ": " << why;
    }
  }
  if (log && shards > 0) {
    TESSERA_LOG(kInfo) << "DeMo: " << shards << " of " << parameters.size()
                       << " tensors are chunked as shards of their own shape, not on their logical tensor, so their "
                          "steps differ from an unsharded run's (optim/demo.h): "
                       << fallbacks.str();
  }
  return layouts;
}

class Demo final : public ParameterOptimizer {
 public:
  Demo(const DemoConfig& config, std::vector<at::Tensor> parameters, comm::CommPtr comm, double lr,
       const DemoLayout& pieces, ElasticCollective collective = nullptr)
      : ParameterOptimizer(std::move(parameters), lr), config_(config), comm_(std::move(comm)),
        collective_(std::move(collective)) {
    layouts_ = layoutsFor(parameters_, config_, pieces, /*log=*/true);
    for (size_t i = 0; i < parameters_.size(); ++i) {
      layouts_[i].offset = components_;
      components_ += layouts_[i].chunks * layouts_[i].keep;
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
    ++step_;

    int workers = comm_ ? comm_->size() : 1;
    at::Tensor gathered = payload;
    if (collective_) {
      // Elastic: the all-gather on this step's group. The body reads the
      // payload and writes only `gathered` and `workers`: a retried attempt
      // gathers the same payload again; nothing is applied before the commit.
      collective_(step_, [&](comm::Communicator& group) {
        workers = group.size();
        gathered = at::empty({workers * payload.numel()}, at::kByte);
        if (workers > 1) {
          group.allGather(payload, gathered);
        } else {
          gathered.copy_(payload);
        }
      });
    } else if (workers > 1) {
      gathered = at::empty({workers * payload.numel()}, at::kByte);
      comm_->allGather(payload, gathered);
    }
    for (size_t i = 0; i < parameters_.size(); ++i) applyUpdate(i, gathered.data_ptr<uint8_t>(), workers);
    // Elastic: every step is a sync, after which the launcher serves joiners.
    OptimizerStepResult result;
    result.outerStep = static_cast<bool>(collective_);
    return result;
  }

  std::vector<comm::CommPtr> communicators() const override {
    return comm_ ? std::vector<comm::CommPtr>{comm_} : std::vector<comm::CommPtr>{};
  }

  OptimizerState state() const override {
    OptimizerState s;
    s.perParameter["demo/delta"] = delta_;
    s.scalars[kStepKey] = std::to_string(step_);
    return s;
  }

  void loadState(const OptimizerState& s) override {
    checkOptimizerState("DeMo", s, parameters_, {"demo/delta"});
    const auto& source = s.perParameter.at("demo/delta");
    for (size_t i = 0; i < source.size(); ++i) {
      TESSERA_CHECK_ARG(source[i].defined(), "DeMo state: 'demo/delta' of parameter " << i << " is undefined");
    }
    // States saved before the counter existed have none: they count from 0.
    // An elastic joiner always gets one (its peer runs this version).
    const int64_t step = s.scalars.count(kStepKey) != 0 ? parseCount(s, kStepKey) : 0;
    copyStateInto(s, "demo/delta", delta_);
    step_ = step;
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

    const at::Tensor coefficients = encodeChunks(delta, layout);  // (chunks, chunkNumel)
    const at::Tensor index = std::get<1>(at::topk(coefficients.abs(), layout.keep, /*dim=*/1, /*largest=*/true,
                                                  /*sorted=*/false));  // (chunks, keep) int64
    // What really travels: the value rounded to float32.
    const at::Tensor wireValue = coefficients.gather(1, index).to(at::kFloat).contiguous();
    const at::Tensor sent = at::zeros_like(coefficients).scatter_(1, index, wireValue.to(delta.scalar_type()));
    delta.sub_(decodeChunks(sent, layout, p.sizes()));

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
    const at::Tensor direction = decodeChunks(mean.reshape({layout.chunks, layout.chunkNumel}), layout, p.sizes());
    p.sub_(direction.sign(), lr_);
  }

  DemoConfig config_;
  comm::CommPtr comm_;
  ElasticCollective collective_;   // elastic: each step's all-gather runs here instead of on comm_
  int64_t step_ = 0;               // step() calls completed: the elastic sync index
  std::vector<ChunkLayout> layouts_;
  std::vector<at::Tensor> delta_;  // per parameter, its shape, contiguous
  int64_t components_ = 0;         // components one worker sends per step, all parameters
};

}  // namespace

int64_t demo::payloadBytesPerStep(const DemoConfig& config, const std::vector<at::Tensor>& parameters,
                                  const DemoLayout& layout) {
  config.validate();
  int64_t components = 0;
  for (const ChunkLayout& l : layoutsFor(parameters, config, layout, /*log=*/false)) components += l.chunks * l.keep;
  return components * kBytesPerComponent;
}

std::unique_ptr<Optimizer> makeDemo(const DemoConfig& config, std::vector<at::Tensor> parameters, comm::CommPtr comm,
                                    double lr, DemoLayout layout) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr > 0 && std::isfinite(lr), "optim.lr", "must be > 0, got " << lr);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeDemo: no parameters to optimize");
  return std::make_unique<Demo>(config, std::move(parameters), std::move(comm), lr, layout);
}

std::unique_ptr<Optimizer> makeElasticDemo(const DemoConfig& config, std::vector<at::Tensor> parameters,
                                           ElasticCollective collective, double lr, DemoLayout layout) {
  config.validate();
  TESSERA_CHECK_CONFIG(lr > 0 && std::isfinite(lr), "optim.lr", "must be > 0, got " << lr);
  TESSERA_CHECK_ARG(!parameters.empty(), "makeElasticDemo: no parameters to optimize");
  TESSERA_CHECK_ARG(collective != nullptr, "makeElasticDemo: no elastic collective");
  return std::make_unique<Demo>(config, std::move(parameters), nullptr, lr, layout, std::move(collective));
}

}  // namespace tessera::optim
