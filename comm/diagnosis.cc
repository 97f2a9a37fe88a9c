#include "comm/diagnosis.h"

#include <algorithm>
#include <sstream>
#include <thread>

#include "tessera/core/timer.h"

namespace tessera::comm::detail {

std::string OpInfo::describe() const {
  std::ostringstream out;
  out << toString(kind) << " #" << seq;
  if (!dtype.empty()) out << " " << dtype << "[" << numel << "]";
  if (countsDigest != 0) out << " counts#" << std::hex << (countsDigest & 0xffff) << std::dec;
  if (peer >= 0) out << ((kind == OpKind::kSend || kind == OpKind::kRecv) ? " peer " : " root ") << peer;
  return out.str();
}

std::string OpInfo::encode() const {
  std::ostringstream out;
  out << static_cast<int>(kind) << " " << seq << " " << (dtype.empty() ? "-" : dtype) << " " << numel << " "
      << peer << " " << countsDigest;
  return out.str();
}

std::optional<OpInfo> OpInfo::decode(const std::string& text) {
  std::istringstream in(text);
  OpInfo info;
  int kind = 0;
  if (!(in >> kind >> info.seq >> info.dtype >> info.numel >> info.peer >> info.countsDigest)) return std::nullopt;
  if (kind < 0 || kind >= static_cast<int>(OpKind::kCount)) return std::nullopt;
  info.kind = static_cast<OpKind>(kind);
  if (info.dtype == "-") info.dtype.clear();
  return info;
}

bool OpInfo::matches(const OpInfo& other) const {
  return kind == other.kind && seq == other.seq && dtype == other.dtype && numel == other.numel &&
         peer == other.peer && countsDigest == other.countsDigest;
}

uint64_t digestCounts(const std::vector<int64_t>& counts) {
  if (counts.empty()) return 0;
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the little-endian bytes
  for (int64_t c : counts) {
    for (int b = 0; b < 8; ++b) {
      h ^= static_cast<uint64_t>(c >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  }
  return h == 0 ? 1 : h;
}

std::string summarizeReports(int myRank, const OpInfo& mine,
                             const std::vector<std::optional<OpInfo>>& reports, Timeout waited) {
  std::vector<int> missing;
  std::ostringstream mismatches;
  for (int r = 0; r < static_cast<int>(reports.size()); ++r) {
    if (r == myRank) continue;
    if (!reports[r]) {
      missing.push_back(r);
    } else if (!reports[r]->matches(mine)) {
      mismatches << (mismatches.tellp() > 0 ? "; " : "") << "rank " << r << " is in " << reports[r]->describe();
    }
  }
  std::ostringstream out;
  if (!missing.empty()) {
    out << "ranks that did not arrive (no report within " << waited.count() << " ms: dead, or not in this "
        << "operation): ";
    for (size_t i = 0; i < missing.size(); ++i) out << (i ? ", " : "") << missing[i];
  }
  if (mismatches.tellp() > 0) {
    out << (missing.empty() ? "" : ". ") << "ranks disagree: rank " << myRank << " is in " << mine.describe()
        << "; " << mismatches.str()
        << " (every rank must call the same collectives in the same order with matching dtypes and sizes)";
  }
  if (missing.empty() && mismatches.tellp() == 0) {
    out << "every rank reported the same operation (" << mine.describe() << "), so the failure is in the "
        << "transport, not in the callers";
  }
  return out.str();
}

std::string diagnoseViaStore(Store& store, int rank, int size, const OpInfo& mine, Timeout grace) {
  std::vector<std::optional<OpInfo>> reports(size);
  reports[rank] = mine;
  try {
    store.setString("diag/" + std::to_string(rank), mine.encode());
    Deadline deadline(grace);
    int pending = size - 1;
    while (pending > 0 && !deadline.expired()) {
      pending = 0;
      for (int r = 0; r < size; ++r) {
        if (reports[r]) continue;
        const std::string key = "diag/" + std::to_string(r);
        if (store.check({key})) {
          reports[r] = OpInfo::decode(store.getString(key, Timeout(1000)));
        }
        if (!reports[r]) ++pending;
      }
      if (pending > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  } catch (const std::exception& e) {
    return std::string("could not collect the other ranks' state from the store: ") + e.what();
  }
  return summarizeReports(rank, mine, reports, grace);
}

Timeout diagnosisGrace(Timeout opTimeout) {
  return std::clamp<Timeout>(opTimeout / 4, Timeout(1000), Timeout(5000));
}

}  // namespace tessera::comm::detail
