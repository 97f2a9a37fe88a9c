#include "comm/op_queue.h"

#include "tessera/core/error.h"

namespace tessera::comm::detail {

void CompletionWork::wait(Timeout timeout) {
  const Timeout limit = timeout.count() < 0 ? backstop_ : timeout;
  std::unique_lock<std::mutex> lock(mutex_);
  if (!done_.wait_for(lock, limit, [&] { return completed_; })) {
    throw TimeoutError(description_ + " did not complete within " + std::to_string(limit.count()) +
                       " ms (the operation is still pending; the communicator must be considered broken)");
  }
  if (error_) std::rethrow_exception(error_);
}

bool CompletionWork::isCompleted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_;
}

void CompletionWork::complete(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    completed_ = true;
    error_ = std::move(error);
  }
  done_.notify_all();
}

WorkPtr completedWork() {
  auto work = std::make_shared<CompletionWork>("no-op", Timeout(0));
  work->complete(nullptr);
  return work;
}

OpQueue::OpQueue(std::string name) : name_(std::move(name)) {
  thread_ = std::thread([this] { run(); });
}

OpQueue::~OpQueue() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

std::shared_ptr<CompletionWork> OpQueue::enqueue(std::function<void()> fn, std::string description,
                                                 Timeout backstop) {
  auto work = std::make_shared<CompletionWork>(std::move(description), backstop);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TESSERA_CHECK(!stopping_, "operation queued on " << name_ << " after shutdown");
    items_.push_back(Item{std::move(fn), work});
  }
  wake_.notify_one();
  return work;
}

void OpQueue::run() {
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !items_.empty(); });
      if (items_.empty()) return;  // stopping and drained
      item = std::move(items_.front());
      items_.pop_front();
    }
    std::exception_ptr error;
    try {
      item.fn();
    } catch (...) {
      error = std::current_exception();
    }
    item.work->complete(error);
  }
}

}  // namespace tessera::comm::detail
