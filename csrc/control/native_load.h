// A load generator of native producer threads (no GIL), for the stress test and the overhead
// benchmark: it measures the control layer as the runtime's C++ host functions will use it.
#pragma once

#include <cstdint>
#include <memory>

#include "scheduler.h"

namespace pie::control {

struct NativeLoadResult {
  double seconds = 0.0;          // wall time from the first submit to the last future resolved
  uint64_t num_ready = 0;        // futures resolved with a result
  uint64_t num_failed = 0;
  uint64_t num_cancelled = 0;
  double mean_latency_ns = 0.0;  // submit -> future resolved, as seen by the producer
};

// Each of `num_producers` threads opens a queue for instance first_instance_id + i, submits
// `commands_per_producer` commands of `kind` (1 token, no payload) keeping at most `window` unresolved,
// waits for all, and closes its queue. Someone else (the batch loop) must be taking batches.
NativeLoadResult drive_native_producers(const std::shared_ptr<Scheduler>& scheduler, uint32_t num_producers,
                                        uint32_t commands_per_producer, uint32_t window, int32_t kind,
                                        uint64_t first_instance_id);

// The operating system's floor for a blocking hand-off: mean ns of one round trip between two
// threads over a mutex + condition variable (what a submit -> wait -> complete costs at least).
double wakeup_round_trip_ns(uint32_t iterations);

}  // namespace pie::control
