# Resolves TESSERA_WITH_MPI / TESSERA_WITH_NCCL (AUTO|ON|OFF) into
# TESSERA_HAVE_MPI / TESSERA_HAVE_NCCL, failing loudly when ON cannot be met.

set(TESSERA_HAVE_MPI OFF)
if(NOT TESSERA_WITH_MPI STREQUAL "OFF")
  find_package(MPI COMPONENTS C QUIET)
  if(MPI_C_FOUND)
    set(TESSERA_HAVE_MPI ON)
  elseif(TESSERA_WITH_MPI STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_WITH_MPI=ON but MPI was not found: install libopenmpi-dev (scripts/setup.sh)")
  endif()
endif()

set(TESSERA_HAVE_NCCL OFF)
if(NOT TESSERA_WITH_NCCL STREQUAL "OFF")
  if(NOT CUDAToolkit_ROOT AND EXISTS /usr/local/cuda)
    set(CUDAToolkit_ROOT /usr/local/cuda)
  endif()
  find_package(CUDAToolkit QUIET)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  if(CUDAToolkit_FOUND AND NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(TESSERA_HAVE_NCCL ON)
  elseif(TESSERA_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_WITH_NCCL=ON but CUDA or NCCL was not found (looked in /usr/local/cuda)")
  endif()
endif()

message(STATUS "tessera backends: gloo=ON mpi=${TESSERA_HAVE_MPI} nccl=${TESSERA_HAVE_NCCL}")
