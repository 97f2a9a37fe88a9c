#include "checkpoint/zstd_filter.h"

#include <zstd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace tessera::checkpoint {
namespace {

// A corrupt frame header could claim any size: refuse anything a chunk cannot be.
constexpr unsigned long long kMaxChunkBytes = 1ull << 32;

size_t zstdFilter(unsigned int flags, size_t cdCount, const unsigned int cdValues[], size_t nbytes,
                  size_t* bufferSize, void** buffer) {
  if (flags & H5Z_FLAG_REVERSE) {
    const unsigned long long contentSize = ZSTD_getFrameContentSize(*buffer, nbytes);
    if (contentSize == ZSTD_CONTENTSIZE_ERROR || contentSize == ZSTD_CONTENTSIZE_UNKNOWN ||
        contentSize > kMaxChunkBytes) {
      return 0;  // HDF5 reports the chunk as undecodable
    }
    void* out = std::malloc(contentSize == 0 ? 1 : contentSize);
    if (out == nullptr) return 0;
    const size_t got = ZSTD_decompress(out, contentSize, *buffer, nbytes);
    if (ZSTD_isError(got) || got != contentSize) {
      std::free(out);
      return 0;
    }
    std::free(*buffer);  // libhdf5 1.10 allocates filter buffers with malloc
    *buffer = out;
    *bufferSize = contentSize;
    return got;
  }
  const int level = cdCount > 0 ? static_cast<int>(cdValues[0]) : 3;
  const size_t bound = ZSTD_compressBound(nbytes);
  void* out = std::malloc(bound);
  if (out == nullptr) return 0;
  const size_t size = ZSTD_compress(out, bound, *buffer, nbytes, level);
  if (ZSTD_isError(size)) {
    std::free(out);
    return 0;
  }
  std::free(*buffer);
  *buffer = out;
  *bufferSize = bound;
  return size;
}

const H5Z_class2_t kZstdClass = {
    H5Z_CLASS_T_VERS, kZstdFilterId, 1, 1, "zstd", nullptr, nullptr, zstdFilter,
};

}  // namespace

const H5Z_class2_t* zstdFilterClass() { return &kZstdClass; }

bool registerZstdFilter() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = H5Zregister(&kZstdClass) >= 0; });
  return ok;
}

std::string zstdDecompressChunk(const void* frame, size_t frameBytes, void* dst, size_t bytes) {
  const unsigned long long contentSize = ZSTD_getFrameContentSize(frame, frameBytes);
  if (contentSize != bytes) {
    return "zstd frame holds " +
           (contentSize >= ZSTD_CONTENTSIZE_ERROR ? std::string("no readable size") : std::to_string(contentSize) + " bytes") +
           ", expected " + std::to_string(bytes);
  }
  const size_t got = ZSTD_decompress(dst, bytes, frame, frameBytes);
  if (ZSTD_isError(got)) return std::string("zstd: ") + ZSTD_getErrorName(got);
  if (got != bytes) return "zstd frame decoded to " + std::to_string(got) + " bytes, expected " + std::to_string(bytes);
  return "";
}

void* zstdNewContext() { return ZSTD_createCCtx(); }
void zstdFreeContext(void* context) { ZSTD_freeCCtx(static_cast<ZSTD_CCtx*>(context)); }

size_t zstdCompressChunk(void* context, const void* src, size_t bytes, int level, std::vector<uint8_t>& out) {
  const size_t bound = ZSTD_compressBound(bytes);
  if (out.size() < bound) out.resize(bound);
  const size_t size = ZSTD_compressCCtx(static_cast<ZSTD_CCtx*>(context), out.data(), bound, src, bytes, level);
  if (ZSTD_isError(size)) throw std::runtime_error(std::string("zstd: ") + ZSTD_getErrorName(size));
  return size;
}

}  // namespace tessera::checkpoint
