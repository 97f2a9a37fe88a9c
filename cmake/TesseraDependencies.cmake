# Every dependency beyond libtorch, resolved once for the whole tree, so that
# tessera configures both on a machine set up by scripts/setup.sh and on one
# that has only PyTorch's wheel, CUDA and a compiler (scripts/gpu-check.sh).
#
# Header-only libraries and GoogleTest (targets nlohmann_json::nlohmann_json,
# tomlplusplus::tomlplusplus, CLI11::CLI11, tessera::xxhash, GTest::gtest):
#   TESSERA_VENDORED_DEPS = AUTO  the system's package when found, else the
#                                 copy under third_party/ (third_party/README.md)
#                           ON    always the copies under third_party/
#                           OFF   the system's packages only (a missing one fails)
#
# Libraries a GPU machine may lack switch off the parts that need them:
#   TESSERA_WITH_<X> = AUTO | ON | OFF  ->  TESSERA_HAVE_<X>
# AUTO turns the part off when its library is missing, ON fails configuring
# then, OFF never looks. The parts that are off are named in one configure
# message with what to install; at run time they throw NotSupported naming the
# option (see the *_unavailable.cc files). TESSERA_WITH_MPI / _NCCL are
# resolved the same way in TesseraBackends.cmake.

set(TESSERA_VENDORED_DEPS AUTO CACHE STRING
  "Header-only libraries and GoogleTest: AUTO (system when found, else third_party/), ON (third_party/), OFF (system)")
set_property(CACHE TESSERA_VENDORED_DEPS PROPERTY STRINGS AUTO ON OFF)
set(_tessera_third_party ${PROJECT_SOURCE_DIR}/third_party)

# Names of the parts switched off, and why, for the summary at the end.
set(TESSERA_FEATURES_OFF "")

# tessera_feature(NAME FOUND WHAT HOW): resolves TESSERA_WITH_<NAME> into
# TESSERA_HAVE_<NAME> given whether its libraries were FOUND; WHAT says which
# tessera parts need it, HOW what to install.
macro(tessera_feature name found what how)
  set(TESSERA_WITH_${name} AUTO CACHE STRING "Build ${what}: AUTO (when found), ON, OFF")
  set_property(CACHE TESSERA_WITH_${name} PROPERTY STRINGS AUTO ON OFF)
  set(TESSERA_HAVE_${name} OFF)
  if(TESSERA_WITH_${name} STREQUAL "OFF")
    list(APPEND TESSERA_FEATURES_OFF "${what} (TESSERA_WITH_${name}=OFF)")
  elseif(${found})
    set(TESSERA_HAVE_${name} ON)
  elseif(TESSERA_WITH_${name} STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_WITH_${name}=ON, but ${how} was not found; it is needed for ${what}. "
                        "Install it (scripts/setup.sh) or configure with -DTESSERA_WITH_${name}=OFF")
  else()
    list(APPEND TESSERA_FEATURES_OFF "${what} (${how} not found)")
  endif()
endmacro()

# tessera_header_dep(PACKAGE TARGET DIR): TARGET from find_package(PACKAGE) or,
# failing that (or with TESSERA_VENDORED_DEPS=ON), an interface target over
# third_party/DIR/include.
macro(tessera_header_dep package target dir)
  if(NOT TESSERA_VENDORED_DEPS STREQUAL "ON")
    find_package(${package} QUIET)
  endif()
  if(NOT TARGET ${target})
    if(TESSERA_VENDORED_DEPS STREQUAL "OFF")
      message(FATAL_ERROR "TESSERA_VENDORED_DEPS=OFF but ${package} was not found: install it (scripts/setup.sh) "
                          "or configure with -DTESSERA_VENDORED_DEPS=AUTO to use third_party/${dir}")
    endif()
    string(MAKE_C_IDENTIFIER "tessera_vendored_${dir}" _vendored)
    add_library(${_vendored} INTERFACE)
    target_include_directories(${_vendored} SYSTEM INTERFACE $<BUILD_INTERFACE:${_tessera_third_party}/${dir}/include>)
    add_library(${target} ALIAS ${_vendored})
    list(APPEND TESSERA_VENDORED_USED ${dir})
  endif()
endmacro()

# ---- Header-only libraries ---------------------------------------------------
set(TESSERA_VENDORED_USED "")
tessera_header_dep(nlohmann_json nlohmann_json::nlohmann_json nlohmann_json)
tessera_header_dep(tomlplusplus tomlplusplus::tomlplusplus tomlplusplus)
tessera_header_dep(CLI11 CLI11::CLI11 cli11)
if(TARGET tessera_vendored_tomlplusplus)
  target_compile_definitions(tessera_vendored_tomlplusplus INTERFACE TOML_HEADER_ONLY=1)
endif()

# xxhash: the system's library, or the header compiled once (XXH_IMPLEMENTATION).
if(NOT TESSERA_VENDORED_DEPS STREQUAL "ON")
  find_path(TESSERA_XXHASH_INCLUDE_DIR xxhash.h)
  find_library(TESSERA_XXHASH_LIBRARY NAMES xxhash)
endif()
if(TESSERA_XXHASH_INCLUDE_DIR AND TESSERA_XXHASH_LIBRARY)
  add_library(tessera_xxhash INTERFACE)
  target_include_directories(tessera_xxhash SYSTEM INTERFACE ${TESSERA_XXHASH_INCLUDE_DIR})
  target_link_libraries(tessera_xxhash INTERFACE ${TESSERA_XXHASH_LIBRARY})
elseif(TESSERA_VENDORED_DEPS STREQUAL "OFF")
  message(FATAL_ERROR "TESSERA_VENDORED_DEPS=OFF but xxhash was not found: install libxxhash-dev (scripts/setup.sh)")
else()
  add_library(tessera_xxhash STATIC ${_tessera_third_party}/xxhash/xxhash.c)
  target_include_directories(tessera_xxhash SYSTEM PUBLIC $<BUILD_INTERFACE:${_tessera_third_party}/xxhash/include>)
  list(APPEND TESSERA_VENDORED_USED xxhash)
endif()
add_library(tessera::xxhash ALIAS tessera_xxhash)

# GoogleTest (tests only): the system's, or third_party/googletest built here
# with the same flags as everything else (libtorch's C++ ABI included).
macro(tessera_resolve_gtest)
  if(NOT TESSERA_VENDORED_DEPS STREQUAL "ON")
    find_package(GTest QUIET)
  endif()
  if(NOT TARGET GTest::gtest)
    if(TESSERA_VENDORED_DEPS STREQUAL "OFF")
      message(FATAL_ERROR "TESSERA_VENDORED_DEPS=OFF but GoogleTest was not found: install libgtest-dev "
                          "(scripts/setup.sh), or -DTESSERA_BUILD_TESTS=OFF")
    endif()
    add_library(tessera_vendored_gtest STATIC ${_tessera_third_party}/googletest/src/gtest-all.cc)
    target_include_directories(tessera_vendored_gtest SYSTEM
      PUBLIC ${_tessera_third_party}/googletest/include PRIVATE ${_tessera_third_party}/googletest)
    target_link_libraries(tessera_vendored_gtest PUBLIC Threads::Threads)
    # Same ABI as the tests that link it (the wheel's libtorch may use the old one).
    separate_arguments(_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
    target_compile_options(tessera_vendored_gtest PRIVATE ${_torch_flags})
    add_library(GTest::gtest ALIAS tessera_vendored_gtest)
    list(APPEND TESSERA_VENDORED_USED googletest)
  endif()
endmacro()
if(TESSERA_BUILD_TESTS)
  tessera_resolve_gtest()
endif()

# ---- Optional parts ------------------------------------------------------------
# Gloo (the CPU backend, elastic groups): the system's libgloo, or the copy
# inside the wheel's libtorch when its headers ship and a program links
# against it with libtorch's flags (checked, not assumed).
set(_gloo_found OFF)
if(NOT TESSERA_WITH_GLOO STREQUAL "OFF")
  find_package(Gloo CONFIG QUIET)
  if(TARGET gloo)
    set(_gloo_found ON)
    add_library(tessera_gloo INTERFACE)
    target_link_libraries(tessera_gloo INTERFACE gloo)
  else()
    find_path(TESSERA_TORCH_GLOO_INCLUDE_DIR gloo/config.h HINTS ${TORCH_INCLUDE_DIRS} NO_DEFAULT_PATH)
    if(TESSERA_TORCH_GLOO_INCLUDE_DIR)
      include(CheckCXXSourceCompiles)
      set(CMAKE_REQUIRED_INCLUDES ${TESSERA_TORCH_GLOO_INCLUDE_DIR})
      set(CMAKE_REQUIRED_LIBRARIES ${TORCH_LIBRARIES})
      check_cxx_source_compiles([[
        #include <gloo/transport/tcp/device.h>
        int main() { gloo::transport::tcp::attr attr; return gloo::transport::tcp::CreateDevice(attr) ? 0 : 1; }
      ]] TESSERA_TORCH_GLOO_LINKS)
      unset(CMAKE_REQUIRED_INCLUDES)
      unset(CMAKE_REQUIRED_LIBRARIES)
      if(TESSERA_TORCH_GLOO_LINKS)
        set(_gloo_found ON)
        add_library(tessera_gloo INTERFACE)
        target_include_directories(tessera_gloo SYSTEM INTERFACE ${TESSERA_TORCH_GLOO_INCLUDE_DIR})
        target_link_libraries(tessera_gloo INTERFACE ${TORCH_LIBRARIES})
      endif()
    endif()
  endif()
endif()
tessera_feature(GLOO _gloo_found "the Gloo backend (CPU collectives, elastic training, tessera-bench allreduce)"
  "Gloo (libgloo-dev, or gloo headers that link inside libtorch)")

# HDF5 + zstd: the checkpoint files (sharded HDF5, zstd-compressed chunks).
set(_hdf5_found OFF)
if(NOT TESSERA_WITH_HDF5 STREQUAL "OFF")
  find_package(HDF5 QUIET COMPONENTS C)
  find_package(PkgConfig QUIET)
  if(PkgConfig_FOUND)
    pkg_check_modules(TESSERA_ZSTD QUIET IMPORTED_TARGET libzstd)
  endif()
  if(HDF5_FOUND AND TESSERA_ZSTD_FOUND)
    set(_hdf5_found ON)
    add_library(tessera_hdf5_zstd INTERFACE)
    target_include_directories(tessera_hdf5_zstd SYSTEM INTERFACE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS})
    target_compile_definitions(tessera_hdf5_zstd INTERFACE ${HDF5_C_DEFINITIONS} ${HDF5_DEFINITIONS})
    target_link_libraries(tessera_hdf5_zstd INTERFACE ${HDF5_C_LIBRARIES} PkgConfig::TESSERA_ZSTD)
  endif()
endif()
tessera_feature(HDF5 _hdf5_found "checkpoints (HDF5 shards with zstd chunks, tessera-export)"
  "HDF5 and zstd (libhdf5-dev, libzstd-dev, pkg-config)")

# A part that needs one find_package(PACKAGE) and its FOUND variable.
macro(tessera_package_feature name package what how)
  set(_found OFF)
  if(NOT TESSERA_WITH_${name} STREQUAL "OFF")
    find_package(${package} QUIET)
    set(_found ${${package}_FOUND})
  endif()
  tessera_feature(${name} _found "${what}" "${how}")
endmacro()

# OpenSSL: HMAC-SHA256 of the join handshake (tessera's store, live recovery).
tessera_package_feature(OPENSSL OpenSSL
  "the join handshake (tessera-store, elastic rendezvous, live recovery)" "OpenSSL (libssl-dev)")
# libcurl: the etcd store (etcd v3's HTTP gateway).
tessera_package_feature(CURL CURL "the etcd store (--rdzv-backend etcd)" "libcurl (libcurl4-openssl-dev)")
# zlib: gzip-compressed datasets (fashion-MNIST ships .gz files).
tessera_package_feature(ZLIB ZLIB "gzip-compressed datasets (fashion-MNIST .gz files)" "zlib (zlib1g-dev)")

# The summary: what is built, and what is not and why.
function(tessera_dependency_summary)
  message(STATUS "tessera parts: gloo=${TESSERA_HAVE_GLOO} hdf5=${TESSERA_HAVE_HDF5} openssl=${TESSERA_HAVE_OPENSSL} "
                 "curl=${TESSERA_HAVE_CURL} zlib=${TESSERA_HAVE_ZLIB} mpi=${TESSERA_HAVE_MPI} nccl=${TESSERA_HAVE_NCCL}")
  if(TESSERA_VENDORED_USED)
    string(REPLACE ";" ", " _used "${TESSERA_VENDORED_USED}")
    message(STATUS "tessera uses its copies in third_party/ of: ${_used}")
  endif()
  if(TESSERA_FEATURES_OFF)
    string(REPLACE ";" "\n     " _off "${TESSERA_FEATURES_OFF}")
    message(WARNING "tessera is configured WITHOUT:\n     ${_off}\n"
                    "These parts throw NotSupported naming the option when used. "
                    "Install what is missing (scripts/setup.sh) and reconfigure to build them.")
  endif()
endfunction()
