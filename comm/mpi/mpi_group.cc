// Private to comm/mpi: failure detection and the report exchange of an MPI
// group (see mpi_group.h for the protocol).
#include "comm/mpi/mpi_group.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <thread>

#include "comm/mpi/mpi_runtime.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

namespace tessera::comm::detail {
namespace {

constexpr int kReportTag = 7777;
// Room for OpInfo::encode(): six numbers and a dtype name, at most ~90 bytes.
constexpr int kVerifyBytes = 128;

std::string encodeReport(const OpInfo& info, bool timedOut) {
  return info.encode() + (timedOut ? " T" : " E");
}

std::optional<std::pair<OpInfo, bool>> decodeReport(const std::string& text) {
  // OpInfo::decode reads its own fields and ignores the trailing flag.
  auto info = OpInfo::decode(text);
  if (!info || text.size() < 2 || text[text.size() - 2] != ' ') return std::nullopt;
  return std::make_pair(*info, text.back() == 'T');
}

}  // namespace

MpiGroup::MpiGroup(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
  checkMpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler on group '" + name_ + "'");
  checkMpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  checkMpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  checkMpi(MPI_Comm_dup(comm_, &reportComm_), "duplicating group '" + name_ + "' for failure reports");
  checkMpi(MPI_Comm_set_errhandler(reportComm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  // MPI_TAG_UB is cached on MPI_COMM_WORLD; the standard guarantees >= 32767.
  int* tagUb = nullptr;
  int found = 0;
  if (MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tagUb, &found) == MPI_SUCCESS && found) maxTag_ = *tagUb;
  peerReports_.resize(size_);
  postReportReceive();
}

MpiGroup::~MpiGroup() {
  if (mpiFinalized()) return;
  if (reportRecv_ != MPI_REQUEST_NULL) {
    MPI_Cancel(&reportRecv_);
    MPI_Wait(&reportRecv_, MPI_STATUS_IGNORE);
  }
  reapPending();
  for (auto& [request, tensor] : pending_) {
    MPI_Request_free(&request);
    (void)new at::Tensor(std::move(tensor));
  }
  for (MPI_Request& request : outgoingRequests_) MPI_Request_free(&request);
  if (!outgoing_.empty()) (void)new std::deque<std::string>(std::move(outgoing_));
  if (broken()) return;
  MPI_Comm_free(&reportComm_);
  MPI_Comm_free(&comm_);
}

std::string MpiGroup::where() const {
  return "group '" + name_ + "' (mpi, rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ")";
}

void MpiGroup::setRecorder(Recorder recorder) {
  std::lock_guard<std::mutex> lock(recorderMutex_);
  recorder_ = std::move(recorder);
}

void MpiGroup::record(OpKind kind, uint64_t bytesSent, uint64_t bytesReceived, double seconds) {
  std::lock_guard<std::mutex> lock(recorderMutex_);
  if (recorder_) recorder_(kind, bytesSent, bytesReceived, seconds);
}

void MpiGroup::remember(const OpInfo& info, Timeout timeout) {
  std::lock_guard<std::mutex> lock(mutex_);
  history_[info.seq % history_.size()] = Issued{info, timeout};
}

void MpiGroup::beginOp(const OpInfo& info, Timeout timeout) {
  noteMpiCallStarted();
  std::lock_guard<std::mutex> lock(mutex_);
  running_ = Issued{info, timeout};
  runningSince_ = SteadyClock::now();
}

void MpiGroup::endOp() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    running_.reset();
  }
  noteMpiCallEnded();
}

bool MpiGroup::busy() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_.has_value();
}

bool MpiGroup::broken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_ != nullptr;
}

void MpiGroup::throwIfBroken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_ == nullptr) return;
  throw CommError(where() + " is broken by an earlier failure and cannot be used (MPI cannot repair a group; "
                            "restart the job): " + errorMessage_);
}

std::string MpiGroup::failureMessage() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return errorMessage_;
}

std::exception_ptr MpiGroup::errorFor(uint64_t seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (errorSeq_ == seq) return error_;
  const auto entry = history_[seq % history_.size()];
  const std::string op = entry && entry->info.seq == seq ? entry->info.describe() : "operation #" + std::to_string(seq);
  return std::make_exception_ptr(
      CommError(op + " on " + where() + " was abandoned because the group broke: " + errorMessage_));
}

std::optional<MpiGroup::Issued> MpiGroup::issued(uint64_t seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto& entry = history_[seq % history_.size()];
  if (entry && entry->info.seq == seq) return entry;
  return std::nullopt;
}

void MpiGroup::failOp(const OpInfo& info, Timeout timeout, int code) {
  std::string cause = "MPI reported " + mpiErrorString(code);
  int errorClass = 0;
  MPI_Error_class(code, &errorClass);
  if (errorClass == MPI_ERR_TRUNCATE) cause += " (a peer sent more elements than this rank expects)";
  breakGroup(Issued{info, timeout}, false, cause);
  std::rethrow_exception(errorFor(info.seq));
}

void MpiGroup::breakWith(std::exception_ptr error, const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_ != nullptr) return;
  error_ = std::move(error);
  errorMessage_ = message;
  noteMpiGroupBroken();
}

void MpiGroup::verifyAcrossRanks(const OpInfo& info, Timeout timeout) {
  const std::string text = info.encode();
  std::vector<char> mine(kVerifyBytes, '\0');
  std::copy_n(text.begin(), std::min<size_t>(text.size(), kVerifyBytes - 1), mine.begin());
  std::vector<char> all(static_cast<size_t>(kVerifyBytes) * size_);
  const int code = MPI_Allgather(mine.data(), kVerifyBytes, MPI_CHAR, all.data(), kVerifyBytes, MPI_CHAR, comm_);
  if (code != MPI_SUCCESS) failOp(info, timeout, code);
  std::vector<std::optional<OpInfo>> reports(size_);
  bool agree = true;
  for (int r = 0; r < size_; ++r) {
    const char* field = all.data() + static_cast<size_t>(r) * kVerifyBytes;
    reports[r] = OpInfo::decode(std::string(field, strnlen(field, kVerifyBytes)));
    agree = agree && reports[r] && reports[r]->matches(info);
  }
  if (agree) return;
  const std::string message = info.describe() + " on " + where() + " was not started: " +
                              summarizeReports(rank_, info, reports, Timeout(0));
  // The ranks disagree about the sequence of collectives: nothing later can match either.
  breakWith(std::make_exception_ptr(CommError(message)), message);
  TESSERA_LOG(kError) << message;
  throw CommError(message);
}

void MpiGroup::checkHealth() {
  if (broken()) return;
  std::optional<std::pair<int, PeerReport>> peer;
  {
    std::lock_guard<std::mutex> lock(reportsMutex_);
    pollReportsLocked();
    if (firstReporter_ >= 0) peer.emplace(firstReporter_, *peerReports_[firstReporter_]);
  }
  if (peer) {
    const auto& [reporter, report] = *peer;
    // Judge our own part in the collective the peer failed in; if we never
    // issued it, the one we are stuck in (if any) explains why.
    std::optional<Issued> subject = issued(report.info.seq);
    if (!subject) {
      std::lock_guard<std::mutex> lock(mutex_);
      subject = running_;
    }
    breakGroup(subject, report.timedOut,
               "rank " + std::to_string(reporter) + (report.timedOut ? " timed out in " : " failed in ") +
                   report.info.describe());
    return;
  }
  std::optional<Issued> overdue;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (running_ && SteadyClock::now() - runningSince_ > running_->timeout) overdue = running_;
  }
  if (overdue) {
    breakGroup(overdue, true,
               "no progress within " + std::to_string(overdue->timeout.count()) +
                   " ms (MPI has no timeouts: the call stays blocked inside MPI and the group is abandoned)");
  }
}

bool MpiGroup::failing() {
  if (broken()) return true;
  {
    std::lock_guard<std::mutex> lock(reportsMutex_);
    pollReportsLocked();
    if (firstReporter_ >= 0) return true;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return running_ && SteadyClock::now() - runningSince_ > running_->timeout;
}

void MpiGroup::breakGroup(const std::optional<Issued>& subject, bool timedOut, const std::string& cause) {
  std::lock_guard<std::mutex> breakLock(breakMutex_);
  if (broken()) return;
  std::string message;
  if (subject) {
    const std::string summary =
        exchangeReports(subject->info, timedOut, diagnosisGrace(subject->timeout));
    message = subject->info.describe() + " on " + where() + (timedOut ? " timed out: " : " failed: ") + cause +
              ". " + summary;
  } else {
    message = where() + " broke: " + cause + "; this rank had not issued that collective yet";
  }
  std::exception_ptr error = timedOut ? std::make_exception_ptr(TimeoutError(message))
                                      : std::make_exception_ptr(CommError(message));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = error;
    errorMessage_ = message;
    if (subject) errorSeq_ = subject->info.seq;
  }
  noteMpiGroupBroken();
  TESSERA_LOG(kError) << message;
}

std::string MpiGroup::exchangeReports(const OpInfo& mine, bool timedOut, Timeout grace) {
  {
    std::lock_guard<std::mutex> lock(reportsMutex_);
    outgoing_.push_back(encodeReport(mine, timedOut));
    const std::string& text = outgoing_.back();
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      MPI_Request request = MPI_REQUEST_NULL;
      // Never waited for: a dead peer never receives it. The buffer stays in
      // outgoing_, which the destructor leaks rather than frees.
      if (MPI_Isend(text.data(), static_cast<int>(text.size()), MPI_CHAR, r, kReportTag, reportComm_, &request) ==
          MPI_SUCCESS) {
        outgoingRequests_.push_back(request);
      }
    }
  }
  std::vector<std::optional<OpInfo>> reports(size_);
  reports[rank_] = mine;
  Deadline deadline(grace);
  for (;;) {
    int missing = 0;
    {
      std::lock_guard<std::mutex> lock(reportsMutex_);
      pollReportsLocked();
      for (int r = 0; r < size_; ++r) {
        if (r != rank_ && peerReports_[r]) reports[r] = peerReports_[r]->info;
        if (!reports[r]) ++missing;
      }
    }
    if (missing == 0 || deadline.expired()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return summarizeReports(rank_, mine, reports, grace);
}

void MpiGroup::postReportReceive() {
  checkMpi(MPI_Irecv(reportBuffer_.data(), static_cast<int>(reportBuffer_.size()), MPI_CHAR, MPI_ANY_SOURCE,
                     kReportTag, reportComm_, &reportRecv_),
           "posting the failure-report receive of group '" + name_ + "'");
}

void MpiGroup::pollReportsLocked() {
  while (reportRecv_ != MPI_REQUEST_NULL) {
    int done = 0;
    MPI_Status status;
    if (MPI_Test(&reportRecv_, &done, &status) != MPI_SUCCESS || !done) return;
    int length = 0;
    MPI_Get_count(&status, MPI_CHAR, &length);
    const int source = status.MPI_SOURCE;
    const auto report = decodeReport(std::string(reportBuffer_.data(), static_cast<size_t>(std::max(length, 0))));
    if (report && source >= 0 && source < size_ && !peerReports_[source]) {
      peerReports_[source] = PeerReport{report->first, report->second};
      if (firstReporter_ < 0) firstReporter_ = source;
    }
    try {
      postReportReceive();
    } catch (const std::exception& e) {
      reportRecv_ = MPI_REQUEST_NULL;  // no more reports; timeouts still work
      TESSERA_LOG(kWarn) << e.what();
    }
  }
}

void MpiGroup::adoptPending(MPI_Request request, at::Tensor tensor) {
  std::lock_guard<std::mutex> lock(pendingMutex_);
  pending_.emplace_back(request, std::move(tensor));
}

void MpiGroup::reapPending() {
  std::lock_guard<std::mutex> lock(pendingMutex_);
  for (size_t i = 0; i < pending_.size();) {
    int done = 0;
    // An error completes the request too: either way MPI is done with the buffer.
    const int code = MPI_Test(&pending_[i].first, &done, MPI_STATUS_IGNORE);
    if (done || code != MPI_SUCCESS) {
      pending_[i] = std::move(pending_.back());
      pending_.pop_back();
    } else {
      ++i;
    }
  }
}

}  // namespace tessera::comm::detail
