// File-system steps of a checkpoint commit: durable writes (write + fsync),
// renames with the parent directory fsynced, and errors that name the path and
// the errno text. Internal to checkpoint/.
#pragma once

#include <string>
#include <vector>

namespace tessera::checkpoint {

// Appended to every error caused by ENOSPC / EDQUOT.
inline constexpr const char* kDiskFullHint = "disk full: free space or lower checkpoint.keep";

// "<errno text>" plus kDiskFullHint for ENOSPC and EDQUOT.
std::string describeErrno(int error);
// Throws CheckpointError "<what> <path>: <describeErrno(error)>".
[[noreturn]] void throwFileError(const std::string& what, const std::string& path, int error);

// mkdir -p; throws CheckpointError.
void makeDirectories(const std::string& path);
// fsync of a file or a directory; throws CheckpointError.
void fsyncPath(const std::string& path);
// Creates/truncates `path` with `content`, fsyncs it; throws CheckpointError.
void writeFileDurably(const std::string& path, const std::string& content);
// rename(2); throws CheckpointError.
void renamePath(const std::string& from, const std::string& to);
// Whole file as a string; throws CheckpointError.
std::string readWholeFile(const std::string& path);
// rm -rf, best effort: false (and `error` set) if something could not be removed.
bool removeTree(const std::string& path, std::string* error = nullptr);
// Names of the entries of a directory (no "." or ".."); empty if unreadable.
std::vector<std::string> listDirectory(const std::string& path);
bool pathExists(const std::string& path);
bool isDirectory(const std::string& path);
// Size of a file in bytes, -1 if it cannot be read.
long long fileSize(const std::string& path);

}  // namespace tessera::checkpoint
