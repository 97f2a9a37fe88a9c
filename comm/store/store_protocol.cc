// The tessera store's wire format (store_server.h, store_wire.h): encoding
// and the defensive parser. The parser is what faces the network: every count
// and length is checked against its limit and against the bytes actually
// left before anything is allocated, so a hostile frame costs at most its own
// size in memory.
#include <cstring>

#include "comm/store/store_wire.h"
#include "tessera/core/error.h"

namespace tessera::comm::store_protocol {
namespace {

void putU32(Bytes& out, uint32_t value) {
  for (int shift = 0; shift < 32; shift += 8) out.push_back(static_cast<uint8_t>(value >> shift));
}

void putI64(Bytes& out, int64_t value) {
  const auto bits = static_cast<uint64_t>(value);
  for (int shift = 0; shift < 64; shift += 8) out.push_back(static_cast<uint8_t>(bits >> shift));
}

template <typename Container>
void putBlob(Bytes& out, const Container& blob) {
  putU32(out, static_cast<uint32_t>(blob.size()));
  out.insert(out.end(), blob.begin(), blob.end());
}


struct Arity {
  size_t minKeys, maxKeys, values;
};

Arity arityOf(Op op) {
  switch (op) {
    case Op::kSet: return {1, 1, 1};
    case Op::kGet: return {1, 1, 0};
    case Op::kWait: return {0, kMaxKeys, 0};
    case Op::kAdd: return {1, 1, 0};
    case Op::kCompareSet: return {1, 1, 2};
    case Op::kDelete: return {1, 1, 0};
    case Op::kCheck: return {0, kMaxKeys, 0};
    case Op::kPing: return {0, 0, 0};
  }
  return {0, 0, 0};
}

}  // namespace

const char* toString(Op op) {
  switch (op) {
    case Op::kSet: return "set";
    case Op::kGet: return "get";
    case Op::kWait: return "wait";
    case Op::kAdd: return "add";
    case Op::kCompareSet: return "compareSet";
    case Op::kDelete: return "deleteKey";
    case Op::kCheck: return "check";
    case Op::kPing: return "ping";
  }
  return "unknown";
}

// --- WireReader -------------------------------------------------------------

void WireReader::need(size_t bytes, const char* field) {
  if (bytes > left()) {
    throw ProtocolError(std::string("truncated store ") + what_ + ": " + field + " needs " + std::to_string(bytes) +
                        " bytes at offset " + std::to_string(offset_) + " but only " + std::to_string(left()) +
                        " are left");
  }
}

uint8_t WireReader::u8(const char* field) {
  need(1, field);
  return data_[offset_++];
}

uint32_t WireReader::u32(const char* field) {
  need(4, field);
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value |= static_cast<uint32_t>(data_[offset_ + i]) << (8 * i);
  offset_ += 4;
  return value;
}

int64_t WireReader::i64(const char* field) {
  need(8, field);
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value |= static_cast<uint64_t>(data_[offset_ + i]) << (8 * i);
  offset_ += 8;
  return static_cast<int64_t>(value);
}

const uint8_t* WireReader::span(const char* field, size_t maxBytes, uint32_t* length) {
  *length = u32(field);
  if (*length > maxBytes) {
    throw ProtocolError(std::string("store ") + what_ + ": " + field + " of " + std::to_string(*length) +
                        " bytes is over the limit of " + std::to_string(maxBytes));
  }
  need(*length, field);
  const uint8_t* start = data_ + offset_;
  offset_ += *length;
  return start;
}

std::string WireReader::blob(const char* field, size_t maxBytes) {
  uint32_t length = 0;
  const uint8_t* start = span(field, maxBytes, &length);
  return std::string(reinterpret_cast<const char*>(start), length);
}

Bytes WireReader::bytes(const char* field, size_t maxBytes) {
  uint32_t length = 0;
  const uint8_t* start = span(field, maxBytes, &length);
  return Bytes(start, start + length);
}

void WireReader::expectEnd() {
  if (left() != 0) {
    throw ProtocolError(std::string("store ") + what_ + " has " + std::to_string(left()) +
                        " trailing bytes after its last field");
  }
}

// --- Requests ---------------------------------------------------------------

Bytes encode(const Request& request) {
  TESSERA_CHECK_ARG(request.keys.size() <= kMaxKeys,
                    "a store request may name at most " << kMaxKeys << " keys, got " << request.keys.size());
  Bytes out;
  out.push_back(static_cast<uint8_t>(request.op));
  putU32(out, static_cast<uint32_t>(request.keys.size()));
  for (const auto& key : request.keys) {
    TESSERA_CHECK_ARG(key.size() <= kMaxKeyBytes, "store key of " << key.size() << " bytes is over the limit of "
                                                                  << kMaxKeyBytes << ": '" << key.substr(0, 64)
                                                                  << "...'");
    putBlob(out, key);
  }
  putU32(out, static_cast<uint32_t>(request.values.size()));
  for (const auto& value : request.values) {
    TESSERA_CHECK_ARG(value.size() <= kMaxValueBytes, "store value of " << value.size()
                                                                        << " bytes is over the limit of "
                                                                        << kMaxValueBytes << " bytes");
    putBlob(out, value);
  }
  putI64(out, request.integer);
  return out;
}

Request parse(const uint8_t* data, size_t size) {
  WireReader reader(data, size, "request");
  Request request;
  const uint8_t op = reader.u8("op");
  if (op < static_cast<uint8_t>(Op::kSet) || op > static_cast<uint8_t>(Op::kPing)) {
    throw ProtocolError("store request has unknown op " + std::to_string(op));
  }
  request.op = static_cast<Op>(op);
  const Arity arity = arityOf(request.op);

  const uint32_t keyCount = reader.u32("key count");
  // Each key takes at least its 4-byte length: a count the frame cannot hold
  // is rejected before reserving anything.
  if (keyCount < arity.minKeys || keyCount > arity.maxKeys || keyCount > reader.left() / 4) {
    throw ProtocolError(std::string("store ") + toString(request.op) + " request with " + std::to_string(keyCount) +
                        " keys (expected " + std::to_string(arity.minKeys) + ".." + std::to_string(arity.maxKeys) +
                        ", frame holds at most " + std::to_string(reader.left() / 4) + ")");
  }
  request.keys.reserve(keyCount);
  for (uint32_t i = 0; i < keyCount; ++i) request.keys.push_back(reader.blob("key", kMaxKeyBytes));

  const uint32_t valueCount = reader.u32("value count");
  if (valueCount != arity.values) {
    throw ProtocolError(std::string("store ") + toString(request.op) + " request with " +
                        std::to_string(valueCount) + " values (expected " + std::to_string(arity.values) + ")");
  }
  request.values.reserve(valueCount);
  for (uint32_t i = 0; i < valueCount; ++i) request.values.push_back(reader.bytes("value", kMaxValueBytes));
  request.integer = reader.i64("integer");
  reader.expectEnd();
  if ((request.op == Op::kGet || request.op == Op::kWait) && request.integer < 0) {
    throw ProtocolError(std::string("store ") + toString(request.op) + " request with a negative timeout (" +
                        std::to_string(request.integer) + " ms)");
  }
  return request;
}

// --- Responses --------------------------------------------------------------

Bytes encodeResponse(const Response& response) {
  Bytes out;
  out.push_back(static_cast<uint8_t>(response.status));
  putU32(out, static_cast<uint32_t>(response.values.size()));
  for (const auto& value : response.values) putBlob(out, value);
  putI64(out, response.integer);
  return out;
}

Response parseResponse(const uint8_t* data, size_t size) {
  WireReader reader(data, size, "response");
  Response response;
  const uint8_t status = reader.u8("status");
  if (status > static_cast<uint8_t>(Status::kBadRequest)) {
    throw ProtocolError("store response has unknown status " + std::to_string(status));
  }
  response.status = static_cast<Status>(status);
  const uint32_t count = reader.u32("value count");
  if (count > kMaxKeys || count > reader.left() / 4) {
    throw ProtocolError("store response announces " + std::to_string(count) + " values, more than it can hold");
  }
  response.values.reserve(count);
  for (uint32_t i = 0; i < count; ++i) response.values.push_back(reader.bytes("value", kMaxValueBytes));
  response.integer = reader.i64("integer");
  reader.expectEnd();
  return response;
}

}  // namespace tessera::comm::store_protocol
