#include "tessera/core/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {

MetricsRecord& MetricsRecord::add(std::string key, int64_t value) {
  fields_.emplace_back(std::move(key), value);
  return *this;
}
MetricsRecord& MetricsRecord::add(std::string key, double value) {
  fields_.emplace_back(std::move(key), value);
  return *this;
}
MetricsRecord& MetricsRecord::add(std::string key, const MetricsRecord& object) {
  fields_.emplace_back(std::move(key), Object{object.toJson()});
  return *this;
}

MetricsRecord& MetricsRecord::add(std::string key, bool value) {
  fields_.emplace_back(std::move(key), value);
  return *this;
}
MetricsRecord& MetricsRecord::add(std::string key, std::string value) {
  fields_.emplace_back(std::move(key), std::move(value));
  return *this;
}

std::string jsonQuote(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string MetricsRecord::toJson() const {
  std::ostringstream out;
  out.precision(9);
  out << "{";
  bool first = true;
  for (const auto& [key, value] : fields_) {
    out << (first ? "" : ", ") << jsonQuote(key) << ": ";
    first = false;
    if (const auto* i = std::get_if<int64_t>(&value)) {
      out << *i;
    } else if (const auto* d = std::get_if<double>(&value)) {
      if (std::isfinite(*d)) {
        out << *d;
      } else {
        out << "null";
      }
    } else if (const auto* b = std::get_if<bool>(&value)) {
      out << (*b ? "true" : "false");
    } else if (const auto* o = std::get_if<Object>(&value)) {
      out << o->json;
    } else {
      out << jsonQuote(std::get<std::string>(value));
    }
  }
  out << "}";
  return out.str();
}

MetricsWriter::MetricsWriter(const std::string& path, bool append) {
  if (path == "-") {
    file_ = stdout;
    return;
  }
  file_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (file_ == nullptr) {
    throw Error("cannot open metrics file '" + path + "': " + std::strerror(errno) +
                " (check that the directory exists and is writable)");
  }
  ownsFile_ = true;
}

MetricsWriter::~MetricsWriter() {
  if (ownsFile_) std::fclose(file_);
}

void MetricsWriter::write(const MetricsRecord& record) { writeLine(record.toJson()); }

void MetricsWriter::writeLine(const std::string& json) {
  const std::string line = json + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    throw Error(std::string("writing metrics failed: ") + std::strerror(errno) +
                " (is the disk full?)");
  }
}

}  // namespace tessera
