// DeMo: decoupled momentum optimization (arXiv 2411.19870; bloc97/DeMo's
// demo.py, followed where it and the paper differ). Each worker keeps a local
// momentum `delta`, sends only the top-k DCT components of each chunk of it,
// and every worker applies sign(decode(mean of what all sent)) (REFERENCE §2).
// Gradient sync by DDP must be off: DeMo is the only communication.
//
// step() is collective over the communicator (one all-gather of indices and
// values per parameter, or one for all parameters). Only 1-D and 2-D
// parameters are supported (others: InvalidArgument at construction, naming
// the index and shape).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/communicator.h"
#include "tessera/optim/optimizer.h"

namespace tessera::optim {

// The [demo] section. Plain struct; validate() before use.
struct DemoConfig {
  double compression_decay = 0.999;  // beta: delta = beta * delta + lr * g; in [0, 1)
  int64_t compression_topk = 32;     // components kept per chunk; >= 1
  int64_t compression_chunk = 64;    // target chunk length per dimension; >= 1
  double weight_decay = 0.0;         // decoupled: p *= 1 - lr * wd; >= 0

  void validate(const std::string& prefix = "demo.") const;
};

std::unique_ptr<Optimizer> makeDemo(const DemoConfig& config, std::vector<at::Tensor> parameters,
                                    comm::CommPtr comm, double lr);

// --- The transform, exposed for tests and benchmarks -----------------------
namespace demo {
// The largest divisor of `size` that is <= `limit` (size itself when size < limit).
int64_t chunkSize(int64_t size, int64_t limit);
// The orthonormal DCT-II matrix of size n (rows are basis vectors), float64.
at::Tensor dctMatrix(int64_t n);
// Chunked DCT of a 1-D or 2-D tensor with chunk `limit` per dimension, and
// its inverse: decode(encode(x)) == x up to rounding.
at::Tensor encode(const at::Tensor& x, int64_t limit);
at::Tensor decode(const at::Tensor& coefficients, const std::vector<int64_t>& shape, int64_t limit);
}  // namespace demo

}  // namespace tessera::optim
