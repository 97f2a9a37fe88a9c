// Linked instead of the checkpoint storage layer (checkpointer.cc, load.cc,
// index.cc, the HDF5 shard files) when tessera is built without HDF5 + zstd
// (TESSERA_WITH_HDF5=OFF, or libhdf5-dev / libzstd-dev missing when it was
// configured: a GPU machine with only PyTorch's wheel). Options still
// validate; every operation throws NotSupported naming the option, at the
// first use rather than at build time.
#include "tessera/checkpoint/checkpoint.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::checkpoint {
namespace {

[[noreturn]] void noHdf5(const std::string& what) {
  throw NotSupported(what + ": tessera was built without checkpoints (TESSERA_WITH_HDF5=OFF, or HDF5/zstd missing "
                            "when it was configured); install libhdf5-dev, libzstd-dev and pkg-config and "
                            "reconfigure, or run without --checkpoint-dir / --resume");
}

}  // namespace

void CheckpointOptions::validate(const std::string& prefix) const {
  TESSERA_CHECK_CONFIG(!dir.empty(), prefix + "dir", "must name the checkpoint root directory");
  TESSERA_CHECK_CONFIG(keep >= 1, prefix + "keep", "must be >= 1, got " << keep);
}

struct Checkpointer::Impl {};

Checkpointer::Checkpointer(CheckpointOptions options, comm::CommPtr) {
  noHdf5("cannot save checkpoints under '" + options.dir + "'");
}
Checkpointer::~Checkpointer() = default;
bool Checkpointer::save(int64_t, const StateDict&) { noHdf5("cannot save a checkpoint"); }
void Checkpointer::wait() { noHdf5("cannot save a checkpoint"); }
std::string Checkpointer::lastCommitted() const { return ""; }
SaveStats Checkpointer::lastStats() const { return {}; }

std::string resolveCheckpoint(const std::string& path) { noHdf5("cannot read the checkpoint '" + path + "'"); }
CheckpointIndex readIndex(const std::string& dir) { noHdf5("cannot read the checkpoint '" + dir + "'"); }
StateDict load(const std::string& path, const std::vector<LoadRequest>&, const std::vector<std::string>&) {
  noHdf5("cannot load the checkpoint '" + path + "'");
}

}  // namespace tessera::checkpoint
