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
  # NCCL_ROOT (or $NCCL_HOME): another NCCL, e.g. the nvidia-nccl wheel PyTorch
  # depends on, which ships only libnccl.so.2 (scripts/gpu-check.sh passes it).
  if(NOT NCCL_ROOT AND DEFINED ENV{NCCL_HOME})
    set(NCCL_ROOT $ENV{NCCL_HOME})
  endif()
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${NCCL_ROOT}/include ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2
    HINTS ${NCCL_ROOT}/lib ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  if(CUDAToolkit_FOUND AND NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(TESSERA_HAVE_NCCL ON)
  elseif(TESSERA_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_WITH_NCCL=ON but CUDA or NCCL was not found (looked in /usr/local/cuda and "
                        "NCCL_ROOT='${NCCL_ROOT}'): install the CUDA toolkit and NCCL, or set NCCL_ROOT")
  endif()
endif()

# (The configure summary, tessera_dependency_summary(), names both.)
