// How many threads one process computes with. at::set_num_threads sets
// ATen's intra-op pool, but the BLAS libtorch calls for GEMMs keeps its own:
// Debian's OpenBLAS (libopenblas0-pthread) starts one thread per core and
// ignores ATen's setting. With several ranks per machine that oversubscribes
// the cores -- 2 ranks x 2 BLAS threads on 2 cores measured 1.7x slower per
// GEMM than 1 thread each -- so every process sets both here.
#pragma once

namespace tessera {

// Sets ATen's intra-op threads and, when the process has OpenBLAS loaded,
// OpenBLAS's (found at run time, so no link dependency: another BLAS keeps
// its own setting). threads >= 1, else InvalidArgument. Call before the
// first GEMM on the training thread; not thread-safe.
void setComputeThreads(int threads);

// OpenBLAS's thread count, or -1 when the process has no OpenBLAS.
int blasThreads();

}  // namespace tessera
