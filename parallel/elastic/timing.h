// The elastic mesh's clocks: waits poll the store every kPoll and measure
// their bounds on the steady clock (no clock sync between nodes needed);
// event lines carry Unix time so that nodes' lines can be merged.
#pragma once

#include <chrono>
#include <cstdint>

namespace tessera::parallel::elastic {

using Clock = std::chrono::steady_clock;

constexpr auto kPoll = std::chrono::milliseconds(20);

inline std::chrono::milliseconds ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

inline double secondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace tessera::parallel::elastic
