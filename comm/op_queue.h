// Private to comm/: runs a communicator's operations, in issue order, on one
// background thread, and hands out Work handles for them. Gloo and MPI use it
// so that async calls overlap with the caller's compute while the backend,
// which is not safe to drive from two threads at once, sees one caller.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "tessera/comm/communicator.h"
#include "tessera/core/timer.h"

namespace tessera::comm::detail {

// Work whose completion is signalled by whoever runs the operation.
class CompletionWork : public Work {
 public:
  // description names the operation and group for timeout errors; backstop is
  // how long wait(kUseCommTimeout) waits before declaring the operation stuck
  // (the operation's own timeout plus time for diagnosis).
  CompletionWork(std::string description, Timeout backstop)
      : description_(std::move(description)), backstop_(backstop) {}

  void wait(Timeout timeout = kUseCommTimeout) override;
  bool isCompleted() override;

  // Marks the work done; error is null on success. Called once.
  void complete(std::exception_ptr error);

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  bool completed_ = false;
  std::exception_ptr error_;
  std::string description_;
  Timeout backstop_;
};

// A completed Work (for operations with nothing to do, e.g. zero elements).
WorkPtr completedWork();

class OpQueue {
 public:
  explicit OpQueue(std::string name);
  // Runs the queued operations, then joins the thread. Operations must end by
  // themselves (Gloo's carry timeouts); a backend whose operations can block
  // forever (MPI) must leak the queue of a stuck group instead of destroying it.
  ~OpQueue();

  // Queues fn; the returned work completes when fn returns or throws.
  std::shared_ptr<CompletionWork> enqueue(std::function<void()> fn, std::string description,
                                          Timeout backstop);

 private:
  struct Item {
    std::function<void()> fn;
    std::shared_ptr<CompletionWork> work;
  };
  void run();

  std::string name_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Item> items_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace tessera::comm::detail
