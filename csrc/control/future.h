// Payloads and futures: the two things a command carries through the control layer.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

namespace pie::control {

using Clock = std::chrono::steady_clock;

// An opaque value owned by the control layer: a command's request or a future's result.
// The layer never looks inside it. `release(ptr)` runs exactly once, when the value is dropped, on
// whatever thread drops it, never while a control-layer mutex is held (see scheduler.h).
// A null Payload carries nothing.
class Payload {
 public:
  using Release = void (*)(void*);

  Payload() = default;
  Payload(void* ptr, Release release) : ptr_(ptr), release_(release) {}
  Payload(const Payload&) = delete;
  Payload& operator=(const Payload&) = delete;
  Payload(Payload&& other) noexcept : ptr_(other.ptr_), release_(other.release_) { other.ptr_ = nullptr; }
  Payload& operator=(Payload&& other) noexcept {
    if (this != &other) {
      reset();
      ptr_ = std::exchange(other.ptr_, nullptr);
      release_ = other.release_;
    }
    return *this;
  }
  ~Payload() { reset(); }

  void* get() const { return ptr_; }
  Release release_function() const { return release_; }
  explicit operator bool() const { return ptr_ != nullptr; }
  void reset() {
    if (ptr_ != nullptr && release_ != nullptr) release_(std::exchange(ptr_, nullptr));
    ptr_ = nullptr;
  }

 private:
  void* ptr_ = nullptr;
  Release release_ = nullptr;
};

enum class FutureStatus : uint8_t { kPending = 0, kReady = 1, kFailed = 2, kCancelled = 3 };

class FutureState;

// A continuation held weakly and called with the resolved future: what a generation stream chains on
// every pass, with no allocation per pass (a std::function holding captures allocates). A listener
// gone by the time the future resolves is not called.
class FutureListener {
 public:
  virtual ~FutureListener() = default;
  virtual void on_future_resolved(FutureState& future) = 0;
};

// The completion of one command. Resolved exactly once (the first of set_result / set_error wins);
// waiters block on a condition variable, never spinning. Thread-safe.
//
// A continuation (`then`) runs once, after the future is resolved and its waiters woken, on the thread
// that resolved it (or at once, on the caller's thread, if it already was). A cancellation resolves
// futures under the scheduler's mutex: a continuation must not take that mutex or the GIL when it finds
// the future cancelled (generation_stream.cpp only records the end then).
class FutureState {
 public:
  explicit FutureState(uint64_t command_id) : command_id_(command_id) {}

  uint64_t command_id() const { return command_id_; }
  FutureStatus status() const { return status_.load(std::memory_order_acquire); }
  bool done() const { return status() != FutureStatus::kPending; }

  enum class Resolution : uint8_t { kAlreadyResolved, kResolved, kResolvedWithWaiters };

  // Resolves with `result` without waking waiters (call notify_waiters() for kResolvedWithWaiters);
  // lets a batch resolve all its futures before any waiter runs. kAlreadyResolved leaves `result`
  // with the caller (to drop outside any lock).
  Resolution resolve_quietly(Payload& result) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (status_.load(std::memory_order_relaxed) != FutureStatus::kPending) return Resolution::kAlreadyResolved;
    result_ = std::move(result);
    status_.store(FutureStatus::kReady, std::memory_order_release);
    return num_waiters_ == 0 ? Resolution::kResolved : Resolution::kResolvedWithWaiters;
  }

  void notify_waiters() { resolved_.notify_all(); }

  // Calls listener->on_future_resolved(*this) once the future is resolved (now, if it is already), if
  // the listener is still alive then. A future has one continuation.
  void then(std::weak_ptr<FutureListener> listener) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (status_.load(std::memory_order_relaxed) == FutureStatus::kPending) {
        listener_ = std::move(listener);
        return;
      }
    }
    if (std::shared_ptr<FutureListener> alive = listener.lock()) alive->on_future_resolved(*this);
  }

  // Runs the continuation, if any, once (the resolver calls it after waking the waiters).
  void run_continuation() {
    std::weak_ptr<FutureListener> listener;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      listener.swap(listener_);
    }
    if (std::shared_ptr<FutureListener> alive = listener.lock()) alive->on_future_resolved(*this);
  }

  // Resolves with `result`. Returns false, leaving `result` with the caller (to drop outside any
  // lock), when the future was already resolved.
  bool set_result(Payload& result) {
    Resolution resolution = resolve_quietly(result);
    if (resolution == Resolution::kResolvedWithWaiters) notify_waiters();
    if (resolution == Resolution::kAlreadyResolved) return false;
    run_continuation();
    return true;
  }

  // Resolves as failed or cancelled with `message`. Returns false when already resolved.
  bool set_error(FutureStatus status, std::string message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (status_.load(std::memory_order_relaxed) != FutureStatus::kPending) return false;
      error_ = std::move(message);
      status_.store(status, std::memory_order_release);
      if (num_waiters_ > 0) resolved_.notify_all();
    }
    run_continuation();
    return true;
  }

  // Blocks until resolved or until `deadline`; returns the status (kPending on timeout).
  FutureStatus wait(std::optional<Clock::time_point> deadline = std::nullopt) {
    FutureStatus current = status();
    if (current != FutureStatus::kPending) return current;
    std::unique_lock<std::mutex> lock(mutex_);
    ++num_waiters_;
    auto is_resolved = [this] { return status_.load(std::memory_order_relaxed) != FutureStatus::kPending; };
    if (deadline) {
      resolved_.wait_until(lock, *deadline, is_resolved);
    } else {
      resolved_.wait(lock, is_resolved);
    }
    --num_waiters_;
    return status_.load(std::memory_order_relaxed);
  }

  // Valid once status() is kReady (result) or kFailed / kCancelled (error); never modified after.
  const Payload& result() const { return result_; }
  const std::string& error() const { return error_; }

 private:
  const uint64_t command_id_;
  std::atomic<FutureStatus> status_{FutureStatus::kPending};
  std::mutex mutex_;
  std::condition_variable resolved_;
  uint32_t num_waiters_ = 0;  // guarded by mutex_
  std::weak_ptr<FutureListener> listener_;  // guarded by mutex_
  Payload result_;
  std::string error_;
};

}  // namespace pie::control
