// index.json: what a checkpoint holds and where each stored piece lies.
#include <nlohmann/json.hpp>

#include <cinttypes>
#include <cstdio>

#include "checkpoint/file_ops.h"
#include "checkpoint/hdf5_shard.h"
#include "checkpoint/index_json.h"

namespace tessera::checkpoint {

using nlohmann::json;

std::string stepDirectoryName(int64_t step) {
  char name[40];
  std::snprintf(name, sizeof name, "step-%08" PRId64, step);
  return name;
}

std::string shardFileName(int rank) {
  char name[40];
  std::snprintf(name, sizeof name, "rank-%05d.h5", rank);
  return name;
}

bool parseStepDirectoryName(const std::string& name, int64_t* step) {
  if (name.rfind("step-", 0) != 0 || name.size() == 5) return false;
  int64_t value = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
    value = value * 10 + (name[i] - '0');
  }
  *step = value;
  return true;
}

json pieceToJson(const StoredPiece& p) {
  return {{"file", p.file},
          {"dataset", p.dataset},
          {"offsets", p.slice.offsets},
          {"sizes", p.slice.sizes},
          {"flat_offset", p.slice.flatOffset},
          {"numel", p.slice.numel},
          {"xxh64", p.checksum}};
}

StoredPiece pieceFromJson(const json& p, int formatVersion, const std::vector<int64_t>& shape) {
  StoredPiece piece;
  piece.file = p.at("file").get<std::string>();
  piece.dataset = p.at("dataset").get<std::string>();
  piece.checksum = p.at("xxh64").get<std::string>();
  if (formatVersion == 1) {  // a flat range of the whole tensor
    piece.slice = TensorSlice::whole(shape);
    piece.slice.flatOffset = p.at("offset").get<int64_t>();
    piece.slice.numel = p.at("numel").get<int64_t>();
  } else {
    piece.slice.offsets = p.at("offsets").get<std::vector<int64_t>>();
    piece.slice.sizes = p.at("sizes").get<std::vector<int64_t>>();
    piece.slice.flatOffset = p.at("flat_offset").get<int64_t>();
    piece.slice.numel = p.at("numel").get<int64_t>();
  }
  return piece;
}

std::string indexToJson(const CheckpointIndex& index) {
  json tensors = json::object();
  for (const auto& [name, tensor] : index.tensors) {
    json pieces = json::array();
    for (const StoredPiece& p : tensor.pieces) pieces.push_back(pieceToJson(p));
    tensors[name] = {{"shape", tensor.globalShape}, {"dtype", tensor.dtype}, {"pieces", pieces}};
  }
  json root = {{"format", "tessera-checkpoint"},
               {"format_version", kCheckpointFormatVersion},
               {"step", index.step},
               {"world_size", index.worldSize},
               {"meta", index.meta},
               {"tensors", tensors}};
  return root.dump(1) + "\n";
}

namespace {

std::string trimTrailingSlashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

CheckpointIndex parseIndex(const json& root, const std::string& file) {
  if (!root.is_object() || root.value("format", "") != "tessera-checkpoint") {
    throw CheckpointError("checkpoint index " + file + " is not a tessera checkpoint index (no \"format\": "
                          "\"tessera-checkpoint\")");
  }
  CheckpointIndex index;
  index.formatVersion = root.at("format_version").get<int>();
  if (index.formatVersion > kCheckpointFormatVersion || index.formatVersion < 1) {
    throw CheckpointError("checkpoint index " + file + " has format version " +
                          std::to_string(index.formatVersion) + "; this build of tessera reads versions 1 to " +
                          std::to_string(kCheckpointFormatVersion) +
                          (index.formatVersion > kCheckpointFormatVersion
                               ? ": load it with the newer tessera that wrote it"
                               : ""));
  }
  index.step = root.at("step").get<int64_t>();
  index.worldSize = root.at("world_size").get<int>();
  index.meta = root.at("meta").get<std::map<std::string, std::string>>();
  for (const auto& [name, entry] : root.at("tensors").items()) {
    StoredTensor tensor;
    tensor.globalShape = entry.at("shape").get<std::vector<int64_t>>();
    tensor.dtype = entry.at("dtype").get<std::string>();
    at::ScalarType dtype;
    if (!dtypeFromName(tensor.dtype, &dtype)) {
      throw CheckpointError("checkpoint index " + file + ": tensor " + name + " has unknown dtype '" +
                            tensor.dtype + "'");
    }
    for (const json& p : entry.at("pieces")) {
      StoredPiece piece = pieceFromJson(p, index.formatVersion, tensor.globalShape);
      std::string problem;
      try {
        piece.slice.check(tensor.globalShape, "slice");
      } catch (const InvalidArgument& e) {
        problem = e.what();
      }
      if (!problem.empty() || piece.slice.numel <= 0 || piece.file.find('/') != std::string::npos) {
        throw CheckpointError("checkpoint index " + file + ": tensor " + name + " " + shapeText(tensor.globalShape) +
                              " has a bad piece (file " + piece.file + ", dataset " + piece.dataset + ", slice " +
                              piece.slice.text() + (problem.empty() ? "" : ": " + problem) + ")");
      }
      tensor.pieces.push_back(std::move(piece));
    }
    index.tensors.emplace(name, std::move(tensor));
  }
  return index;
}

}  // namespace

std::string resolveCheckpoint(const std::string& rawPath) {
  const std::string path = trimTrailingSlashes(rawPath);
  if (pathExists(path + "/" + kIndexFileName)) return path;
  const std::string latest = path + "/" + kLatestFileName;
  if (pathExists(latest)) {
    std::string name = readWholeFile(latest);
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ' || name.back() == '\r')) name.pop_back();
    const std::string dir = path + "/" + name;
    if (name.empty() || name.find('/') != std::string::npos || !pathExists(dir + "/" + kIndexFileName)) {
      throw CheckpointError(latest + " names checkpoint '" + name + "', but " + dir + "/" + kIndexFileName +
                            " does not exist: pass a step directory explicitly");
    }
    return dir;
  }
  throw CheckpointError("no checkpoint at " + path + ": it has neither " + kIndexFileName + " (a step directory) nor " +
                        kLatestFileName + " (a checkpoint root)");
}

CheckpointIndex readIndex(const std::string& checkpointDir) {
  const std::string file = trimTrailingSlashes(checkpointDir) + "/" + kIndexFileName;
  const std::string text = readWholeFile(file);
  try {
    return parseIndex(json::parse(text), file);
  } catch (const json::exception& e) {
    throw CheckpointError("checkpoint index " + file + " is malformed: " + e.what());
  }
}

}  // namespace tessera::checkpoint
