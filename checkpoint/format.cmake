# The checkpoint storage layer (issue 6): HDF5 shard files with zstd-compressed
# chunks (HDF5 filter 32015), index.json, the asynchronous Checkpointer, load().
# HDF5 (Debian libhdf5-dev, serial), zstd and xxhash link PRIVATE to the shared
# library: nothing of them appears in the public headers, so find_package(tessera)
# consumers need none of them. Without HDF5 (TESSERA_WITH_HDF5, a GPU machine
# with only PyTorch's wheel) the layer's API throws NotSupported naming it.
# xxhash also checksums live recovery's pieces (recovery.cmake), so it is always linked.
target_link_libraries(tessera PRIVATE tessera::xxhash nlohmann_json::nlohmann_json)
target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/file_ops.cc)
if(NOT TESSERA_HAVE_HDF5)
  target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/storage_unavailable.cc)
  return()
endif()

target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/checkpointer.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/hdf5_shard.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/index.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/load.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/shard_write.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/zstd_filter.cc)
target_link_libraries(tessera PRIVATE tessera_hdf5_zstd)
# (Also directly, which keeps the include order, and so the compile commands, stable.)
target_include_directories(tessera SYSTEM PRIVATE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS})

# The same zstd filter as a dynamically loaded HDF5 plugin, for tools without
# one (Debian's python3-hdf5plugin ships no zstd filter):
#   HDF5_PLUGIN_PATH=<dir of libtessera_h5zstd.so> h5py / h5dump ...
add_library(tessera_h5zstd MODULE
  ${CMAKE_CURRENT_SOURCE_DIR}/h5zstd_plugin.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/zstd_filter.cc)
target_include_directories(tessera_h5zstd PRIVATE ${PROJECT_SOURCE_DIR})
target_link_libraries(tessera_h5zstd PRIVATE tessera_hdf5_zstd)
target_compile_options(tessera_h5zstd PRIVATE -Wall -Wextra -Wno-unused-parameter)
set_target_properties(tessera_h5zstd PROPERTIES
  LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/hdf5-plugins)
install(TARGETS tessera_h5zstd LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}/tessera/hdf5-plugins)
