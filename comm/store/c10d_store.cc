#include "comm/store/c10d_store.h"

#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/timer.h"

namespace tessera::comm::detail {

void C10dStore::rethrow(const char* operation, const std::string& key, const std::exception& error) const {
  throw StoreError(std::string("store ") + operation + "('" + key + "') on " + description_ +
                   " failed: " + error.what());
}

void C10dStore::set(const std::string& key, const Bytes& value) {
  try {
    store_->set(key, value);
  } catch (const std::exception& e) {
    rethrow("set", key, e);
  }
}

Bytes C10dStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  wait({key}, timeout);
  try {
    return store_->get(key);
  } catch (const std::exception& e) {
    rethrow("get", key, e);
  }
}

void C10dStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  // Polls check() instead of calling the client's blocking wait: libtorch's
  // client holds its connection lock for the whole wait, so another thread's
  // set() on the same client would stall (or abort) behind it.
  Deadline deadline(timeout);
  auto pause = std::chrono::milliseconds(1);
  while (!check(keys)) {
    if (deadline.expired()) {
      std::string missing;
      for (const auto& key : keys) {
        if (!check({key})) missing += (missing.empty() ? "" : ", ") + key;
      }
      throw TimeoutError("store wait timed out after " + std::to_string(timeout.count()) + " ms on " +
                         description_ + "; missing keys: " + missing);
    }
    std::this_thread::sleep_for(std::min(pause, deadline.remaining()));
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

int64_t C10dStore::add(const std::string& key, int64_t delta) {
  try {
    return store_->add(key, delta);
  } catch (const std::exception& e) {
    rethrow("add", key, e);
  }
}

Bytes C10dStore::compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) {
  try {
    return store_->compareSet(key, expected, desired);
  } catch (const std::exception& e) {
    rethrow("compareSet", key, e);
  }
}

bool C10dStore::deleteKey(const std::string& key) {
  try {
    return store_->deleteKey(key);
  } catch (const std::exception& e) {
    rethrow("deleteKey", key, e);
  }
}

bool C10dStore::check(const std::vector<std::string>& keys) {
  try {
    return store_->check(keys);
  } catch (const std::exception& e) {
    rethrow("check", keys.empty() ? "" : keys.front(), e);
  }
}

}  // namespace tessera::comm::detail
