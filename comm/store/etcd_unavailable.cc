// Linked instead of the etcd store when tessera is built without libcurl
// (TESSERA_WITH_CURL=OFF, or libcurl4-openssl-dev missing when it was
// configured): --rdzv-backend etcd says so at run time.
#include "tessera/comm/etcd_store.h"
#include "tessera/core/error.h"

namespace tessera::comm {

StorePtr makeEtcdStore(const EtcdStoreOptions&) {
  throw NotSupported("tessera was built without the etcd store (TESSERA_WITH_CURL=OFF, or libcurl missing when it "
                     "was configured): use --rdzv-backend tessera, or install libcurl4-openssl-dev and reconfigure");
}

}  // namespace tessera::comm
