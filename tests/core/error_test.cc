// core/: checks print both operands and file:line; config errors name the field.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"
#include "tessera/core/timer.h"

namespace tessera {
namespace {

TEST(Check, PassingChecksDoNothing) {
  EXPECT_NO_THROW(TESSERA_CHECK(1 + 1 == 2, "math"));
  EXPECT_NO_THROW(TESSERA_CHECK_EQ(3, 3));
  EXPECT_NO_THROW(TESSERA_CHECK_LT(1, 2));
}

TEST(Check, FailureNamesConditionMessageAndLocation) {
  try {
    const int n = -1;
    TESSERA_CHECK(n > 0, "batch size must be positive, got " << n);
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("error_test.cc:"), std::string::npos) << m;
    EXPECT_NE(m.find("`n > 0`"), std::string::npos) << m;
    EXPECT_NE(m.find("got -1"), std::string::npos) << m;
  }
}

TEST(Check, BinaryChecksPrintBothOperands) {
  const int rank = 3, size = 2;
  try {
    TESSERA_CHECK_LT(rank, size);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank = 3, size = 2"), std::string::npos) << e.what();
  }
  try {
    TESSERA_CHECK_EQ(std::string("gloo"), std::string("mpi"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("= gloo"), std::string::npos) << e.what();
  }
}

TEST(Check, ArgChecksThrowInvalidArgument) {
  EXPECT_THROW(TESSERA_CHECK_ARG(false, "bad"), InvalidArgument);
  // The hierarchy lets callers catch everything tessera throws as Error.
  EXPECT_THROW(throw TimeoutError("t"), Error);
  EXPECT_THROW(throw CommError("c"), Error);
  EXPECT_THROW(throw StoreError("s"), Error);
}

TEST(Config, ConfigErrorNamesTheField) {
  try {
    const int tp = 0;
    TESSERA_CHECK_CONFIG(tp >= 1, "mesh.tp", "must be >= 1, got " << tp);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "mesh.tp");
    EXPECT_NE(std::string(e.what()).find("config field 'mesh.tp': must be >= 1, got 0"), std::string::npos);
  }
}

TEST(Logging, ParsesLevelsAndRejectsUnknownOnes) {
  EXPECT_EQ(parseLogLevel("debug"), LogLevel::kDebug);
  EXPECT_EQ(parseLogLevel("warn"), LogLevel::kWarn);
  EXPECT_THROW(parseLogLevel("loud"), InvalidArgument);
}

TEST(Logging, LinesCarryTheRank) {
  setLogRank(7);
  ::testing::internal::CaptureStderr();
  TESSERA_LOG(kWarn) << "hello " << 42;
  const std::string out = ::testing::internal::GetCapturedStderr();
  setLogRank(-1);
  EXPECT_NE(out.find("[tessera rank 7 W "), std::string::npos) << out;
  EXPECT_NE(out.find("] hello 42\n"), std::string::npos) << out;
}

TEST(Timer, DeadlineExpires) {
  Deadline d(std::chrono::milliseconds(20));
  EXPECT_FALSE(d.expired());
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_TRUE(d.expired());
  EXPECT_EQ(d.remaining().count(), 0);
  Stopwatch w;
  EXPECT_GE(w.seconds(), 0.0);
}

}  // namespace
}  // namespace tessera
