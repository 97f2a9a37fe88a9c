#include "tessera/core/error.h"

namespace tessera::detail {

std::string checkFailureMessage(const char* file, int line, const char* condition,
                                const std::string& message) {
  std::ostringstream out;
  out << file << ":" << line << ": check `" << condition << "` failed";
  if (!message.empty()) out << ": " << message;
  return out.str();
}

}  // namespace tessera::detail
