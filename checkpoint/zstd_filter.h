// The zstd HDF5 filter, id 32015 (registered by the HDF5 group for
// Zstandard; the one hdf5plugin's Zstd() writes and reads): each chunk is one
// zstd frame with its content size, cd_values[0] = compression level.
// Internal to checkpoint/.
#pragma once

#include <hdf5.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tessera::checkpoint {

constexpr H5Z_filter_t kZstdFilterId = 32015;

// The filter's class, for H5Zregister and for the plugin entry point.
const H5Z_class2_t* zstdFilterClass();

// Registers the filter with libhdf5 in this process. Idempotent, thread-safe.
// False if libhdf5 refused.
bool registerZstdFilter();

// One zstd frame of src (with the content size in its header, as the filter
// expects). `context` is reused across calls by one thread. Returns the
// compressed size; `out` is resized to hold at least that.
size_t zstdCompressChunk(void* context, const void* src, size_t bytes, int level, std::vector<uint8_t>& out);
// Decodes one zstd frame of exactly `bytes` bytes into dst; "" or the reason
// it cannot (corrupt frame, other size).
std::string zstdDecompressChunk(const void* frame, size_t frameBytes, void* dst, size_t bytes);
// A compression context for zstdCompressChunk; freed by zstdFreeContext.
void* zstdNewContext();
void zstdFreeContext(void* context);

}  // namespace tessera::checkpoint
