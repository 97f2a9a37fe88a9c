// load(): checks every request against the index first, then assembles each
// requested slice from the stored pieces whose slices intersect it, reading
// only those and verifying each piece's checksum. Works on any world size and
// layout: the slices asked for need not match the pieces written (any N-D
// boxes, any flat ranges of them; format 1's flat ranges are flat ranges of
// the whole-tensor box).
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
    if (r.slice) {
      try {
        r.slice->check(r.globalShape, "requested slice of " + r.name);
      } catch (const InvalidArgument& e) {
        mismatches.push_back(e.what());
      }
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
  PieceReader(std::string dir, int formatVersion) : dir_(std::move(dir)), formatVersion_(formatVersion) {}

  // Decodes the whole piece into dst (slice.numel elements) and checks its checksum.
  void read(const StoredPiece& piece, size_t elementSize, void* dst) {
    auto it = readers_.find(piece.file);
    if (it == readers_.end()) {
      it = readers_.emplace(piece.file, std::make_unique<ShardReader>(dir_ + "/" + piece.file)).first;
    }
    it->second->readDataset(piece.dataset, pieceDatasetDims(piece.slice, formatVersion_), elementSize, dst);
    const std::string checksum = hex64(XXH64(dst, static_cast<size_t>(piece.slice.numel) * elementSize, 0));
    if (checksum != piece.checksum) {
      throw CheckpointError("piece " + piece.slice.text() + " (file " + dir_ + "/" + piece.file + ", dataset " +
                            piece.dataset + ") has checksum " + checksum + ", the index says " + piece.checksum +
                            ": the file is corrupt; load an older checkpoint");
    }
  }

 private:
  std::string dir_;
  int formatVersion_;
  std::map<std::string, std::unique_ptr<ShardReader>> readers_;
};

// Fills `out` (want.numel elements, flat) from the stored pieces that hold
// any of its elements: each is read whole (its checksum covers the whole
// piece) and the shared elements copied (copyOverlap). Pieces held twice
// (format 1 never wrote any; a hand-made index might) are copied twice,
// harmlessly. Throws naming the first element no piece holds.
void readSlice(PieceReader& reader, const StoredTensor& stored, const TensorSlice& want, at::Tensor& out) {
  std::vector<TensorSlice> used;
  for (const StoredPiece& p : stored.pieces) {
    if (!p.slice.boxIntersects(want) || overlapCount(p.slice, want) == 0) continue;
    used.push_back(p.slice);
    if (p.slice == want) {  // the same layout as saved: straight into the result
      reader.read(p, out.element_size(), out.data_ptr());
      continue;
    }
    at::Tensor buffer = at::empty({p.slice.numel}, out.options());
    reader.read(p, out.element_size(), buffer.data_ptr());
    copyOverlap(p.slice, buffer, want, out);
  }
  // Which elements of `want` the pieces covered: their overlaps, in want's order.
  std::vector<TensorSlice> held;
  for (const TensorSlice& s : used) {
    forEachOverlap(s, want, [&](int64_t, int64_t at, int64_t count) {
      held.push_back(TensorSlice::box({0}, {want.numel}).narrowFlat(at, count));
    });
  }
  const Coverage coverage = coverageOf({want.numel}, held);
  if (coverage.covered < want.numel) {
    // Element k of `want` as a position in the tensor.
    int64_t global = -1;
    forEachOverlap(TensorSlice::whole(stored.globalShape), want, [&](int64_t g, int64_t at, int64_t count) {
      if (global < 0 && coverage.firstMissing >= at && coverage.firstMissing < at + count) {
        global = g + coverage.firstMissing - at;
      }
    });
    throw CheckpointError("element " + positionText(stored.globalShape, global) + " of slice " + want.text() +
                          " is in no stored piece (" + std::to_string(want.numel - coverage.covered) + " of " +
                          std::to_string(want.numel) + " elements missing: a shard file missing from the index?)");
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
  PieceReader reader(dir, index.formatVersion);
  for (const LoadRequest& r : requests) {
    const StoredTensor& stored = index.tensors.at(r.name);
    const TensorSlice want = r.wanted();
    at::Tensor values = at::empty({want.numel}, at::TensorOptions().dtype(r.dtype));
    try {
      if (want.numel > 0) readSlice(reader, stored, want, values);
    } catch (const CheckpointError& e) {
      throw CheckpointError("checkpoint " + dir + ": tensor " + r.name + ": " + e.what());
    }
    const bool whole = want.isWhole(r.globalShape);
    StateTensor& tensor = out.tensors[r.name];  // several requests of one name: several pieces
    tensor.globalShape = r.globalShape;
    tensor.replicated = whole;
    tensor.pieces.push_back(StatePiece{values.view(want.localShape()), want});
  }
  return out;
}

}  // namespace tessera::checkpoint
