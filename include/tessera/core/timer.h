// Steady-clock timing: immune to wall-clock jumps (NTP), so durations and
// deadlines never go backwards.
#pragma once

#include <chrono>

namespace tessera {

using SteadyClock = std::chrono::steady_clock;

// Measures elapsed time since construction or the last restart().
class Stopwatch {
 public:
  Stopwatch() : start_(SteadyClock::now()) {}
  void restart() { start_ = SteadyClock::now(); }
  double seconds() const {
    return std::chrono::duration<double>(SteadyClock::now() - start_).count();
  }
  double millis() const { return seconds() * 1e3; }

 private:
  SteadyClock::time_point start_;
};

// A point in time after which a blocking call gives up.
class Deadline {
 public:
  explicit Deadline(std::chrono::milliseconds timeout) : at_(SteadyClock::now() + timeout) {}
  bool expired() const { return SteadyClock::now() >= at_; }
  std::chrono::milliseconds remaining() const {
    const auto left = at_ - SteadyClock::now();
    return left.count() > 0 ? std::chrono::duration_cast<std::chrono::milliseconds>(left)
                            : std::chrono::milliseconds(0);
  }
  SteadyClock::time_point timePoint() const { return at_; }

 private:
  SteadyClock::time_point at_;
};

}  // namespace tessera
