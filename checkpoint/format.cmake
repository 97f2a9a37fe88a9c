# The checkpoint storage layer (issue 6): HDF5 shard files with zstd-compressed
# chunks (HDF5 filter 32015), index.json, the asynchronous Checkpointer, load().
# HDF5 (Debian libhdf5-dev, serial), zstd and xxhash link PRIVATE to the shared
# library: nothing of them appears in the public headers, so find_package(tessera)
# consumers need none of them.
find_package(HDF5 REQUIRED COMPONENTS C)
find_package(nlohmann_json REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(TESSERA_ZSTD REQUIRED IMPORTED_TARGET libzstd)
find_path(TESSERA_XXHASH_INCLUDE_DIR xxhash.h REQUIRED)
find_library(TESSERA_XXHASH_LIBRARY NAMES xxhash REQUIRED)

target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/checkpointer.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/file_ops.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/hdf5_shard.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/index.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/load.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/shard_write.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/zstd_filter.cc)
target_include_directories(tessera SYSTEM PRIVATE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS} ${TESSERA_XXHASH_INCLUDE_DIR})
target_compile_definitions(tessera PRIVATE ${HDF5_C_DEFINITIONS} ${HDF5_DEFINITIONS})
target_link_libraries(tessera PRIVATE ${HDF5_C_LIBRARIES} PkgConfig::TESSERA_ZSTD ${TESSERA_XXHASH_LIBRARY}
  nlohmann_json::nlohmann_json)

# The same zstd filter as a dynamically loaded HDF5 plugin, for tools without
# one (Debian's python3-hdf5plugin ships no zstd filter):
#   HDF5_PLUGIN_PATH=<dir of libtessera_h5zstd.so> h5py / h5dump ...
add_library(tessera_h5zstd MODULE
  ${CMAKE_CURRENT_SOURCE_DIR}/h5zstd_plugin.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/zstd_filter.cc)
target_include_directories(tessera_h5zstd SYSTEM PRIVATE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS})
target_include_directories(tessera_h5zstd PRIVATE ${PROJECT_SOURCE_DIR})
target_compile_definitions(tessera_h5zstd PRIVATE ${HDF5_C_DEFINITIONS} ${HDF5_DEFINITIONS})
target_link_libraries(tessera_h5zstd PRIVATE ${HDF5_C_LIBRARIES} PkgConfig::TESSERA_ZSTD)
target_compile_options(tessera_h5zstd PRIVATE -Wall -Wextra -Wno-unused-parameter)
set_target_properties(tessera_h5zstd PROPERTIES
  LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/hdf5-plugins)
install(TARGETS tessera_h5zstd LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}/tessera/hdf5-plugins)
