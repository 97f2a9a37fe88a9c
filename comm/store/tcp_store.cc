// TcpStore: libtorch's c10d::TCPStore behind tessera's Store interface.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <type_traits>

#include "comm/store/c10d_store.h"
#include "tessera/core/error.h"

namespace tessera::comm {
namespace {

// libtorch >= 2.4 defaults TCPStoreOptions::useLibUV to true, and a libtorch
// built without libuv (Debian 13's 2.6) then refuses to host the store. Pick
// the classic server everywhere: it exists in every version, and it is the one
// tessera's store semantics were tested against on 1.13. Detected by member,
// not by version number, since the field's age differs between builds.
template <typename Options, typename = void>
struct HasUseLibUV : std::false_type {};
template <typename Options>
struct HasUseLibUV<Options, std::void_t<decltype(std::declval<Options&>().useLibUV)>> : std::true_type {};

template <typename Options>
void useClassicServer(Options& opts) {
  if constexpr (HasUseLibUV<Options>::value) opts.useLibUV = false;
}

}  // namespace

struct TcpStore::Impl {
  std::unique_ptr<detail::C10dStore> store;
  uint16_t port = 0;
};

TcpStore::TcpStore(const TcpStoreOptions& options) : impl_(std::make_unique<Impl>()) {
  TESSERA_CHECK_ARG(!options.host.empty(), "TCP store host is empty: set MASTER_ADDR or --rdzv-endpoint");
  c10d::TCPStoreOptions opts;
  opts.port = options.port;
  opts.isServer = options.isServer;
  opts.waitWorkers = false;
  opts.timeout = options.timeout;
  useClassicServer(opts);
  c10::intrusive_ptr<c10d::TCPStore> store;
  const std::string where = options.host + ":" + std::to_string(options.port);
  try {
    store = c10::make_intrusive<c10d::TCPStore>(options.host, opts);
  } catch (const std::exception& e) {
    if (options.isServer) {
      throw StoreError("cannot host the TCP store on " + where + ": " + e.what() +
                       " (is the port already in use? pick another with --master-port / MASTER_PORT)");
    }
    throw StoreError("cannot reach the TCP store at " + where + " within " +
                     std::to_string(options.timeout.count()) + " ms: " + e.what() +
                     " (is the launcher or rank 0 running, and do MASTER_ADDR/MASTER_PORT point at it?)");
  }
  impl_->port = store->getPort();
  impl_->store = std::make_unique<detail::C10dStore>(
      store, "TCP store tcp://" + options.host + ":" + std::to_string(impl_->port));
}

TcpStore::~TcpStore() = default;

uint16_t TcpStore::port() const { return impl_->port; }
void TcpStore::set(const std::string& key, const Bytes& value) { impl_->store->set(key, value); }
Bytes TcpStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  return impl_->store->get(key, timeout);
}
void TcpStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  impl_->store->wait(keys, timeout);
}
int64_t TcpStore::add(const std::string& key, int64_t delta) { return impl_->store->add(key, delta); }
Bytes TcpStore::compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) {
  return impl_->store->compareSet(key, expected, desired);
}
bool TcpStore::deleteKey(const std::string& key) { return impl_->store->deleteKey(key); }
bool TcpStore::check(const std::vector<std::string>& keys) { return impl_->store->check(keys); }
std::string TcpStore::describe() const { return impl_->store->describe(); }

}  // namespace tessera::comm
