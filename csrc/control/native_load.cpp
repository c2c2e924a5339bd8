#include "native_load.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

namespace pie::control {

NativeLoadResult drive_native_producers(const std::shared_ptr<Scheduler>& scheduler, uint32_t num_producers,
                                        uint32_t commands_per_producer, uint32_t window, int32_t kind,
                                        uint64_t first_instance_id) {
  if (num_producers == 0 || window == 0) throw std::invalid_argument("num_producers and window must be >= 1");
  struct Tally {
    uint64_t num_ready = 0, num_failed = 0, num_cancelled = 0;
    double latency_ns_sum = 0.0;
  };
  std::vector<std::shared_ptr<CommandQueue>> queues;
  queues.reserve(num_producers);
  for (uint32_t i = 0; i < num_producers; ++i) {
    queues.push_back(scheduler->create_queue(first_instance_id + i, Priority::kNormal));
  }
  std::vector<Tally> tallies(num_producers);
  std::vector<std::thread> threads;
  threads.reserve(num_producers);
  const Clock::time_point start = Clock::now();
  for (uint32_t i = 0; i < num_producers; ++i) {
    threads.emplace_back([&, i] {
      CommandQueue& queue = *queues[i];
      Tally& tally = tallies[i];
      std::deque<std::pair<Clock::time_point, std::shared_ptr<FutureState>>> unresolved;
      auto retire_oldest = [&] {
        auto& [submitted_at, future] = unresolved.front();
        switch (future->wait()) {
          case FutureStatus::kReady: ++tally.num_ready; break;
          case FutureStatus::kFailed: ++tally.num_failed; break;
          default: ++tally.num_cancelled; break;
        }
        tally.latency_ns_sum += std::chrono::duration<double, std::nano>(Clock::now() - submitted_at).count();
        unresolved.pop_front();
      };
      for (uint32_t n = 0; n < commands_per_producer; ++n) {
        if (unresolved.size() >= window) retire_oldest();
        unresolved.emplace_back(Clock::now(), queue.submit(kind, Payload(), 1, false));
      }
      while (!unresolved.empty()) retire_oldest();
      queue.close("producer finished");
    });
  }
  for (std::thread& thread : threads) thread.join();
  NativeLoadResult result;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  double latency_ns_sum = 0.0;
  for (const Tally& tally : tallies) {
    result.num_ready += tally.num_ready;
    result.num_failed += tally.num_failed;
    result.num_cancelled += tally.num_cancelled;
    latency_ns_sum += tally.latency_ns_sum;
  }
  const uint64_t total = result.num_ready + result.num_failed + result.num_cancelled;
  result.mean_latency_ns = total > 0 ? latency_ns_sum / static_cast<double>(total) : 0.0;
  return result;
}

double wakeup_round_trip_ns(uint32_t iterations) {
  std::mutex mutex;
  std::condition_variable changed;
  bool ball_is_remote = false;
  std::thread partner([&] {
    for (uint32_t i = 0; i < iterations; ++i) {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return ball_is_remote; });
      ball_is_remote = false;
      changed.notify_one();
    }
  });
  const Clock::time_point start = Clock::now();
  for (uint32_t i = 0; i < iterations; ++i) {
    std::unique_lock<std::mutex> lock(mutex);
    ball_is_remote = true;
    changed.notify_one();
    changed.wait(lock, [&] { return !ball_is_remote; });
  }
  const double elapsed_ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
  partner.join();
  return iterations > 0 ? elapsed_ns / iterations : 0.0;
}

}  // namespace pie::control
