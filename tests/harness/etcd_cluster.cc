// The etcd test cluster (etcd_cluster.h).
#include "tests/harness/etcd_cluster.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "comm/store/etcd_http.h"
#include "tessera/core/error.h"

namespace tessera::testing {
namespace {

using std::chrono::milliseconds;
using Http = comm::etcd::HttpClient;

// `count` distinct free loopback ports: all bound at once (so distinct), then
// released for etcd to bind (Go sets SO_REUSEADDR).
std::vector<uint16_t> freePorts(size_t count) {
  std::vector<int> fds;
  std::vector<uint16_t> ports;
  for (size_t i = 0; i < count; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      throw Error("etcd test cluster: could not pick a free loopback port");
    }
    fds.push_back(fd);
    ports.push_back(ntohs(address.sin_port));
  }
  for (int fd : fds) ::close(fd);
  return ports;
}

std::string makeTempDir() {
  std::string base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path().string();
  std::string pattern = base + "/tessera-etcd-XXXXXX";
  std::vector<char> path(pattern.begin(), pattern.end());
  path.push_back('\0');
  if (::mkdtemp(path.data()) == nullptr) throw Error("etcd test cluster: cannot create a directory under " + base);
  return path.data();
}

std::string post(const std::string& endpoint, const std::string& path, const nlohmann::json& body,
                 const std::string& what) {
  std::string text = body.dump();
  std::string answer;
  const long status = Http::exchangeOnce(endpoint, path, &text, milliseconds(5000), &answer);
  if (status != 200) throw Error("etcd test cluster: " + what + " failed (HTTP " + std::to_string(status) + "): " + answer);
  return answer;
}

}  // namespace

std::string etcdBinary() {
  const char* configured = std::getenv("TESSERA_ETCD_BIN");
  const std::string path = configured != nullptr && *configured != '\0' ? configured : "/usr/bin/etcd";
  return ::access(path.c_str(), X_OK) == 0 ? path : "";
}

EtcdCluster::EtcdCluster(int members, std::vector<std::string> extraArgs) : extraArgs_(std::move(extraArgs)) {
  if (etcdBinary().empty()) throw NotSupported("etcd is not installed (see TESSERA_REQUIRE_ETCD)");
  dir_ = makeTempDir();
  const std::vector<uint16_t> ports = freePorts(2 * members);
  for (int i = 0; i < members; ++i) {
    Member member;
    member.name = "m" + std::to_string(i);
    member.clientPort = ports[2 * i];
    member.peerPort = ports[2 * i + 1];
    initialCluster_ += (i ? "," : "") + member.name + "=http://127.0.0.1:" + std::to_string(member.peerPort);
    members_.push_back(member);
  }
  for (int i = 0; i < members; ++i) start(i);
  for (int i = 0; i < members; ++i) {
    if (!waitHealthy(i, std::chrono::seconds(30))) {
      std::string logs;
      for (int j = 0; j < members; ++j) logs += "\n--- " + members_[j].name + " ---\n" + logTail(j);
      throw Error("etcd test cluster: member " + members_[i].name + " did not become healthy in 30 s" + logs);
    }
  }
}

EtcdCluster::~EtcdCluster() {
  for (int i = 0; i < size(); ++i) kill(i);
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

void EtcdCluster::start(int index) {
  Member& member = members_[index];
  const std::string client = "http://127.0.0.1:" + std::to_string(member.clientPort);
  const std::string peer = "http://127.0.0.1:" + std::to_string(member.peerPort);
  std::vector<std::string> args = {
      etcdBinary(), "--name", member.name, "--data-dir", dir_ + "/" + member.name,
      "--listen-client-urls", client, "--advertise-client-urls", client,
      "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
      "--initial-cluster", initialCluster_, "--initial-cluster-state", "new",
      "--initial-cluster-token", "tessera-test-" + std::to_string(::getpid()) + "-" + dir_.substr(dir_.size() - 6),
      "--heartbeat-interval", "50", "--election-timeout", "500",
      "--logger", "zap", "--log-level", "warn"};
  args.insert(args.end(), extraArgs_.begin(), extraArgs_.end());
  const std::string log = dir_ + "/" + member.name + ".log";
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("etcd test cluster: fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    std::vector<char*> argv;
    for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  member.pid = pid;
}

std::vector<std::string> EtcdCluster::endpoints() const {
  std::vector<std::string> out;
  for (int i = 0; i < size(); ++i) out.push_back(endpoint(i));
  return out;
}

std::string EtcdCluster::endpoint(int member) const {
  return "127.0.0.1:" + std::to_string(members_.at(member).clientPort);
}

std::string EtcdCluster::endpointList() const {
  std::string out;
  for (const auto& e : endpoints()) out += (out.empty() ? "" : ",") + e;
  return out;
}

void EtcdCluster::kill(int index) {
  Member& member = members_.at(index);
  if (member.pid <= 0) return;
  ::kill(member.pid, SIGKILL);
  ::waitpid(member.pid, nullptr, 0);
  member.pid = -1;
}

void EtcdCluster::restart(int index) {
  if (running(index)) return;
  start(index);
}

bool EtcdCluster::running(int index) const { return members_.at(index).pid > 0; }

bool EtcdCluster::waitHealthy(int index, milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  do {
    if (!running(index)) return false;
    std::string body;
    if (Http::exchangeOnce(endpoint(index), "/health", nullptr, milliseconds(1000), &body) == 200) {
      const auto health = nlohmann::json::parse(body, nullptr, false);
      if (health.is_object() && health.value("health", "") == "true") return true;
    }
    std::this_thread::sleep_for(milliseconds(50));
  } while (std::chrono::steady_clock::now() < deadline);
  return false;
}

int EtcdCluster::leader() const {
  auto idText = [](const nlohmann::json& value) { return value.is_string() ? value.get<std::string>() : value.dump(); };
  for (int i = 0; i < size(); ++i) {
    if (!running(i)) continue;
    std::string body;
    const std::string request = "{}";
    if (Http::exchangeOnce(endpoint(i), "/v3/maintenance/status", &request, milliseconds(2000), &body) != 200) continue;
    const auto status = nlohmann::json::parse(body, nullptr, false);
    if (!status.is_object() || !status.contains("leader") || !status.contains("header")) continue;
    const std::string leaderId = idText(status["leader"]);
    if (leaderId == "0") continue;
    // Ask each running member for its own id until one matches the leader's.
    for (int j = 0; j < size(); ++j) {
      if (!running(j)) continue;
      std::string own;
      if (Http::exchangeOnce(endpoint(j), "/v3/maintenance/status", &request, milliseconds(2000), &own) != 200) continue;
      const auto other = nlohmann::json::parse(own, nullptr, false);
      if (other.is_object() && other.contains("header") && idText(other["header"].value("member_id", nlohmann::json())) == leaderId) {
        return j;
      }
    }
  }
  return -1;
}

void EtcdCluster::enableAuth(const std::string& password) {
  const std::string at = endpoint(0);
  post(at, "/v3/auth/user/add", {{"name", "root"}, {"password", password}}, "adding user root");
  post(at, "/v3/auth/role/add", {{"name", "root"}}, "adding role root");
  post(at, "/v3/auth/user/grant", {{"user", "root"}, {"role", "root"}}, "granting role root");
  post(at, "/v3/auth/enable", nlohmann::json::object(), "enabling auth");
}

std::string EtcdCluster::logTail(int index) const {
  std::ifstream in(dir_ + "/" + members_.at(index).name + ".log");
  std::stringstream all;
  all << in.rdbuf();
  const std::string text = all.str();
  return text.size() > 2000 ? text.substr(text.size() - 2000) : text;
}

}  // namespace tessera::testing
