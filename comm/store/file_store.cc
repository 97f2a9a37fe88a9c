// FileStore: a directory that processes of one machine (or of a shared
// filesystem) open by path. Each key is a file; writes go to a temporary file
// renamed into place, so a reader sees a whole value or none. add and
// compareSet take an exclusive flock on a lock file, which makes them atomic
// across processes. Waits poll, with a short sleep, until their deadline.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "tessera/comm/store.h"
#include "tessera/core/error.h"
#include "tessera/core/timer.h"

namespace tessera::comm {
namespace {

// Keys may contain '/', which must not become directories: hex-escape anything
// outside [A-Za-z0-9_.-].
std::string encodeKey(const std::string& key) {
  static const char* kHex = "0123456789abcdef";
  std::string out = "k_";
  for (const unsigned char c : key) {
    if (std::isalnum(c) || c == '_' || c == '-' || c == '.') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

class FileStore final : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {
    if (mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST) {
      throw StoreError("cannot create file store directory '" + dir_ + "': " + std::strerror(errno));
    }
  }

  void set(const std::string& key, const Bytes& value) override { writeAtomically(pathOf(key), value); }

  Bytes get(const std::string& key, std::chrono::milliseconds timeout) override {
    wait({key}, timeout);
    Bytes value;
    TESSERA_CHECK_T(StoreError, readFile(pathOf(key), &value), "key '" << key << "' vanished from " << describe());
    return value;
  }

  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    Deadline deadline(timeout);
    while (!check(keys)) {
      if (deadline.expired()) {
        throw TimeoutError("store wait timed out after " + std::to_string(timeout.count()) + " ms on " +
                           describe() + "; missing keys: " + describeMissingKeys(*this, keys));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  int64_t add(const std::string& key, int64_t delta) override {
    LockGuard lock(*this);
    Bytes current;
    int64_t value = delta;
    if (readFile(pathOf(key), &current)) value += std::stoll(toString(current));
    writeAtomically(pathOf(key), toBytes(std::to_string(value)));
    return value;
  }

  Bytes compareSet(const std::string& key, const Bytes& expected, const Bytes& desired) override {
    LockGuard lock(*this);
    Bytes current;
    if (!readFile(pathOf(key), &current)) {
      if (!expected.empty()) return expected;
      writeAtomically(pathOf(key), desired);
      return desired;
    }
    if (current != expected) return current;
    writeAtomically(pathOf(key), desired);
    return desired;
  }

  bool deleteKey(const std::string& key) override { return unlink(pathOf(key).c_str()) == 0; }

  bool check(const std::vector<std::string>& keys) override {
    struct stat st;
    for (const auto& key : keys) {
      if (stat(pathOf(key).c_str(), &st) != 0) return false;
    }
    return true;
  }

  std::string describe() const override { return "file store " + dir_; }

 private:
  // Exclusive lock on dir/.lock for read-modify-write operations.
  class LockGuard {
   public:
    explicit LockGuard(FileStore& store) {
      const std::string path = store.dir_ + "/.lock";
      fd_ = open(path.c_str(), O_RDWR | O_CREAT, 0644);
      if (fd_ < 0 || flock(fd_, LOCK_EX) != 0) {
        throw StoreError("cannot lock '" + path + "': " + std::strerror(errno));
      }
    }
    ~LockGuard() {
      flock(fd_, LOCK_UN);
      close(fd_);
    }

   private:
    int fd_ = -1;
  };

  std::string pathOf(const std::string& key) const { return dir_ + "/" + encodeKey(key); }

  static bool readFile(const std::string& path, Bytes* out) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return false;
    out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return true;
  }

  void writeAtomically(const std::string& path, const Bytes& value) {
    std::ostringstream tmp;
    tmp << path << ".tmp." << getpid() << "." << std::this_thread::get_id();
    const std::string tmpPath = tmp.str();
    {
      std::ofstream out(tmpPath, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(value.data()), static_cast<std::streamsize>(value.size()));
      if (!out) throw StoreError("cannot write '" + tmpPath + "' in " + describe() + " (is the disk full?)");
    }
    if (rename(tmpPath.c_str(), path.c_str()) != 0) {
      throw StoreError("cannot rename into '" + path + "': " + std::strerror(errno));
    }
  }

  std::string dir_;
};

}  // namespace

StorePtr makeFileStore(const std::string& path) { return std::make_shared<FileStore>(path); }

}  // namespace tessera::comm
