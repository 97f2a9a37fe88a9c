// tessera-export: writes the model of a checkpoint in another format.
//
//   tessera-export --format safetensors CKPT OUT [--replica K] [--dtype f32|bf16|f16]
//
// CKPT is a checkpoint directory (format 1 or 2) or a checkpoint root (its `latest` is
// used). Every model tensor is gathered from all ranks' pieces, so a sharded
// checkpoint (FSDP, tensor-parallel slices such as qkv's three row blocks per
// tp rank, or both) exports the whole, unpadded model; names drop the "model/" prefix,
// so the file loads back with checkpoint::loadSafetensorsInto (the
// `model.init_from` key of tessera-train). Runs alone: no launcher needed.
// Exit codes: 0 done, 1 an unreadable checkpoint or unwritable output, 2 a bad command line.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <map>
#include <optional>
#include <string>

#include "tessera/checkpoint/checkpoint.h"
#include "tessera/checkpoint/safetensors.h"
#include "tessera/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"tessera-export: write a checkpoint's model as a safetensors file"};
  std::string format = "safetensors";
  std::string checkpointPath;
  std::string outPath;
  int replica = 0;
  std::string dtype = "keep";
  app.add_option("--format", format, "output format")->check(CLI::IsMember({"safetensors"}));
  app.add_option("checkpoint", checkpointPath, "checkpoint directory, or a root whose `latest` names one")->required();
  app.add_option("out", outPath, "output file")->required();
  app.add_option("--replica", replica, "replica to export from a checkpoint of several (DiLoCo); default 0")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", dtype, "convert the tensors: f32, bf16, f16, or keep (default)")
      ->check(CLI::IsMember({"keep", "f32", "bf16", "f16"}));
  CLI11_PARSE(app, argc, argv);

  static const std::map<std::string, at::ScalarType> kDtypes = {
      {"f32", at::kFloat}, {"bf16", at::kBFloat16}, {"f16", at::kHalf}};
  std::optional<at::ScalarType> convert;
  if (dtype != "keep") convert = kDtypes.at(dtype);
  try {
    const int64_t written = tessera::checkpoint::exportSafetensors(checkpointPath, outPath, replica, convert);
    std::printf("wrote %lld tensors from %s to %s\n", static_cast<long long>(written),
                tessera::checkpoint::resolveCheckpoint(checkpointPath).c_str(), outPath.c_str());
    return 0;
  } catch (const tessera::InvalidArgument& e) {
    std::fprintf(stderr, "tessera-export: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-export: %s\n", e.what());
    return 1;
  }
}
