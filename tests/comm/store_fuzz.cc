// libFuzzer target: the tessera store's request parser must, for any bytes,
// either return a request or throw ProtocolError -- never crash, read out of
// bounds or allocate more than the input justifies. A parsed request must
// encode back to exactly the input (the format has one encoding).
#include <algorithm>
#include <cstdlib>

#include "tessera/comm/store_server.h"
#include "tessera/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera::comm;
  try {
    const store_protocol::Request request = store_protocol::parse(data, size);
    const Bytes again = store_protocol::encode(request);
    if (again.size() != size || !std::equal(again.begin(), again.end(), data)) std::abort();
  } catch (const tessera::ProtocolError&) {
  }
  return 0;
}
