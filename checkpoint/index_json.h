// index.json of a checkpoint directory and the names inside a checkpoint
// root. Internal to checkpoint/; the format is docs/checkpoint-format.md.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "tessera/checkpoint/checkpoint.h"

namespace tessera::checkpoint {

inline constexpr const char* kIndexFileName = "index.json";
inline constexpr const char* kLatestFileName = "latest";
inline constexpr const char* kTempPrefix = ".tmp-";
// A committed step directory set aside while the same step is saved again.
inline constexpr const char* kReplacedPrefix = ".replaced-";

// "step-00000100"
std::string stepDirectoryName(int64_t step);
// "rank-00003.h5"
std::string shardFileName(int rank);
// The step of a "step-N" name; false for anything else.
bool parseStepDirectoryName(const std::string& name, int64_t* step);

// The JSON text of an index (pretty-printed, deterministic key order), in
// format kCheckpointFormatVersion (index.formatVersion is not consulted).
std::string indexToJson(const CheckpointIndex& index);

// One piece as format 2's index (and the ranks' save reports) write it:
// {"file", "dataset", "offsets", "sizes", "flat_offset", "numel", "xxh64"}.
nlohmann::json pieceToJson(const StoredPiece& piece);
// The inverse, for a piece of `formatVersion` (1: {"offset", "numel"}, a flat
// range of the whole tensor of `shape`). Throws nlohmann::json::exception for
// missing fields; the slice is not checked here.
StoredPiece pieceFromJson(const nlohmann::json& piece, int formatVersion, const std::vector<int64_t>& shape);

}  // namespace tessera::checkpoint
