// main() of every tessera test binary: a spawned rank runs its worker; the
// parent runs GoogleTest.
#include <gtest/gtest.h>

#include "tests/harness/multiprocess.h"

int main(int argc, char** argv) {
  if (auto code = tessera::testing::maybeRunWorker(argc, argv)) return *code;
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
