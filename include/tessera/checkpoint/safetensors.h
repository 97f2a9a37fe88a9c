// safetensors files (the Hugging Face weight format): export of a model from
// a checkpoint, and loading such a file as a model's initial weights.
//
// Format: an 8-byte little-endian unsigned header length N, N bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"key": "value"}}
// (padded with spaces to a multiple of 8 bytes), then the raw row-major
// little-endian data; offsets are relative to the first data byte. The
// writer orders tensors by name, packs them without gaps and always writes
// __metadata__ (with "format": "pt" unless given). Dtypes: F64 F32 F16 BF16
// I64 I32 I16 I8 U8 BOOL, and F8_E4M3 / F8_E5M2 (the OCP formats of
// core/numerics/fp8.h; safetensors' names, which torch >= 2.1 reads as
// float8_e4m3fn / float8_e5m2).
//
// FP8 weights with per-tensor scales (tessera-export --dtype f8e4m3): a
// tensor "<name>" stored as FP8 codes of name * s is followed by
// "<name>_scale_inv", an F32 scalar 1 / s -- the convention of DeepSeek-V3's
// released FP8 weights ("weight_scale_inv"), whose value is decoded * scale_inv.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace tessera::checkpoint {

struct SafetensorsFile {
  // CPU, contiguous, of the stored dtype and shape -- except FP8 tensors,
  // which are decoded to float32 (exact: every FP8 value is a float32 one),
  // so a build without float8 dtypes reads them too; their names are in fp8.
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> metadata;  // __metadata__ (empty if absent)
  std::map<std::string, std::string> fp8;       // FP8 tensor name -> stored dtype ("F8_E4M3", "F8_E5M2")
};

// Writes `tensors` (any device; copied to CPU) to `path` via a temporary
// file renamed into place. Throws InvalidArgument for an unsupported dtype
// or an empty or "__metadata__" name, CheckpointError when the file cannot
// be written.
// `fp8Codes` names tensors that are uint8 FP8 codes and their format: they
// are written as F8_E4M3 / F8_E5M2 (InvalidArgument when not uint8).
void writeSafetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {},
                      const std::map<std::string, bool>& fp8Codes = {});

// Reads and checks a whole file (header length, JSON, dtypes, shapes,
// offsets inside the data and matching the sizes, no overlaps). Throws
// CheckpointError naming the file and the problem.
SafetensorsFile readSafetensors(const std::string& path);

// Copies the tensors of the file at `path` into `module`'s parameters (and
// buffers, when the file has them) by name, converting the dtype. The file
// must hold every parameter (a tied tensor under any one of its names) and
// nothing the module lacks; all is checked first and one InvalidArgument
// lists the missing and unexpected names and the shape mismatches; then the
// values are copied (nothing is copied when anything does not fit). An FP8
// tensor with a "<name>_scale_inv" companion loads as its decoded values
// times the companion (the companion is not a parameter). Local.
// Call on the whole module, before parallelize(): tensor parallelism then
// keeps each rank's slices of the loaded tensors (the layers' shard() narrows
// the current values), and DDP/FSDP broadcast rank 0's values. A module
// already split over tp reports its parameters' local shapes as mismatches.
// `wholeModel` (a pipeline stage: the whole model's parameter names and
// logical shapes, models::gptParameterShapes): the file may also hold the
// other stages' parameters -- names of the whole model, with its shapes --
// which are skipped; a name the whole model lacks is still unexpected, and
// every parameter `module` holds must still be in the file. So every stage
// loads the same whole-model file (model.init_from); a tied copy of wte on
// the last stage loads "wte.weight". Null: the module is the whole model.
void loadSafetensorsInto(torch::nn::Module& module, const std::string& path,
                         const std::map<std::string, std::vector<int64_t>>* wholeModel = nullptr);

// Writes the whole model of the checkpoint at `checkpointPath` (see
// resolveCheckpoint; every model/ tensor gathered from all ranks' pieces) to
// `outPath` as safetensors, names without the "model/" prefix, converted to
// `dtype` when given. For a checkpoint of several replicas (DiLoCo) it
// exports replica `replica`. Metadata: "format": "pt", the step and the
// checkpoint's dp/strategy. Returns the number of tensors written. Local.
// Throws CheckpointError (unreadable or incomplete checkpoint) or
// InvalidArgument (replica out of range).
int64_t exportSafetensors(const std::string& checkpointPath, const std::string& outPath, int replica = 0,
                          std::optional<at::ScalarType> dtype = std::nullopt);
// As above, but every floating tensor of two or more dimensions (the
// weights) is written as FP8 in `e4m3` ? E4M3 : E5M2 with a per-tensor
// power-of-two scale s (the largest with amax * s <= the format's max;
// 1 for an all-zero tensor; a saturating cast) and its "<name>_scale_inv"
// companion; vectors (biases, norms) stay float32. Returns the number of
// model tensors written (companions not counted).
int64_t exportSafetensorsFp8(const std::string& checkpointPath, const std::string& outPath, bool e4m3,
                             int replica = 0);

}  // namespace tessera::checkpoint
