// Private to comm/mpi: process-wide MPI state and the translation from tessera
// vocabulary (dtypes, reduce ops, sizes) to MPI's. Everything here is safe to
// call from any thread once ensureMpiInitialized() returned.
//
// Lifetime: MPI is initialized on first use with MPI_THREAD_MULTIPLE and
// finalized at process exit, unless a group broke or an MPI call is still in
// flight then. MPI has no timeouts, so after a failure some thread may stay
// blocked inside MPI forever; MPI_Finalize would wait for it and hang the exit.
// Skipping it makes mpirun report an "improper exit" and end the job, which is
// the right outcome for a job whose communication already failed.
#pragma once

#include <ATen/core/Tensor.h>
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/comm/types.h"

namespace tessera::comm::detail {

// Initializes MPI (MPI_THREAD_MULTIPLE) unless the application already did,
// and registers MPI_Finalize at exit if tessera initialized it. Throws
// NotSupported when the MPI library cannot provide MPI_THREAD_MULTIPLE (the
// backend posts sends and receives from the caller's thread while its worker
// thread is inside a collective), CommError when MPI was already finalized.
void ensureMpiInitialized();
bool mpiFinalized();

// Called when a group breaks: MPI_Finalize is then skipped at exit.
void noteMpiGroupBroken();
// Bracket every blocking MPI call of a worker thread; at exit, a call still in
// flight also skips MPI_Finalize.
void noteMpiCallStarted();
void noteMpiCallEnded();

// The MPI datatype that moves `type`'s elements. bfloat16 and float16 travel
// as MPI_UINT16_T: MPI has no such floats, so their reductions are user ops.
MPI_Datatype mpiDatatype(at::ScalarType type);
// The MPI_Op reducing `type` with `op`: MPI_SUM/MAX/MIN for native types, a
// user op over reduceFunction() for bfloat16/float16. kAvg reduces as kSum;
// divide afterwards with divideInPlace.
MPI_Op mpiReduceOp(at::ScalarType type, ReduceOp op);

// "MPI_ERR_TRUNCATE: message truncated" for an MPI error code.
std::string mpiErrorString(int code);
// Throws CommError("<what> failed: <MPI's text>") unless code is MPI_SUCCESS.
void checkMpi(int code, const std::string& what);

// MPI counts and displacements are int. Throws InvalidArgument when count is
// >= 2^31 (split the tensor into several calls).
int mpiCount(int64_t count, const std::string& what);
std::vector<int> mpiCounts(const std::vector<int64_t>& counts, const std::string& what);

// t.data_ptr(), or a valid dummy address when t has no elements (libtorch
// hands out null for empty storage; some MPI argument checks reject null).
void* mpiBuffer(const at::Tensor& t);

}  // namespace tessera::comm::detail
