// Validation of LayerOptions: which modes this build implements.
#include "tessera/core/models/layer_options.h"

#include <algorithm>

#include "tessera/core/error.h"

namespace tessera::models {

const char* toString(Sharding sharding) {
  switch (sharding) {
    case Sharding::kNone: return "none";
    case Sharding::kColumn: return "column";
    case Sharding::kRow: return "row";
    case Sharding::kVocabulary: return "vocabulary";
  }
  return "?";
}

const char* toString(Precision precision) {
  switch (precision) {
    case Precision::kDefault: return "default";
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kFp8: return "fp8";
  }
  return "?";
}

ShardRange shardRange(int64_t n, int64_t parts, int64_t index) {
  TESSERA_CHECK_ARG(n >= 1 && parts >= 1 && index >= 0 && index < parts,
                    "shardRange: need n >= 1, parts >= 1 and 0 <= index < parts, got n = "
                        << n << ", parts = " << parts << ", index = " << index);
  const int64_t chunk = (n + parts - 1) / parts;  // Megatron: pad n to a multiple of parts
  const int64_t begin = index * chunk;
  TESSERA_CHECK_ARG(begin < n, "shardRange: " << n << " rows padded to " << chunk * parts << " for " << parts
                                              << " ranks leave rank " << index << " no row (use fewer ranks, "
                                              << "or at least " << (parts - 1) * chunk + 1 << " rows)");
  return ShardRange{begin, std::min(chunk, n - begin)};
}

void LayerOptions::validate(const std::string& layer, Kind kind) const {
  const bool linearSharding = sharding == Sharding::kColumn || sharding == Sharding::kRow;
  TESSERA_CHECK_ARG(!(kind != Kind::kLinear && linearSharding),
                    layer << ": column and row sharding are for linear layers, not " << toString(sharding));
  TESSERA_CHECK_ARG(!(kind != Kind::kEmbedding && sharding == Sharding::kVocabulary),
                    layer << ": vocabulary sharding is for embeddings; a linear layer is sharded by column or row");
  TESSERA_CHECK_ARG(sharding == Sharding::kNone || group != nullptr,
                    layer << ": " << toString(sharding) << " sharding needs the ShardGroup it is split over");
  TESSERA_CHECK_ARG(!sequence_parallel || group != nullptr,
                    layer << ": sequence parallelism needs the ShardGroup the sequence is split over");
  TESSERA_CHECK_ARG(fused_blocks >= 1, layer << ": fused_blocks must be >= 1, got " << fused_blocks);
  TESSERA_CHECK_ARG(fused_blocks == 1 || sharding == Sharding::kColumn,
                    layer << ": fused_blocks (" << fused_blocks << ") needs column sharding, got "
                          << toString(sharding));
  TESSERA_CHECK_ARG(weight_grad != WeightGrad::kDeferred || weight_grad_store != nullptr,
                    layer << ": a deferred weight gradient needs the WeightGradStore that runs it");
  // FP8 is a mode of the Linear GEMM only: the tied head keeps the
  // embedding's precision (the logits' range; FP8-LM and Transformer Engine
  // keep the head in higher precision), and a LayerNorm has no GEMM.
  TESSERA_CHECK_ARG(precision != Precision::kFp8 || kind == Kind::kLinear,
                    layer << ": fp8 precision is for Linear layers; embeddings (the tied head) and norms keep "
                             "kDefault / kFp32 / kBf16");
  TESSERA_CHECK_ARG(precision != Precision::kBf16 || kind != Kind::kNorm,
                    layer << ": a LayerNorm computes in its parameters' dtype; bf16 is a precision of GEMMs");
  if (precision == Precision::kFp8) fp8.validate("fp8.");
}

}  // namespace tessera::models
