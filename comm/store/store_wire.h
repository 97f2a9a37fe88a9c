// Private to the tessera store: the response half of the wire protocol and
// the little-endian readers both halves share. The request half is public in
// store_server.h (the fuzz targets call it).
//
// Response frame: u8 status | u32 value count | per value: u32 length + bytes | i64 integer
//   ok:          op-specific values/integer (get: [value]; compareSet: [stored];
//                add: new value; deleteKey/check: 0 or 1)
//   timeout:     values = the keys still missing
//   bad request: values = [a message for the client's error]
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/comm/store_server.h"

namespace tessera::comm::store_protocol {

enum class Status : uint8_t { kOk = 0, kTimeout = 1, kBadRequest = 2 };

struct Response {
  Status status = Status::kOk;
  std::vector<Bytes> values;
  int64_t integer = 0;
};

// Longest wait a request may ask for; longer ones are clamped (keeps
// steady_clock arithmetic far from overflow). 30 days.
constexpr int64_t kMaxWaitMs = int64_t{30} * 24 * 3600 * 1000;

Bytes encodeResponse(const Response& response);
// Throws ProtocolError for a malformed response (same limits as requests).
Response parseResponse(const uint8_t* data, size_t size);

// Bounds-checked little-endian reading; every overrun is a ProtocolError
// naming `what` ("request", "response").
class WireReader {
 public:
  WireReader(const uint8_t* data, size_t size, const char* what) : data_(data), size_(size), what_(what) {}
  uint8_t u8(const char* field);
  uint32_t u32(const char* field);
  int64_t i64(const char* field);
  // A u32 length then that many bytes; the length is checked against
  // maxBytes and against what is left before anything is allocated.
  std::string blob(const char* field, size_t maxBytes);
  Bytes bytes(const char* field, size_t maxBytes);
  size_t left() const { return size_ - offset_; }
  // Throws unless every byte was consumed.
  void expectEnd();

 private:
  void need(size_t bytes, const char* field);
  // Checks a length-prefixed field and returns where its bytes start.
  const uint8_t* span(const char* field, size_t maxBytes, uint32_t* length);
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
  const char* what_;
};

}  // namespace tessera::comm::store_protocol
