// Private to comm/mpi: MPI initialization and finalization, datatype and
// reduce-op mapping (including the bfloat16/float16 user ops), error text.
#include "comm/mpi/mpi_runtime.h"

#include <atomic>
#include <climits>
#include <cstdlib>
#include <mutex>

#include "comm/reduce_kernels.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm::detail {
namespace {

std::mutex gInitMutex;
bool gUserOpsCreated = false;                // guarded by gInitMutex
std::atomic<bool> gAnyGroupBroken{false};
std::atomic<int> gCallsInFlight{0};

// User ops for the 16-bit floats: [float16, bfloat16] x [sum, max, min].
MPI_Op gHalfOps[2][3];

// MPI_User_function for one (dtype, op): inout[i] = op(inout[i], in[i]).
// MPI passes no context, hence one instantiation per combination.
template <c10::ScalarType kType, ReduceOp kOp>
void halfReduce(void* in, void* inout, int* len, MPI_Datatype*) {
  static const ReduceFn reduce = reduceFunction(kType, kOp);
  reduce(inout, inout, in, static_cast<size_t>(*len));
}

void createUserOps() {
  MPI_User_function* functions[2][3] = {
      {&halfReduce<at::kHalf, ReduceOp::kSum>, &halfReduce<at::kHalf, ReduceOp::kMax>,
       &halfReduce<at::kHalf, ReduceOp::kMin>},
      {&halfReduce<at::kBFloat16, ReduceOp::kSum>, &halfReduce<at::kBFloat16, ReduceOp::kMax>,
       &halfReduce<at::kBFloat16, ReduceOp::kMin>}};
  for (int t = 0; t < 2; ++t) {
    for (int o = 0; o < 3; ++o) {
      checkMpi(MPI_Op_create(functions[t][o], /*commute=*/1, &gHalfOps[t][o]), "MPI_Op_create");
    }
  }
}

void finalizeAtExit() {
  if (gAnyGroupBroken.load() || gCallsInFlight.load() > 0) {
    // See the header: a thread may be blocked in MPI for good.
    TESSERA_LOG(kWarn) << "skipping MPI_Finalize: an MPI group broke or an MPI call is still in flight; mpirun "
                          "will report this process as exiting improperly";
    return;
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  {
    std::lock_guard<std::mutex> lock(gInitMutex);
    if (gUserOpsCreated) {
      for (auto& row : gHalfOps) {
        for (MPI_Op& op : row) MPI_Op_free(&op);
      }
      gUserOpsCreated = false;
    }
  }
  MPI_Finalize();
}

const char* threadLevelName(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
    default: return "an unknown thread level";
  }
}

}  // namespace

void ensureMpiInitialized() {
  std::lock_guard<std::mutex> lock(gInitMutex);
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (mpiFinalized()) {
    throw CommError("MPI was already finalized in this process; create tessera MPI communicators before "
                    "MPI_Finalize");
  }
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    checkMpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
    std::atexit(&finalizeAtExit);
  } else {
    MPI_Query_thread(&provided);
  }
  if (provided < MPI_THREAD_MULTIPLE) {
    throw NotSupported(std::string("the MPI library provides only ") + threadLevelName(provided) +
                       ", but tessera's MPI backend needs MPI_THREAD_MULTIPLE (collectives run on a worker thread "
                       "while sends and receives are posted from the caller's). Use an MPI built with thread "
                       "support (OpenMPI: --enable-mpi-thread-multiple), initialize MPI with "
                       "MPI_Init_thread(MPI_THREAD_MULTIPLE) if your code does it, or use --backend gloo");
  }
  if (!gUserOpsCreated) {
    createUserOps();
    gUserOpsCreated = true;
  }
}

bool mpiFinalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

void noteMpiGroupBroken() { gAnyGroupBroken.store(true); }
void noteMpiCallStarted() { gCallsInFlight.fetch_add(1); }
void noteMpiCallEnded() { gCallsInFlight.fetch_sub(1); }

MPI_Datatype mpiDatatype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kChar: return MPI_INT8_T;
    case at::kBFloat16:
    case at::kHalf: return MPI_UINT16_T;
    default:
      throw InvalidArgument(std::string("the MPI backend cannot move dtype ") + c10::toString(type) +
                            "; use float32, float64, bfloat16, float16, int32, int64, uint8 or int8");
  }
}

MPI_Op mpiReduceOp(at::ScalarType type, ReduceOp op) {
  const int column = op == ReduceOp::kMax ? 1 : op == ReduceOp::kMin ? 2 : 0;  // kAvg sums
  if (type == at::kHalf || type == at::kBFloat16) return gHalfOps[type == at::kHalf ? 0 : 1][column];
  mpiDatatype(type);  // rejects unsupported dtypes with the usual message
  return column == 1 ? MPI_MAX : column == 2 ? MPI_MIN : MPI_SUM;
}

std::string mpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

void checkMpi(int code, const std::string& what) {
  if (code != MPI_SUCCESS) throw CommError(what + " failed: " + mpiErrorString(code));
}

int mpiCount(int64_t count, const std::string& what) {
  TESSERA_CHECK_ARG(count <= INT_MAX, what << ": " << count << " elements exceed MPI's limit of " << INT_MAX
                                           << " per call (int counts); split the tensor into smaller calls");
  return static_cast<int>(count);
}

std::vector<int> mpiCounts(const std::vector<int64_t>& counts, const std::string& what) {
  std::vector<int> out;
  out.reserve(counts.size());
  for (int64_t c : counts) out.push_back(mpiCount(c, what));
  return out;
}

void* mpiBuffer(const at::Tensor& t) {
  static char dummy[8];
  return t.numel() > 0 ? t.data_ptr() : static_cast<void*>(dummy);
}

}  // namespace tessera::comm::detail
