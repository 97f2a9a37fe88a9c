// Line-oriented logging with a rank prefix: "[tessera rank 3 I 12:00:01.123] msg".
//
// The rank is process-wide state set once by tessera::init() (or setLogRank);
// it is the only global in core/, because every log line of a process needs it
// and threading it through every call would add nothing. Thread-safe: each line
// is written with one call, so lines from different threads never interleave.
// The level comes from TESSERA_LOG_LEVEL (debug|info|warn|error, default info).
#pragma once

#include <sstream>
#include <string>

namespace tessera {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Sets the rank shown in every later line; -1 shows no rank (launcher, tools).
void setLogRank(int rank);
void setLogLevel(LogLevel level);
LogLevel logLevel();
// Parses "debug", "info", "warn", "error"; throws InvalidArgument otherwise.
LogLevel parseLogLevel(const std::string& name);

// Writes one line to stderr if level is enabled.
void logLine(LogLevel level, const std::string& message);

}  // namespace tessera

// TESSERA_LOG(kInfo) << "joined group " << name;
#define TESSERA_LOG(level)                                             \
  if (::tessera::LogLevel::level < ::tessera::logLevel()) {            \
  } else                                                               \
    ::tessera::detail::LogStream(::tessera::LogLevel::level).stream()

namespace tessera::detail {
class LogStream {
 public:
  explicit LogStream(LogLevel level) : level_(level) {}
  ~LogStream() { logLine(level_, out_.str()); }
  std::ostringstream& stream() { return out_; }

 private:
  LogLevel level_;
  std::ostringstream out_;
};
}  // namespace tessera::detail
