// fashion-MNIST: a reader for the IDX format (gzip-compressed or raw) and the
// dataset as tensors.
//
// IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header
//   bytes 0-1  zero
//   byte  2    element type (0x08 = unsigned byte, the only one read here)
//   byte  3    number of dimensions d
//   then d big-endian uint32 sizes, then prod(sizes) elements, row-major.
// Images are 0x00000803 (N, 28, 28); labels 0x00000801 (N,).
// Not done here: other element types, data augmentation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/data/config.h"

namespace tessera::data {

// Mean and standard deviation of the training images' pixels after scaling to
// [0, 1] (computed over all 60000 x 784 pixels; checked by the tests).
inline constexpr double kFashionMnistMean = 0.2860;
inline constexpr double kFashionMnistStd = 0.3530;

// A decoded unsigned-byte IDX file.
struct IdxArray {
  std::vector<int64_t> dims;  // sizes from the header, outermost first
  std::vector<uint8_t> data;  // prod(dims) elements, row-major
};

// Reads the IDX file at `path` (gzip or raw) and checks that it is an
// unsigned-byte array with `expectedDims` dimensions and exactly the bytes its
// header announces. Throws DataError naming the path, the problem (bad magic,
// truncated, trailing bytes, bad gzip stream) and `package`, or saying that
// the file does not exist.
IdxArray readIdx(const std::string& path, int expectedDims,
                 const std::string& package = kFashionMnistPackage);

// One batch of images and their classes.
struct ImageBatch {
  at::Tensor images;  // (B, 784) float32
  at::Tensor labels;  // (B,) int64 in [0, 10)
};

// A split of fashion-MNIST in memory.
struct ImageDataset {
  at::Tensor images;  // (N, 784) float32: pixels / 255, normalized if asked
  at::Tensor labels;  // (N,) int64 in [0, 10)

  int64_t size() const { return labels.size(0); }
  // Gathers examples `indices` (each in [0, size())) in the given order.
  ImageBatch batch(const std::vector<int64_t>& indices) const;
};

// Loads split "train" (60000 examples) or "test" (10000) from `dir`, which
// holds {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz. normalize: see
// DataConfig::normalize. Throws DataError (see readIdx; also when the image
// and label counts differ or a label is not in [0, 10)), InvalidArgument for an
// unknown split.
ImageDataset loadFashionMnist(const std::string& dir, const std::string& split,
                              bool normalize = false);

}  // namespace tessera::data
