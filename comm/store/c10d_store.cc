#include "comm/store/c10d_store.h"

#include "tessera/core/error.h"

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
  try {
    store_->wait(keys, timeout);
  } catch (const std::exception& e) {
    // libtorch reports a timeout as a generic error; tell the caller which keys are missing.
    std::string missing;
    bool storeAlive = true;
    try {
      for (const auto& key : keys) {
        if (!store_->check({key})) missing += (missing.empty() ? "" : ", ") + key;
      }
    } catch (const std::exception&) {
      storeAlive = false;
    }
    if (storeAlive && !missing.empty()) {
      throw TimeoutError("store wait timed out after " + std::to_string(timeout.count()) + " ms on " +
                         description_ + "; missing keys: " + missing);
    }
    rethrow("wait", keys.empty() ? "" : keys.front(), e);
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
