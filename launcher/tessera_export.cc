// tessera-export: writes the model of a checkpoint in another format.
//
//   tessera-export --format safetensors CKPT OUT [--replica K] [--dtype f32|bf16|f16|f8e4m3|f8e5m2]
//
// f8e4m3 / f8e5m2 write the weights (tensors of 2+ dimensions) as FP8 with a
// per-tensor power-of-two scale and a "<name>_scale_inv" companion
// (safetensors.h): torch >= 2.1 reads them as float8_e4m3fn / float8_e5m2,
// and model.init_from loads them back (decoded times the scale) on any build.
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
  app.add_option("--dtype", dtype,
                 "convert the tensors: f32, bf16, f16, f8e4m3 / f8e5m2 (weights in FP8 with per-tensor scales), "
                 "or keep (default)")
      ->check(CLI::IsMember({"keep", "f32", "bf16", "f16", "f8e4m3", "f8e5m2"}));
  CLI11_PARSE(app, argc, argv);

  static const std::map<std::string, at::ScalarType> kDtypes = {
      {"f32", at::kFloat}, {"bf16", at::kBFloat16}, {"f16", at::kHalf}};
  std::optional<at::ScalarType> convert;
  const bool fp8 = dtype == "f8e4m3" || dtype == "f8e5m2";
  if (dtype != "keep" && !fp8) convert = kDtypes.at(dtype);
  try {
    const int64_t written =
        fp8 ? tessera::checkpoint::exportSafetensorsFp8(checkpointPath, outPath, dtype == "f8e4m3", replica)
            : tessera::checkpoint::exportSafetensors(checkpointPath, outPath, replica, convert);
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
