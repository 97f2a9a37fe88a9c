// Validation of LayerOptions: which modes this build implements.
#include "tessera/core/models/layer_options.h"

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

void LayerOptions::validate(const std::string& layer, bool embedding) const {
  const bool linearSharding = sharding == Sharding::kColumn || sharding == Sharding::kRow;
  TESSERA_CHECK_ARG(!(embedding && linearSharding),
                    layer << ": an embedding can be sharded along the vocabulary only, not by "
                          << toString(sharding));
  TESSERA_CHECK_ARG(!(!embedding && sharding == Sharding::kVocabulary),
                    layer << ": vocabulary sharding is for embeddings; a linear layer is sharded by column or row");
  TESSERA_CHECK_ARG(sharding == Sharding::kNone || group != nullptr,
                    layer << ": " << toString(sharding) << " sharding needs the ShardGroup it is split over");
  TESSERA_CHECK_ARG(weight_grad != WeightGrad::kDeferred || weight_grad_store != nullptr,
                    layer << ": a deferred weight gradient needs the WeightGradStore that runs it");
  // Modes whose implementation arrives with a later issue. Each fails here
  // rather than computing the plain layer under a name that promises more.
  if (sharding != Sharding::kNone) {
    throw NotSupported(layer + ": " + toString(sharding) +
                       " sharding is not implemented yet (tensor parallelism, issue 14); use Sharding::kNone");
  }
  if (precision == Precision::kBf16 || precision == Precision::kFp8) {
    throw NotSupported(layer + ": " + toString(precision) +
                       " precision is not implemented yet (mixed precision, issue 18); use kDefault or kFp32");
  }
  if (weight_grad == WeightGrad::kDeferred) {
    throw NotSupported(layer + ": the deferred weight gradient is not implemented yet (pipeline zero-bubble "
                               "schedules, issue 16); use WeightGrad::kWithInput");
  }
}

}  // namespace tessera::models
