#include "tessera/core/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include "tessera/core/error.h"

namespace tessera {
namespace {

// OpenBLAS's own entry points, looked up in the process (libtorch loads the
// BLAS it was built against; Debian's links libblas.so.3, which OpenBLAS provides).
template <typename Fn>
Fn openblasSymbol(const char* name) {
  return reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, name));
}

}  // namespace

void setComputeThreads(int threads) {
  TESSERA_CHECK_ARG(threads >= 1, "setComputeThreads: threads must be >= 1, got " << threads);
  at::set_num_threads(threads);
  if (auto set = openblasSymbol<void (*)(int)>("openblas_set_num_threads")) set(threads);
}

int blasThreads() {
  auto get = openblasSymbol<int (*)()>("openblas_get_num_threads");
  return get ? get() : -1;
}

}  // namespace tessera
