// connectRendezvousStore: the job's store by backend (rendezvous.h).
#include "tessera/comm/rendezvous.h"

#include "tessera/comm/etcd_store.h"
#include "tessera/comm/net.h"
#include "tessera/comm/store_server.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

std::string trim(const std::string& text) {
  const size_t begin = text.find_first_not_of(" \t");
  if (begin == std::string::npos) return "";
  const size_t end = text.find_last_not_of(" \t");
  return text.substr(begin, end - begin + 1);
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

}  // namespace

std::vector<std::string> parseEndpointList(const std::string& list, const std::string& what) {
  std::vector<std::string> endpoints;
  size_t begin = 0;
  while (begin <= list.size()) {
    const size_t comma = std::min(list.find(',', begin), list.size());
    std::string entry = trim(list.substr(begin, comma - begin));
    begin = comma + 1;
    if (entry.empty()) {
      if (list.find_first_not_of(" \t,") == std::string::npos) break;  // reported below as an empty list
      throw ConfigError(what, "'" + list + "' has an empty entry; expected host:port[,host:port...]");
    }
    // etcd users write client URLs: accept plain http://, refuse TLS clearly.
    if (entry.rfind("http://", 0) == 0) entry = entry.substr(7);
    if (entry.rfind("https://", 0) == 0) {
      throw ConfigError(what, "'" + entry + "': TLS endpoints are not supported; give host:port of a plain-http "
                              "client URL (etcd --listen-client-urls http://...)");
    }
    try {
      net::parseHostPort(entry, what);
    } catch (const InvalidArgument& e) {
      throw ConfigError(what, e.what());
    }
    endpoints.push_back(entry);
  }
  if (endpoints.empty()) throw ConfigError(what, "is empty; expected host:port[,host:port...]");
  return endpoints;
}

StorePtr connectRendezvousStore(const RendezvousOptions& options) {
  if (options.endpoints.empty()) {
    throw ConfigError("--rdzv-endpoint", "no endpoint given; expected host:port[,host:port...]");
  }
  StorePtr store;
  if (options.backend == "tessera") {
    if (options.endpoints.size() > 1) {
      throw ConfigError("--rdzv-endpoint",
                        "the tessera backend takes one endpoint, got " + std::to_string(options.endpoints.size()) +
                            " (" + joined(options.endpoints) +
                            "); use --rdzv-backend etcd for a store with several endpoints");
    }
    StoreClientOptions client;
    try {
      std::tie(client.host, client.port) = net::parseHostPort(options.endpoints[0], "--rdzv-endpoint");
    } catch (const InvalidArgument& e) {
      throw ConfigError("--rdzv-endpoint", e.what());
    }
    client.secret = options.secret;
    client.timeout = options.timeout;
    client.requestTimeout = options.requestTimeout;
    store = makeStoreClient(client);
  } else if (options.backend == "etcd") {
    EtcdStoreOptions etcd;
    etcd.endpoints = options.endpoints;
    etcd.user = options.user;
    etcd.password = options.password;
    etcd.requestTimeout = options.requestTimeout;
    etcd.outageTimeout = options.timeout;
    store = makeEtcdStore(etcd);
  } else {
    throw ConfigError("--rdzv-backend", "'" + options.backend + "': expected tessera or etcd");
  }
  return options.runId.empty() ? store : makePrefixStore(options.runId, store);
}

}  // namespace tessera::comm
