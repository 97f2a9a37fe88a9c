// tessera-store: the rendezvous store of elastic jobs, run standalone so that
// it outlives every trainer node.
//
//   tessera-store --port P [--host H] [--join-token-file F]
//
// Without --join-token-file the secret comes from TESSERA_JOIN_TOKEN_FILE or
// TESSERA_JOIN_TOKEN (net.h's loadJoinSecret); with neither, any client that
// speaks the protocol is accepted (a warning says so). Prints
// "tessera-store: listening on H:P" once it accepts connections (scripts wait
// for that line; --port 0 picks a free port and prints it), serves until
// SIGINT or SIGTERM, then exits 0. Exit codes: 0 stopped by a signal, 1 cannot
// serve (port in use, unreadable secret file), 2 a bad command line.
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <string>

#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"
#include "tessera/core/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"tessera-store: the standalone rendezvous store of elastic tessera jobs"};
  int port = -1;
  std::string host = "0.0.0.0";
  std::string tokenFile;
  app.add_option("--port", port, "port to listen on (0: pick a free one and print it)")
      ->required()
      ->check(CLI::Range(0, 65535));
  app.add_option("--host", host, "address to bind (default 0.0.0.0: every interface)");
  app.add_option("--join-token-file", tokenFile,
                 "file holding the job's join secret (default: TESSERA_JOIN_TOKEN_FILE, then TESSERA_JOIN_TOKEN)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help or the error
    return code == 0 ? 0 : 2;
  }

  // Block the stop signals before any thread starts, so every server thread
  // inherits the mask and the main thread alone receives them in sigwait.
  sigset_t stopSignals;
  sigemptyset(&stopSignals);
  sigaddset(&stopSignals, SIGINT);
  sigaddset(&stopSignals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stopSignals, nullptr);

  tessera::setLogRank(-1);
  try {
    tessera::comm::StoreServerOptions options;
    options.host = host;
    options.port = static_cast<uint16_t>(port);
    options.secret = tokenFile.empty() ? tessera::comm::net::loadJoinSecret()
                                       : tessera::comm::net::loadJoinSecretFile(tokenFile);
    if (options.secret.empty()) {
      TESSERA_LOG(kWarn) << "tessera-store: no join secret (set TESSERA_JOIN_TOKEN_FILE or --join-token-file): "
                            "any process that reaches this port can read and write the job's rendezvous";
    }
    tessera::comm::StoreServer server(options);
    std::printf("tessera-store: listening on %s:%u\n", host.c_str(), static_cast<unsigned>(server.port()));
    std::fflush(stdout);

    int received = 0;
    sigwait(&stopSignals, &received);
    const tessera::comm::StoreServerStats stats = server.stats();
    TESSERA_LOG(kInfo) << "tessera-store: stopping on " << (received == SIGINT ? "SIGINT" : "SIGTERM") << " after "
                       << stats.requests << " requests on " << stats.connections << " connections ("
                       << stats.authFailures << " refused by the handshake, " << stats.protocolErrors
                       << " dropped for malformed requests)";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-store: %s\n", e.what());
    return 1;
  }
}
