// Store: the small key-value service that ranks rendezvous through.
//
// Every group (world, mesh axes, each re-formed elastic group) finds its peers
// by writing and waiting for keys under its own prefix. Implementations:
//   HashStore   in-process (threads of one process; tests)
//   FileStore   a directory on a (shared) filesystem
//   TCPStore    a server hosted by the launcher or rank 0 (the normal case)
//   PrefixStore a view of another store under "prefix/"
// All implementations are thread-safe. Every blocking call takes a timeout and
// throws TimeoutError naming the keys still missing; a store that cannot be
// reached throws StoreError naming its address.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera::comm {

using Bytes = std::vector<uint8_t>;

Bytes toBytes(const std::string& text);
std::string toString(const Bytes& bytes);

class Store {
 public:
  // Used where a call passes no timeout.
  static constexpr std::chrono::milliseconds kDefaultTimeout{std::chrono::minutes(5)};

  virtual ~Store() = default;

  virtual void set(const std::string& key, const Bytes& value) = 0;
  // Blocks until key exists (up to timeout), then returns its value.
  virtual Bytes get(const std::string& key, std::chrono::milliseconds timeout) = 0;
  // Blocks until every key exists; TimeoutError lists the missing ones.
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;
  // Atomically adds delta to the integer stored at key (0 if absent); returns the new value.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
  // Atomically: if key holds `expected` (or is absent and expected is empty), sets it
  // to `desired`. Returns the value now stored.
  virtual Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) = 0;
  // Returns whether the key existed.
  virtual bool deleteKey(const std::string& key) = 0;
  // Non-blocking: whether every key exists.
  virtual bool check(const std::vector<std::string>& keys) = 0;
  // Where the store lives ("tcp://host:port", "file:///path", "hash"), for error messages.
  virtual std::string describe() const = 0;

  // Leases: liveness records that vanish on their own. A key set with
  // setWithLease exists until its lease expires (the owner stopped calling
  // keepAlive for ttl) or is revoked; then every client sees it absent. etcd
  // and the hash store have them; the tessera store, the TCP store and the
  // file store do not (supportsLeases() false), and callers keep their own
  // heartbeat counters there instead (the elastic mesh does). Defaults throw
  // InvalidArgument naming the store.
  virtual bool supportsLeases() const { return false; }
  // A new lease of `ttl` (etcd rounds up to whole seconds). Returns its id (> 0).
  virtual int64_t grantLease(std::chrono::milliseconds ttl);
  // Renews the lease for another ttl. Throws StoreError when it already
  // expired (its keys are gone: the owner must treat itself as dead).
  virtual void keepAlive(int64_t lease);
  // Ends the lease now; its keys vanish. Idempotent (an unknown lease is ignored).
  virtual void revokeLease(int64_t lease);
  // set(), with the key bound to `lease`.
  virtual void setWithLease(const std::string& key, const Bytes& value, int64_t lease);

  // Conveniences over the above.
  Bytes get(const std::string& key) { return get(key, kDefaultTimeout); }
  void wait(const std::vector<std::string>& keys) { wait(keys, kDefaultTimeout); }
  void setString(const std::string& key, const std::string& value) { set(key, toBytes(value)); }
  std::string getString(const std::string& key, std::chrono::milliseconds timeout = kDefaultTimeout) {
    return toString(get(key, timeout));
  }
};

using StorePtr = std::shared_ptr<Store>;

// In-process store; waits use a condition variable.
StorePtr makeHashStore();

// A store in a directory that several processes of one machine (or of a
// shared filesystem) open by path. Created if absent; removing it is the caller's job.
StorePtr makeFileStore(const std::string& path);

// A view of `base` where every key is prefixed with "prefix/". Prefixes nest.
StorePtr makePrefixStore(std::string prefix, StorePtr base);

struct TcpStoreOptions {
  std::string host = "127.0.0.1";   // server address (clients connect here)
  uint16_t port = 29500;            // 0 with isServer: pick a free port (see port())
  bool isServer = false;            // host the server in this process
  // How long a client keeps retrying the connection, and the default for get/wait.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
};

// The TCP store (libtorch's c10d::TCPStore underneath). With isServer, the
// server lives as long as this object. The constructor throws StoreError when
// the server cannot be reached within options.timeout, naming host:port.
class TcpStore final : public Store {
 public:
  explicit TcpStore(const TcpStoreOptions& options);
  ~TcpStore() override;

  // The port the server listens on (useful with options.port == 0).
  uint16_t port() const;

  void set(const std::string& key, const Bytes& value) override;
  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;
  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override;
  bool deleteKey(const std::string& key) override;
  bool check(const std::vector<std::string>& keys) override;
  std::string describe() const override;
  using Store::get;
  using Store::wait;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Names the keys of `keys` that `store` lacks, comma-separated (for timeout messages).
std::string describeMissingKeys(Store& store, const std::vector<std::string>& keys);

}  // namespace tessera::comm
