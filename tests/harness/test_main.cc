// main() of every tessera test binary: a spawned rank runs its worker; the
// parent runs GoogleTest.
#include <gtest/gtest.h>

#include <csignal>

#include "tests/harness/multiprocess.h"

int main(int argc, char** argv) {
  if (auto code = tessera::testing::maybeRunWorker(argc, argv)) return *code;
  // In-process tests (the elastic mesh's nodes as threads) fail Gloo pairs on
  // purpose; Gloo writes without MSG_NOSIGNAL, so a write to a pair its peer
  // closed must be an error on that socket (EPIPE), not SIGPIPE killing the
  // whole binary (seen once in CI) -- as tessera-train ignores it too. A
  // handler rather than SIG_IGN: exec resets a handler, so the processes the
  // tests start keep the default disposition, where SIG_IGN would be inherited.
  struct sigaction onPipe {};
  onPipe.sa_handler = [](int) {};
  sigemptyset(&onPipe.sa_mask);
  sigaction(SIGPIPE, &onPipe, nullptr);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
