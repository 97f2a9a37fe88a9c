# (Only with HDF5: the tests open the files with libhdf5 themselves.)
if(NOT TESSERA_HAVE_HDF5)
  return()
endif()
# The checkpoint storage layer: format round trips, resharding, async saves,
# atomic commits under crashes and full disks, corruption errors, h5py access.
tessera_add_test(test_checkpoint_format ${CMAKE_CURRENT_SOURCE_DIR}/format_test.cc)
add_dependencies(test_checkpoint_format tessera_h5zstd)
target_compile_definitions(test_checkpoint_format PRIVATE
  TESSERA_H5ZSTD_PLUGIN_DIR="${PROJECT_BINARY_DIR}/hdf5-plugins"
  TESSERA_CHECKPOINT_H5PY_SCRIPT="${CMAKE_CURRENT_SOURCE_DIR}/read_with_h5py.py")
# The corruption test finds a chunk's file address with libhdf5.
target_link_libraries(test_checkpoint_format PRIVATE tessera_hdf5_zstd)
# N-D slices and checkpoint format 2: overlap arithmetic, dim-1 slices and
# FSDP flat ranges of them on 4 ranks loading into other layouts (a few s).
tessera_add_test(test_checkpoint_slices ${CMAKE_CURRENT_SOURCE_DIR}/slices_test.cc)
target_link_libraries(test_checkpoint_slices PRIVATE tessera_hdf5_zstd)
