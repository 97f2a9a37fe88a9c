// Placeholder until the int8 all-reduce lands.
#include "tessera/comm/compression.h"

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::comm {

const char* toString(Compression compression) { return compression == Compression::kInt8 ? "int8" : "none"; }

Compression parseCompression(const std::string& value, const std::string& field) {
  if (value == "none") return Compression::kNone;
  if (value == "int8") return Compression::kInt8;
  TESSERA_CHECK_CONFIG(false, field, "got '" << value << "' (valid: none, int8)");
  return Compression::kNone;
}

void allReduceCompressed(Communicator& comm, at::Tensor tensor, ReduceOp op, Compression compression,
                         CallOptions options) {
  if (compression == Compression::kNone) return comm.allReduce(tensor, op, options);
  throw NotSupported("int8 all-reduce: not built yet");
}

WorkPtr allReduceCompressedAsync(CommPtr comm, at::Tensor tensor, ReduceOp op, Compression compression,
                                 CallOptions options) {
  if (compression == Compression::kNone) return comm->allReduceAsync(tensor, op, options);
  throw NotSupported("int8 all-reduce: not built yet");
}

}  // namespace tessera::comm
