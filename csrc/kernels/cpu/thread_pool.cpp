#include "cpu/thread_pool.h"

#include <cstdlib>
#include <immintrin.h>

namespace pie {

namespace {
constexpr int kSpinIterations = 4000;  // ~ tens of microseconds before sleeping
}

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool([] {
    const char* env = std::getenv("PIE_KERNEL_THREADS");
    int n = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return n > 0 ? n : 1;
  }());
  return pool;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run(int max_shares, const std::function<void(int, int)>& fn) {
  const int shares = std::max(1, std::min(max_shares, num_threads()));
  if (shares == 1) {
    fn(0, 1);
    return;
  }
  std::lock_guard<std::mutex> job_lock(job_mutex_);
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    job_ = &fn;
    job_shares_ = shares;
    remaining_.store(num_threads() - 1);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  fn(0, shares);
  while (remaining_.load(std::memory_order_acquire) != 0) _mm_pause();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && spins < kSpinIterations) {
      _mm_pause();
      ++spins;
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    if (index < job_shares_) (*job_)(index, job_shares_);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace pie
