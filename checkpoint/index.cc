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

std::string indexToJson(const CheckpointIndex& index) {
  json tensors = json::object();
  for (const auto& [name, tensor] : index.tensors) {
    json pieces = json::array();
    for (const StoredPiece& p : tensor.pieces) {
      pieces.push_back({{"file", p.file}, {"dataset", p.dataset}, {"offset", p.offset}, {"numel", p.numel},
                        {"xxh64", p.checksum}});
    }
    tensors[name] = {{"shape", tensor.globalShape}, {"dtype", tensor.dtype}, {"pieces", pieces}};
  }
  json root = {{"format", "tessera-checkpoint"},
               {"format_version", index.formatVersion},
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

int64_t numelOf(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
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
                          std::to_string(index.formatVersion) + "; this build of tessera reads version " +
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
    const int64_t numel = numelOf(tensor.globalShape);
    for (const json& p : entry.at("pieces")) {
      StoredPiece piece{p.at("file").get<std::string>(), p.at("dataset").get<std::string>(),
                        p.at("offset").get<int64_t>(), p.at("numel").get<int64_t>(),
                        p.at("xxh64").get<std::string>()};
      if (piece.offset < 0 || piece.numel <= 0 || piece.offset + piece.numel > numel ||
          piece.file.find('/') != std::string::npos) {
        throw CheckpointError("checkpoint index " + file + ": tensor " + name + " has a bad piece (file " +
                              piece.file + ", offset " + std::to_string(piece.offset) + ", numel " +
                              std::to_string(piece.numel) + ", tensor numel " + std::to_string(numel) + ")");
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
