// load(): checks every request against the index first, then reads only the
// stored pieces that overlap each requested range, verifying each piece's
// checksum. Works on any world size: the ranges asked for need not match the
// pieces written.
#include <ATen/ATen.h>
#include <xxhash.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>

#include "checkpoint/hdf5_shard.h"
#include "checkpoint/index_json.h"

namespace tessera::checkpoint {
namespace {

int64_t numelOf(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Every problem of every request, in one error, before any data is read.
void checkRequests(const std::string& dir, const CheckpointIndex& index, const std::vector<LoadRequest>& requests,
                   const std::vector<std::string>& strictPrefixes) {
  std::vector<std::string> missing, unexpected, mismatches;
  std::set<std::string> requested;
  for (const LoadRequest& r : requests) {
    requested.insert(r.name);
    auto it = index.tensors.find(r.name);
    if (it == index.tensors.end()) {
      missing.push_back(r.name);
      continue;
    }
    const StoredTensor& stored = it->second;
    if (stored.globalShape != r.globalShape) {
      mismatches.push_back("shape mismatch " + r.name + ": checkpoint " + shapeText(stored.globalShape) +
                           " vs model " + shapeText(r.globalShape));
      continue;
    }
    const std::string wanted = dtypeName(r.dtype, r.name);
    if (stored.dtype != wanted) {
      mismatches.push_back("dtype mismatch " + r.name + ": checkpoint " + stored.dtype + " vs model " + wanted);
    }
    const int64_t total = numelOf(r.globalShape);
    const int64_t numel = r.numel < 0 ? total - r.offset : r.numel;
    if (r.offset < 0 || numel < 0 || r.offset + numel > total) {
      mismatches.push_back("range of " + r.name + " [" + std::to_string(r.offset) + ", " +
                           std::to_string(r.offset + numel) + ") outside its " + std::to_string(total) + " elements");
    }
  }
  for (const auto& [name, stored] : index.tensors) {
    if (requested.count(name)) continue;
    for (const std::string& prefix : strictPrefixes) {
      if (name.rfind(prefix, 0) == 0) {
        unexpected.push_back(name);
        break;
      }
    }
  }
  if (missing.empty() && unexpected.empty() && mismatches.empty()) return;
  std::vector<std::string> parts;
  if (!missing.empty()) parts.push_back("missing " + joined(missing));
  if (!unexpected.empty()) parts.push_back("unexpected " + joined(unexpected));
  for (const std::string& m : mismatches) parts.push_back(m);
  std::string message = "checkpoint " + dir + " does not fit this model: ";
  for (size_t i = 0; i < parts.size(); ++i) message += (i ? "; " : "") + parts[i];
  throw CheckpointError(message);
}

std::string hex64(uint64_t value) {
  char text[20];
  std::snprintf(text, sizeof text, "%016" PRIx64, value);
  return text;
}

class PieceReader {
 public:
  explicit PieceReader(std::string dir) : dir_(std::move(dir)) {}

  // Decodes the whole piece into dst and checks its checksum.
  void read(const std::string& tensor, const StoredPiece& piece, size_t elementSize, void* dst) {
    auto it = readers_.find(piece.file);
    if (it == readers_.end()) {
      it = readers_.emplace(piece.file, std::make_unique<ShardReader>(dir_ + "/" + piece.file)).first;
    }
    it->second->readDataset(piece.dataset, piece.numel, elementSize, dst);
    const std::string checksum = hex64(XXH64(dst, static_cast<size_t>(piece.numel) * elementSize, 0));
    if (checksum != piece.checksum) {
      throw CheckpointError("piece at offset " + std::to_string(piece.offset) + " (file " + dir_ + "/" + piece.file +
                            ", dataset " + piece.dataset + ") has checksum " + checksum + ", the index says " +
                            piece.checksum + ": the file is corrupt; load an older checkpoint");
    }
  }

 private:
  std::string dir_;
  std::map<std::string, std::unique_ptr<ShardReader>> readers_;
};

// Fills out (elements [begin, end) of the logical tensor) from the pieces.
void readRange(PieceReader& reader, const std::string& name, const StoredTensor& stored, int64_t begin, int64_t end,
               at::Tensor& out) {
  std::vector<const StoredPiece*> pieces;
  for (const StoredPiece& p : stored.pieces) {
    if (p.offset < end && p.offset + p.numel > begin) pieces.push_back(&p);
  }
  std::sort(pieces.begin(), pieces.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  const size_t elementSize = out.element_size();
  auto* base = static_cast<uint8_t*>(out.data_ptr());
  int64_t cursor = begin;
  for (const StoredPiece* p : pieces) {
    if (cursor >= end) break;
    const int64_t pieceEnd = p->offset + p->numel;
    if (pieceEnd <= cursor) continue;  // covered already (overlapping pieces)
    if (p->offset > cursor) break;     // a gap: reported below
    const int64_t copyEnd = std::min(end, pieceEnd);
    if (p->offset >= begin && pieceEnd <= end) {
      reader.read(name, *p, elementSize, base + (p->offset - begin) * elementSize);
    } else {
      std::vector<uint8_t> buffer(static_cast<size_t>(p->numel) * elementSize);
      reader.read(name, *p, elementSize, buffer.data());
      std::memcpy(base + (cursor - begin) * elementSize, buffer.data() + (cursor - p->offset) * elementSize,
                  static_cast<size_t>(copyEnd - cursor) * elementSize);
    }
    cursor = copyEnd;
  }
  if (cursor < end) {
    throw CheckpointError("elements [" + std::to_string(cursor) + ", " + std::to_string(end) +
                          ") are in no stored piece (a shard file missing from the index?)");
  }
}

}  // namespace

StateDict load(const std::string& path, const std::vector<LoadRequest>& requests,
               const std::vector<std::string>& strictPrefixes) {
  const std::string dir = resolveCheckpoint(path);
  const CheckpointIndex index = readIndex(dir);
  checkRequests(dir, index, requests, strictPrefixes);

  StateDict out;
  out.meta = index.meta;
  PieceReader reader(dir);
  for (const LoadRequest& r : requests) {
    const StoredTensor& stored = index.tensors.at(r.name);
    const int64_t total = numelOf(r.globalShape);
    const int64_t numel = r.numel < 0 ? total - r.offset : r.numel;
    at::Tensor values = at::empty({numel}, at::TensorOptions().dtype(r.dtype));
    try {
      if (numel > 0) readRange(reader, r.name, stored, r.offset, r.offset + numel, values);
    } catch (const CheckpointError& e) {
      throw CheckpointError("checkpoint " + dir + ": tensor " + r.name + ": " + e.what());
    }
    const bool whole = r.offset == 0 && numel == total;
    StateTensor tensor;
    tensor.globalShape = r.globalShape;
    tensor.replicated = whole;
    tensor.pieces.push_back(StatePiece{whole ? values.view(r.globalShape) : values, r.offset});
    out.tensors[r.name] = std::move(tensor);
  }
  return out;
}

}  // namespace tessera::checkpoint
