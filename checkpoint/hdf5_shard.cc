#include "checkpoint/hdf5_shard.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include <zstd.h>

#include "checkpoint/file_ops.h"
#include "checkpoint/zstd_filter.h"
#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/numerics/torch_float8.h"

namespace tessera::checkpoint {
namespace {

// libhdf5 may be built without thread safety: every call of ours holds this.
// Automatic error printing is off; errors are read from the stack instead.
std::unique_lock<std::mutex> lockHdf5() {
  static std::mutex mutex;
  std::unique_lock<std::mutex> lock(mutex);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  if (!registerZstdFilter()) throw CheckpointError("libhdf5 refused to register the zstd filter (id 32015)");
  return lock;
}

// One line per libhdf5 error record, the innermost three. The sec2 driver's
// "file write failed: time = ..., errno = 28, error message = 'No space left
// on device', ..." becomes "file write failed: No space left on device (errno 28)".
herr_t collectError(unsigned depth, const H5E_error2_t* error, void* data) {
  auto* out = static_cast<std::pair<std::string, int>*>(data);
  if (error->desc == nullptr || error->desc[0] == '\0' || out->second >= 3) return 0;
  std::string desc = error->desc;
  for (char& c : desc) {
    if (c == '\n') c = ' ';
  }
  const size_t message = desc.find("error message = '");
  const size_t number = desc.find("errno = ");
  if (message != std::string::npos && number != std::string::npos) {
    const size_t begin = message + std::strlen("error message = '");
    const std::string head = desc.substr(0, desc.find(':'));
    desc = head + ": " + desc.substr(begin, desc.find('\'', begin) - begin) + " (errno " +
           std::to_string(std::atoi(desc.c_str() + number + std::strlen("errno = "))) + ")";
  }
  if (desc.size() > 300) desc = desc.substr(0, 300) + "...";
  if (out->first.find(desc) != std::string::npos) return 0;
  if (!out->first.empty()) out->first += "; ";
  out->first += desc;
  ++out->second;
  return 0;
}

// libhdf5's error stack of this thread, innermost cause first, then cleared.
// The sec2 driver reports a failed write as "... errno = 28, error message =
// 'No space left on device' ...": the disk-full hint is added for it.
std::string hdf5ErrorText() {
  std::pair<std::string, int> collected;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collectError, &collected);
  H5Eclear2(H5E_DEFAULT);
  std::string text = collected.first;
  if (text.empty()) text = "libhdf5 gave no reason";
  if (text.find("(errno 28)") != std::string::npos || text.find("(errno 122)") != std::string::npos) {
    text += " (" + std::string(kDiskFullHint) + ")";
  }
  return text;
}

// IEEE half precision, the way h5py declares it (so h5py reads numpy float16).
hid_t makeFloat16Type() {
  const hid_t type = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(type, 15, 10, 5, 0, 10);
  H5Tset_size(type, 2);
  H5Tset_ebias(type, 15);
  H5Tset_order(type, H5T_ORDER_LE);
  return type;
}

// The file type of a dtype; the caller closes it. Bits are stored as they lie
// in memory (little-endian); bfloat16 is 16-bit unsigned with dtype="bfloat16".
hid_t fileTypeOf(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return H5Tcopy(H5T_IEEE_F32LE);
    case at::kDouble: return H5Tcopy(H5T_IEEE_F64LE);
    case at::kHalf: return makeFloat16Type();
    case at::kBFloat16: return H5Tcopy(H5T_STD_U16LE);
    case at::kLong: return H5Tcopy(H5T_STD_I64LE);
    case at::kInt: return H5Tcopy(H5T_STD_I32LE);
    case at::kShort: return H5Tcopy(H5T_STD_I16LE);
    case at::kChar: return H5Tcopy(H5T_STD_I8LE);
    case at::kByte: return H5Tcopy(H5T_STD_U8LE);
    case at::kBool: return H5Tcopy(H5T_STD_U8LE);
#if TESSERA_HAS_TORCH_FLOAT8
    case at::kFloat8_e4m3fn:  // the OCP codes as bytes, dtype attribute "float8_e4m3fn"
    case at::kFloat8_e5m2: return H5Tcopy(H5T_STD_U8LE);
#endif
    default: return -1;
  }
}

void writeStringAttribute(hid_t object, const char* name, const std::string& value) {
  const hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t attr = H5Acreate2(object, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  const char* text = value.c_str();
  const herr_t status = attr < 0 ? -1 : H5Awrite(attr, type, &text);
  if (attr >= 0) H5Aclose(attr);
  H5Sclose(space);
  H5Tclose(type);
  if (status < 0) throw CheckpointError(std::string("attribute ") + name + ": " + hdf5ErrorText());
}

void writeIntAttribute(hid_t object, const char* name, const std::vector<int64_t>& values, bool scalar) {
  const hsize_t count = values.size();
  const hid_t space = scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &count, nullptr);
  const hid_t attr = H5Acreate2(object, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  const int64_t none = 0;
  const herr_t status = attr < 0 ? -1 : H5Awrite(attr, H5T_NATIVE_INT64, values.empty() ? &none : values.data());
  if (attr >= 0) H5Aclose(attr);
  H5Sclose(space);
  if (status < 0) throw CheckpointError(std::string("attribute ") + name + ": " + hdf5ErrorText());
}

std::vector<hsize_t> toHsize(const std::vector<int64_t>& values) {
  return std::vector<hsize_t>(values.begin(), values.end());
}

int64_t productOf(const std::vector<int64_t>& dims, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t d = begin; d < end; ++d) n *= dims[d];
  return n;
}

}  // namespace

std::vector<int64_t> pieceDatasetDims(const TensorSlice& slice, int formatVersion) {
  if (formatVersion >= 2 && slice.isWholeBox()) {
    return slice.sizes.empty() ? std::vector<int64_t>{1} : slice.sizes;
  }
  return {slice.numel};
}

ChunkGrid ChunkGrid::plan(const std::vector<int64_t>& dims, size_t elementSize, int64_t maxChunkBytes) {
  ChunkGrid g;
  g.dims = dims;
  const int64_t maxPerChunk = std::max<int64_t>(1, maxChunkBytes / static_cast<int64_t>(elementSize));
  const int n = static_cast<int>(dims.size());
  g.split = n - 1;
  for (int d = 0; d < n; ++d) {
    if (productOf(dims, d + 1, n) <= maxPerChunk) {
      g.split = d;
      break;
    }
  }
  const int64_t trailing = productOf(dims, g.split + 1, n);
  const int64_t maxIndices = std::max<int64_t>(1, maxPerChunk / trailing);
  // Equal chunks: the padding of the last one stays below one index per chunk.
  const int64_t chunks = (dims[g.split] + maxIndices - 1) / maxIndices;
  g.perChunk = (dims[g.split] + chunks - 1) / chunks;
  return g;
}

bool ChunkGrid::fromChunkDims(const std::vector<int64_t>& dims, const std::vector<int64_t>& chunkDims, ChunkGrid* out) {
  const int n = static_cast<int>(dims.size());
  if (n == 0 || static_cast<int>(chunkDims.size()) != n) return false;
  for (int split = 0; split < n; ++split) {
    bool fits = chunkDims[split] >= 1 && chunkDims[split] <= dims[split];
    for (int d = 0; d < n && fits; ++d) {
      if (d < split) fits = chunkDims[d] == 1;
      if (d > split) fits = chunkDims[d] == dims[d];
    }
    if (fits) {
      *out = ChunkGrid{dims, split, chunkDims[split]};
      return true;
    }
  }
  return false;
}

std::vector<int64_t> ChunkGrid::chunkDims() const {
  std::vector<int64_t> out(dims.size(), 1);
  out[split] = perChunk;
  for (size_t d = split + 1; d < dims.size(); ++d) out[d] = dims[d];
  return out;
}

int64_t ChunkGrid::chunkNumel() const { return perChunk * productOf(dims, split + 1, dims.size()); }

int64_t ChunkGrid::count() const {
  return productOf(dims, 0, split) * ((dims[split] + perChunk - 1) / perChunk);
}

ChunkGrid::Chunk ChunkGrid::chunk(int64_t index) const {
  const int64_t along = (dims[split] + perChunk - 1) / perChunk;  // chunks along dim `split`
  const int64_t trailing = productOf(dims, split + 1, dims.size());
  int64_t outer = index / along;
  const int64_t c = index % along;
  Chunk out;
  out.coords.assign(dims.size(), 0);
  out.first = outer * dims[split] * trailing + c * perChunk * trailing;
  for (int d = split - 1; d >= 0; --d) {
    out.coords[d] = outer % dims[d];
    outer /= dims[d];
  }
  out.coords[split] = c * perChunk;
  out.numel = std::min(perChunk, dims[split] - c * perChunk) * trailing;
  return out;
}

std::string dtypeName(at::ScalarType dtype, const std::string& tensor) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
#if TESSERA_HAS_TORCH_FLOAT8
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2: return "float8_e5m2";
#endif
    default:
      throw CheckpointError("tensor " + tensor + " has dtype " + std::string(c10::toString(dtype)) +
                            ", which checkpoints cannot store: convert it to one of float32, float64, "
                            "float16, bfloat16, int64, int32, int16, int8, uint8, bool (and float8_e4m3fn, float8_e5m2 with torch >= 2.1)");
  }
}

bool dtypeFromName(const std::string& name, at::ScalarType* dtype) {
  static const std::pair<const char*, at::ScalarType> kNames[] = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
      {"int64", at::kLong},    {"int32", at::kInt},      {"int16", at::kShort},  {"int8", at::kChar},
      {"uint8", at::kByte},    {"bool", at::kBool},
#if TESSERA_HAS_TORCH_FLOAT8
      {"float8_e4m3fn", at::kFloat8_e4m3fn}, {"float8_e5m2", at::kFloat8_e5m2},
#endif
  };
  for (const auto& [text, type] : kNames) {
    if (name == text) {
      *dtype = type;
      return true;
    }
  }
  return false;
}

ShardWriter::ShardWriter(std::string path, int64_t step, int rank, int worldSize, int64_t reserveBytes)
    : path_(std::move(path)) {
  // Space first, before libhdf5 holds the file: a disk too full fails here,
  // cleanly. libhdf5 1.10 cannot close a file whose metadata flush failed
  // (ENOSPC) and crashes at exit on it, so its writes must not run out.
  const std::string reservation = path_ + ".reserve";
  if (reserveBytes > 0) {
    const int fd = ::open(reservation.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throwFileError("cannot create", reservation, errno);
    const int error = ::posix_fallocate(fd, 0, reserveBytes);
    ::close(fd);
    if (error == ENOSPC || error == EDQUOT) {
      ::unlink(reservation.c_str());
      throw CheckpointError("cannot reserve " + std::to_string(reserveBytes) + " bytes for " + path_ + ": " +
                            describeErrno(error));
    }
  }
  auto lock = lockHdf5();
  file_ = H5Fcreate(path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file_ < 0) {
    ::unlink(reservation.c_str());
    fail("cannot create");
  }
  if (reserveBytes > 0) {  // hand the reserved space over to the shard file
    ::unlink(reservation.c_str());
    reserveFd_ = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
    if (reserveFd_ >= 0 && ::posix_fallocate(reserveFd_, 0, reserveBytes) != 0) {
      ::close(reserveFd_);
      reserveFd_ = -1;  // best effort (e.g. not supported): libhdf5 writes as usual
    }
  }
  writeIntAttribute(file_, "tessera_format_version", {kCheckpointFormatVersion}, true);
  writeIntAttribute(file_, "step", {step}, true);
  writeIntAttribute(file_, "rank", {rank}, true);
  writeIntAttribute(file_, "world_size", {worldSize}, true);
}

ShardWriter::~ShardWriter() {
  if (reserveFd_ >= 0) ::close(reserveFd_);
  if (dataset_ < 0 && file_ < 0) return;
  auto lock = lockHdf5();
  if (dataset_ >= 0) H5Dclose(dataset_);
  if (file_ >= 0) H5Fclose(file_);
  H5Eclear2(H5E_DEFAULT);
}

void ShardWriter::fail(const std::string& what) {
  throw CheckpointError("writing " + path_ + (current_.path.empty() ? "" : " (dataset " + current_.path + ")") +
                        ": " + what + ": " + hdf5ErrorText());
}

void ShardWriter::createDataset(const PieceDataset& d) {
  auto lock = lockHdf5();
  current_ = d;
  const std::vector<hsize_t> dims = toHsize(d.grid.dims);
  const std::vector<hsize_t> chunk = toHsize(d.grid.chunkDims());
  const int rank = static_cast<int>(dims.size());
  const hid_t type = fileTypeOf(d.dtype);
  const hid_t space = H5Screate_simple(rank, dims.data(), nullptr);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(dcpl, rank, chunk.data());
  H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
  H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_INCR);
  if (d.shuffle) H5Pset_shuffle(dcpl);
  if (d.zstdLevel > 0) {
    const unsigned level = static_cast<unsigned>(d.zstdLevel);
    H5Pset_filter(dcpl, kZstdFilterId, H5Z_FLAG_MANDATORY, 1, &level);
  }
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  dataset_ = H5Dcreate2(file_, d.path.c_str(), type, space, lcpl, dcpl, H5P_DEFAULT);
  H5Pclose(lcpl);
  H5Pclose(dcpl);
  H5Sclose(space);
  H5Tclose(type);
  if (dataset_ < 0) fail("cannot create the dataset");
  writeStringAttribute(dataset_, "tensor", d.tensor);
  writeStringAttribute(dataset_, "dtype", dtypeName(d.dtype, d.tensor));
  writeIntAttribute(dataset_, "global_shape", d.globalShape, false);
  writeIntAttribute(dataset_, "box_offsets", d.slice.offsets, false);
  writeIntAttribute(dataset_, "box_sizes", d.slice.sizes, false);
  writeIntAttribute(dataset_, "flat_offset", {d.slice.flatOffset}, true);
  writeIntAttribute(dataset_, "numel", {d.slice.numel}, true);
}

void ShardWriter::writeChunk(int64_t index, const void* data, size_t bytes) {
  const std::vector<hsize_t> coords = toHsize(current_.grid.chunk(index).coords);
  auto lock = lockHdf5();
  if (H5Dwrite_chunk(dataset_, H5P_DEFAULT, 0, coords.data(), bytes, data) < 0) fail("chunk write failed");
}

void ShardWriter::finishDataset(const std::string& checksumHex) {
  auto lock = lockHdf5();
  writeStringAttribute(dataset_, "xxh64", checksumHex);
  const herr_t status = H5Dclose(dataset_);
  dataset_ = -1;
  if (status < 0) fail("cannot close the dataset");
  current_ = PieceDataset{};
}

void ShardWriter::close() {
  auto lock = lockHdf5();
  const herr_t status = H5Fclose(file_);
  file_ = -1;
  if (status < 0) fail("cannot close (flushing HDF5 metadata)");
  if (reserveFd_ >= 0) {
    // Cut the unused reservation: the file ends at libhdf5's end of allocation.
    const hid_t reopened = H5Fopen(path_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    haddr_t end = HADDR_UNDEF;
    if (reopened < 0 || H5Fget_eoa(reopened, &end) < 0) fail("cannot reopen to trim the reserved space");
    H5Fclose(reopened);
    const int error = ::ftruncate(reserveFd_, static_cast<off_t>(end)) == 0 ? 0 : errno;
    ::close(reserveFd_);
    reserveFd_ = -1;
    if (error != 0) throwFileError("cannot trim", path_, error);
  }
}

ShardReader::ShardReader(std::string path) : path_(std::move(path)) {
  if (!pathExists(path_)) throwFileError("cannot read shard file", path_, errno);
  auto lock = lockHdf5();
  file_ = H5Fopen(path_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file_ < 0) throw CheckpointError("cannot open shard file " + path_ + " (truncated or not HDF5?): " + hdf5ErrorText());
}

ShardReader::~ShardReader() {
  auto lock = lockHdf5();
  if (file_ >= 0) H5Fclose(file_);
  H5Eclear2(H5E_DEFAULT);
}

namespace {

// The zstd-compressed chunks of a dataset chunked as ChunkGrid describes,
// read raw (H5Dread_chunk), so they can be decoded on several threads; false
// (nothing read) when the dataset is not chunked that way with zstd as its
// only filter (after an optional shuffle) or a chunk skipped it.
bool readZstdFrames(hid_t dataset, const std::vector<int64_t>& dims, size_t elementSize,
                    std::vector<std::vector<uint8_t>>& frames, ChunkGrid& grid, bool& shuffled) {
  const hid_t dcpl = H5Dget_create_plist(dataset);
  const int filters = dcpl >= 0 ? H5Pget_nfilters(dcpl) : -1;
  bool ok = dcpl >= 0 && H5Pget_layout(dcpl) == H5D_CHUNKED && (filters == 1 || filters == 2);
  std::vector<hsize_t> chunk(dims.size(), 0);
  auto filterAt = [&](unsigned index) {
    unsigned flags = 0, config = 0;
    size_t count = 0;
    return H5Pget_filter2(dcpl, index, &flags, &count, nullptr, 0, nullptr, &config);
  };
  if (ok) {
    shuffled = filters == 2;
    ok = (!shuffled || filterAt(0) == H5Z_FILTER_SHUFFLE) && filterAt(filters - 1) == kZstdFilterId &&
         H5Pget_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()) == static_cast<int>(chunk.size());
  }
  if (dcpl >= 0) H5Pclose(dcpl);
  if (!ok || !ChunkGrid::fromChunkDims(dims, std::vector<int64_t>(chunk.begin(), chunk.end()), &grid)) return false;
  // A corrupt size must fail as damage, not as a huge allocation.
  const size_t maxFrame = ZSTD_compressBound(static_cast<size_t>(grid.chunkNumel()) * elementSize) + 4096;
  frames.assign(static_cast<size_t>(grid.count()), {});
  for (size_t c = 0; c < frames.size(); ++c) {
    const std::vector<hsize_t> coords = toHsize(grid.chunk(static_cast<int64_t>(c)).coords);
    hsize_t bytes = 0;
    uint32_t mask = 0;
    if (H5Dget_chunk_storage_size(dataset, coords.data(), &bytes) < 0) return false;
    if (bytes > maxFrame) return false;
    frames[c].resize(bytes);
    if (H5Dread_chunk(dataset, H5P_DEFAULT, coords.data(), &mask, frames[c].data()) < 0 || mask != 0) return false;
  }
  return true;
}

// Decodes frames[c] into chunk c of dst on up to hardware-threads threads.
// Returns "" or what went wrong with the first bad chunk.
std::string decodeFrames(const std::vector<std::vector<uint8_t>>& frames, const ChunkGrid& grid, size_t elementSize,
                         bool shuffled, uint8_t* dst) {
  std::atomic<size_t> next{0};
  std::mutex mutex;
  std::string problem;
  const int64_t chunkNumel = grid.chunkNumel();
  auto work = [&] {
    std::vector<uint8_t> padded;
    for (size_t c = next++; c < frames.size(); c = next++) {
      const ChunkGrid::Chunk where = grid.chunk(static_cast<int64_t>(c));
      const size_t chunkBytes = static_cast<size_t>(chunkNumel) * elementSize;
      const size_t usedBytes = static_cast<size_t>(where.numel) * elementSize;
      uint8_t* target = dst + where.first * static_cast<int64_t>(elementSize);
      uint8_t* out = target;
      if (usedBytes < chunkBytes || shuffled) {
        padded.resize(chunkBytes);
        out = padded.data();
      }
      const std::string error = zstdDecompressChunk(frames[c].data(), frames[c].size(), out, chunkBytes);
      if (!error.empty()) {
        std::lock_guard<std::mutex> lock(mutex);
        if (problem.empty()) problem = "chunk " + std::to_string(c) + ": " + error;
        return;
      }
      if (shuffled) {  // inverse of HDF5's shuffle filter, only the elements used
        const size_t planes = chunkBytes / elementSize;
        const size_t used = usedBytes / elementSize;
        if (elementSize == 4) {
          const uint8_t *p0 = padded.data(), *p1 = p0 + planes, *p2 = p1 + planes, *p3 = p2 + planes;
          for (size_t i = 0; i < used; ++i) {
            const uint32_t v = p0[i] | (uint32_t{p1[i]} << 8) | (uint32_t{p2[i]} << 16) | (uint32_t{p3[i]} << 24);
            std::memcpy(target + 4 * i, &v, 4);
          }
        } else {
          for (size_t i = 0; i < used; ++i) {
            for (size_t b = 0; b < elementSize; ++b) target[i * elementSize + b] = padded[b * planes + i];
          }
        }
      } else if (usedBytes < chunkBytes) {
        std::memcpy(target, padded.data(), usedBytes);
      }
    }
  };
  const int threads = static_cast<int>(std::min<size_t>(frames.size(), std::max(1u, std::thread::hardware_concurrency())));
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
  return problem;
}

}  // namespace

void ShardReader::readDataset(const std::string& path, const std::vector<int64_t>& dims, size_t elementSize,
                              void* dst) {
  std::vector<std::vector<uint8_t>> frames;
  ChunkGrid grid;
  bool framesRead = false, shuffled = false;
  std::string problem;
  {
    auto lock = lockHdf5();
    const hid_t dataset = H5Dopen2(file_, path.c_str(), H5P_DEFAULT);
    if (dataset < 0) throw CheckpointError("shard file " + path_ + " has no dataset " + path + ": " + hdf5ErrorText());
    const hid_t space = H5Dget_space(dataset);
    const hid_t type = H5Dget_type(dataset);
    const int rank = space < 0 ? -1 : H5Sget_simple_extent_ndims(space);
    std::vector<hsize_t> found(rank > 0 ? static_cast<size_t>(rank) : 0);
    if (rank > 0) H5Sget_simple_extent_dims(space, found.data(), nullptr);
    const std::vector<int64_t> foundDims(found.begin(), found.end());
    const size_t typeSize = type < 0 ? 0 : H5Tget_size(type);
    if (foundDims != dims || typeSize != elementSize) {
      problem = "dataset " + path + " has shape " + shapeText(foundDims) + " of " + std::to_string(typeSize) +
                "-byte elements, the index says " + shapeText(dims) + " of " + std::to_string(elementSize);
    } else {
      framesRead = readZstdFrames(dataset, dims, elementSize, frames, grid, shuffled);
      H5Eclear2(H5E_DEFAULT);
      if (!framesRead && H5Dread(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0) {
        problem = "cannot decode dataset " + path + " (corrupt chunk?): " + hdf5ErrorText();
      }
    }
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    H5Dclose(dataset);
  }
  if (problem.empty() && framesRead) {
    // Decoded outside the HDF5 lock, in parallel.
    const std::string error = decodeFrames(frames, grid, elementSize, shuffled, static_cast<uint8_t*>(dst));
    if (!error.empty()) problem = "cannot decode dataset " + path + " (corrupt chunk?): " + error;
  }
  if (!problem.empty()) throw CheckpointError("shard file " + path_ + ": " + problem);
}

}  // namespace tessera::checkpoint
