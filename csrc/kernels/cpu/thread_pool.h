// A small persistent thread pool for the CPU kernels: the caller runs share 0 of a job and
// `num_threads - 1` workers run the others. Workers spin briefly after a job (kernels come in
// bursts, one per layer) and then sleep on a condition variable, so they do not steal the cores
// from the framework's own threads between bursts.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pie {

class ThreadPool {
 public:
  // The process-wide pool; its size is PIE_KERNEL_THREADS or the number of hardware threads.
  static ThreadPool& instance();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(share, num_shares) for share in [0, num_shares), num_shares = min(num_threads, max_shares),
  // and returns when all calls have returned. Not reentrant: one job at a time (callers serialise).
  void run(int max_shares, const std::function<void(int, int)>& fn);

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // serialises callers of run()
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};  // bumped once per job
  std::atomic<int> remaining_{0};        // worker shares of the current job not yet finished
  std::atomic<bool> stop_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  int job_shares_ = 0;
};

}  // namespace pie
