#include "tessera/core/data/fashion_mnist.h"

#include <ATen/ATen.h>
#if TESSERA_HAVE_ZLIB
#include <zlib.h>
#else
#include <fstream>
#include <iterator>

#include "tessera/core/error.h"
#endif

#include <filesystem>
#include <iomanip>
#include <memory>
#include <sstream>

namespace tessera::data {

namespace {

constexpr int64_t kImageSide = 28;
constexpr int64_t kClasses = 10;

[[noreturn]] void fail(const std::string& path, const std::string& problem,
                       const std::string& package) {
  throw DataError("IDX file " + path + " is corrupt: " + problem + "; reinstall " + package +
                  " (scripts/setup.sh)");
}

#if TESSERA_HAVE_ZLIB
// The whole decompressed content of a gzip file (zlib reads a file that is not
// gzip as is, so raw IDX files work too).
std::vector<uint8_t> readGzip(const std::string& path, const std::string& package) {
  std::unique_ptr<gzFile_s, int (*)(gzFile)> file(gzopen(path.c_str(), "rb"), gzclose);
  if (!file) throw DataError("cannot open " + path + "; install " + package + " (scripts/setup.sh)");
  gzbuffer(file.get(), 1 << 17);
  std::vector<uint8_t> out;
  constexpr unsigned kChunk = 1 << 20;
  for (;;) {
    const size_t at = out.size();
    out.resize(at + kChunk);
    const int got = gzread(file.get(), out.data() + at, kChunk);
    if (got < 0) {
      int code = 0;
      fail(path, std::string("bad gzip stream (") + gzerror(file.get(), &code) + ")", package);
    }
    out.resize(at + static_cast<size_t>(got));
    if (got == 0) break;
  }
  // gzread returns a short count, not an error, on a stream cut inside a
  // member; gzclose_r's status catches it.
  int code = 0;
  gzerror(file.get(), &code);
  if (code != Z_OK && code != Z_BUF_ERROR) fail(path, "bad gzip stream", package);
  if (gzclose_r(file.release()) != Z_OK) fail(path, "truncated gzip stream (unexpected end of file)", package);
  return out;
}
#else
// Without zlib (TESSERA_WITH_ZLIB=OFF): raw IDX files read as they are; a
// gzip-compressed one is refused naming the option and the fix.
std::vector<uint8_t> readGzip(const std::string& path, const std::string& package) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError("cannot open " + path + "; install " + package + " (scripts/setup.sh)");
  std::vector<uint8_t> out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (out.size() >= 2 && out[0] == 0x1f && out[1] == 0x8b) {
    throw NotSupported(path + " is gzip-compressed, but this tessera build has no zlib (TESSERA_WITH_ZLIB=OFF "
                       "or zlib1g-dev missing when it was configured): decompress it (gunzip -k) and pass the "
                       "raw file, or install zlib1g-dev and reconfigure");
  }
  return out;
}
#endif

uint32_t bigEndian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

}  // namespace

IdxArray readIdx(const std::string& path, int expectedDims, const std::string& package) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw DataError("IDX file " + path + " does not exist; install " + package +
                    " (scripts/setup.sh)");
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw DataError("IDX file " + path + " is not a regular file; reinstall " + package +
                    " (scripts/setup.sh)");
  }
  std::vector<uint8_t> bytes = readGzip(path, package);
  const auto hex = [](uint32_t v) {
    std::ostringstream s;
    s << "0x" << std::hex << std::setw(8) << std::setfill('0') << v;
    return s.str();
  };
  if (bytes.size() < 4) fail(path, "only " + std::to_string(bytes.size()) + " bytes, no header", package);
  const uint32_t magic = bigEndian32(bytes.data());
  const uint32_t expectedMagic = 0x0800u | static_cast<uint32_t>(expectedDims);
  if (magic != expectedMagic) {
    fail(path, "bad magic number " + hex(magic) + ", expected " + hex(expectedMagic) +
                   " (unsigned bytes, " + std::to_string(expectedDims) + " dimensions)",
         package);
  }
  const size_t header = 4 + 4 * static_cast<size_t>(expectedDims);
  if (bytes.size() < header) fail(path, "truncated header", package);

  IdxArray array;
  uint64_t elements = 1;
  for (int d = 0; d < expectedDims; ++d) {
    const uint32_t size = bigEndian32(bytes.data() + 4 + 4 * d);
    array.dims.push_back(size);
    elements *= size;
    if (elements > (uint64_t{1} << 40)) fail(path, "implausible sizes in the header", package);
  }
  const uint64_t payload = bytes.size() - header;
  if (payload < elements) {
    fail(path, "truncated: the header announces " + std::to_string(elements) +
                   " bytes of data, the file holds " + std::to_string(payload),
         package);
  }
  if (payload > elements) {
    fail(path, std::to_string(payload - elements) + " bytes after the " +
                   std::to_string(elements) + " the header announces",
         package);
  }
  bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(header));
  array.data = std::move(bytes);
  return array;
}

ImageBatch ImageDataset::batch(const std::vector<int64_t>& indices) const {
  const int64_t n = size();
  for (const int64_t i : indices) {
    TESSERA_CHECK_ARG(i >= 0 && i < n, "example index " << i << " out of range [0, " << n << ")");
  }
  const auto index = at::tensor(indices, at::kLong);                 // (B,)
  return {images.index_select(0, index), labels.index_select(0, index)};  // (B, 784), (B,)
}

ImageDataset loadFashionMnist(const std::string& dir, const std::string& split, bool normalize) {
  TESSERA_CHECK_ARG(split == "train" || split == "test",
                    "fashion-MNIST split must be \"train\" or \"test\", got \"" << split << "\"");
  const std::string prefix = dir + "/" + (split == "train" ? "train" : "t10k");
#if TESSERA_HAVE_ZLIB
  const std::string suffix = ".gz";
#else
  // Without zlib the decompressed files (gunzip -k) are read when present.
  const bool raw = std::filesystem::exists(prefix + "-images-idx3-ubyte");
  const std::string suffix = raw ? "" : ".gz";
#endif
  const std::string imagesPath = prefix + "-images-idx3-ubyte" + suffix;
  const std::string labelsPath = prefix + "-labels-idx1-ubyte" + suffix;
  IdxArray images = readIdx(imagesPath, 3);
  IdxArray labels = readIdx(labelsPath, 1);
  if (images.dims[1] != kImageSide || images.dims[2] != kImageSide) {
    fail(imagesPath, "images are " + std::to_string(images.dims[1]) + "x" +
                         std::to_string(images.dims[2]) + ", expected 28x28",
         kFashionMnistPackage);
  }
  if (images.dims[0] != labels.dims[0]) {
    fail(labelsPath, std::to_string(labels.dims[0]) + " labels for the " +
                         std::to_string(images.dims[0]) + " images of " + imagesPath,
         kFashionMnistPackage);
  }
  for (const uint8_t label : labels.data) {
    if (label >= kClasses) fail(labelsPath, "label " + std::to_string(label) + " not in [0, 10)",
                                kFashionMnistPackage);
  }
  const int64_t n = images.dims[0];
  const auto pixels = at::from_blob(images.data.data(), {n, kImageSide * kImageSide}, at::kByte);
  ImageDataset dataset;
  dataset.images = pixels.to(at::kFloat).div_(255.0f);  // (N, 784) in [0, 1]
  if (normalize) dataset.images.sub_(kFashionMnistMean).div_(kFashionMnistStd);
  dataset.labels = at::from_blob(labels.data.data(), {n}, at::kByte).to(at::kLong);  // (N,)
  return dataset;
}

}  // namespace tessera::data
