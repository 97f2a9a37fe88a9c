// Tessera's error hierarchy and the TESSERA_CHECK family of macros.
//
// Every error tessera throws derives from tessera::Error, so callers can catch
// one type; the subclasses let callers react to the kind of failure (an elastic
// group re-forms on CommError, a config loader reports InvalidArgument, ...).
// Messages name the problem and, where one exists, the fix.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tessera {

// Base of every exception tessera throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A caller passed a bad value: a config field, a tensor of the wrong dtype or
// layout, a flag. Retrying with the same input fails again.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A blocking operation did not finish within its timeout. The message names the
// operation, the group and, where known, the ranks that did not arrive.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// A collective or point-to-point operation failed: a peer died, a connection
// was reset, or ranks disagreed on what they were doing. The communicator that
// threw is broken afterwards; the elastic mesh re-forms a new one.
class CommError : public Error {
 public:
  using Error::Error;
};

// The key-value store (rendezvous) could not be reached or answered badly.
class StoreError : public Error {
 public:
  using Error::Error;
};

// A peer could not prove it knows the job's join secret (or this process
// could not prove it to the peer). The connection is closed; the message
// names the peer and the reason. Retrying with the same secret fails again.
class AuthError : public Error {
 public:
  using Error::Error;
};

// Bytes received on a tessera socket (store, live recovery) do not form a
// valid message: wrong magic or version, a length over the limit, truncated.
// The connection is dropped; nothing else is affected.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// The build or the machine lacks a feature (no MPI, no GPU, ...).
class NotSupported : public Error {
 public:
  using Error::Error;
};

namespace detail {

// Builds the message of a failed check: "file:line: check `cond` failed: msg".
std::string checkFailureMessage(const char* file, int line, const char* condition,
                                const std::string& message);

template <typename A, typename B>
std::string describeOperands(const char* exprA, const A& a, const char* exprB, const B& b) {
  std::ostringstream out;
  out << exprA << " = " << a << ", " << exprB << " = " << b;
  return out.str();
}

}  // namespace detail
}  // namespace tessera

// Throws ErrorType with file:line, the failed condition and a streamed message:
//   TESSERA_CHECK(n > 0, "batch size must be positive, got " << n);
#define TESSERA_CHECK_T(ErrorType, cond, msg)                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::ostringstream tessera_check_msg_;                                             \
      tessera_check_msg_ << msg;                                                         \
      throw ErrorType(::tessera::detail::checkFailureMessage(__FILE__, __LINE__, #cond,  \
                                                             tessera_check_msg_.str())); \
    }                                                                                    \
  } while (0)

#define TESSERA_CHECK(cond, msg) TESSERA_CHECK_T(::tessera::Error, cond, msg)
#define TESSERA_CHECK_ARG(cond, msg) TESSERA_CHECK_T(::tessera::InvalidArgument, cond, msg)

// Binary checks print both operands: "rank = 3, size = 2".
#define TESSERA_CHECK_OP_(ErrorType, a, b, op)                                           \
  do {                                                                                   \
    const auto& tessera_a_ = (a);                                                        \
    const auto& tessera_b_ = (b);                                                        \
    if (!(tessera_a_ op tessera_b_)) {                                                   \
      throw ErrorType(::tessera::detail::checkFailureMessage(                            \
          __FILE__, __LINE__, #a " " #op " " #b,                                         \
          ::tessera::detail::describeOperands(#a, tessera_a_, #b, tessera_b_)));         \
    }                                                                                    \
  } while (0)

#define TESSERA_CHECK_EQ(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, ==)
#define TESSERA_CHECK_NE(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, !=)
#define TESSERA_CHECK_LT(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, <)
#define TESSERA_CHECK_LE(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, <=)
#define TESSERA_CHECK_GE(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, >=)
#define TESSERA_CHECK_GT(a, b) TESSERA_CHECK_OP_(::tessera::Error, a, b, >)
