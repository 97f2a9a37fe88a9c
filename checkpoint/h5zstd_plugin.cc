// Entry points of libtessera_h5zstd.so, the zstd filter (id 32015) as an HDF5
// plugin that libhdf5 loads from HDF5_PLUGIN_PATH: lets h5py, h5dump and other
// HDF5 tools read tessera checkpoints where no zstd plugin is installed.
#include <H5PLextern.h>

#include "checkpoint/zstd_filter.h"

extern "C" {
H5PL_type_t H5PLget_plugin_type(void) { return H5PL_TYPE_FILTER; }
const void* H5PLget_plugin_info(void) { return tessera::checkpoint::zstdFilterClass(); }
}
