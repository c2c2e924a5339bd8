// Command queues and the batch scheduler.
//
// Data flow: producers (inferlet threads, any number, no GIL) submit commands to their CommandQueue
// (lock-free MPSC). The batch loop (one consumer at a time) calls Scheduler::take(), which moves
// submitted commands into per-queue pending lists, decides by the dispatch policy whether to form a
// batch now, and returns it; the engine completes each command's future through the Batch.
//
// Ordering and batching rules:
//   - A queue runs its commands in submission order. Only a queue's leading pending commands can be
//     dispatched: the head, plus the consecutive commands after it (vertical batching) of the same
//     kind that are not marked depends_on_previous.
//   - A head marked depends_on_previous is held back while an earlier command of its queue is in
//     flight (dispatched, not yet finished).
//   - A synchronize barrier completes when every command submitted before it has finished; commands
//     after it wait for it.
//   - Generation streams are first-class: a stream submits its next pass from the continuation of the
//     previous one, before that batch finishes, so it is pending when the next batch is planned. The
//     adaptive and fixed-size policies wait only for queues whose producer may still be preparing a
//     command; an idle queue last served by a stream is not one (its stream has ended).
//   - A batch holds commands of one kind (horizontal batching across queues). The kind is that of the
//     best ready head: highest queue priority, then oldest. Slots go by (priority desc, position in
//     its queue asc, age asc), first fit under max_batch_requests and max_batch_tokens.
//
// Locking: submit is lock-free. Everything else runs under Scheduler::mutex_. No code path acquires
// the GIL or drops a Payload while holding mutex_ (dropped commands and queues are collected and
// destroyed after unlocking), so callers holding the GIL may block on mutex_ without deadlock.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "future.h"
#include "mpsc_queue.h"

namespace pie::control {

enum class Priority : uint8_t { kLow = 0, kNormal = 1, kHigh = 2 };

enum class Policy : uint8_t {
  kAdaptive = 0,  // at once when the engine is idle; else until the high-water size, budget or deadline
                  // (the deadline is at least a tenth of the last batch's duration)
                  // (high-water size: max of the recent batch sizes and of the open queues served recently)
  kEager = 1,      // whatever is ready, at once
  kFixedSize = 2,  // when batch_size commands are ready (batches of at most batch_size)
  kFixedWait = 3,  // when the oldest ready command has waited max_wait
  kSizeOrWait = 4, // whichever of the two comes first (batches of at most batch_size)
};

const char* policy_name(Policy policy);

struct SchedulerConfig {
  uint32_t max_batch_requests = 256;
  uint32_t max_batch_tokens = 8192;
  Policy policy = Policy::kAdaptive;
  uint32_t batch_size = 0;           // kFixedSize, kSizeOrWait
  double max_wait_seconds = 0.0;     // kFixedWait, kSizeOrWait
  double deadline_seconds = 0.002;   // kAdaptive: longest extra wait of a ready command
  uint32_t high_water_window = 8;    // kAdaptive: the high-water size is the max of this many batches

  void validate() const;  // throws std::invalid_argument naming the bad field
};

constexpr int32_t kSynchronizeKind = -1;  // internal: a barrier, never dispatched to the engine

class CommandQueue;
class Scheduler;

struct Command : MpscNode {
  uint64_t id = 0;
  uint64_t queue_id = 0;
  uint64_t instance_id = 0;
  int32_t kind = 0;
  uint32_t num_tokens = 0;
  bool depends_on_previous = false;
  bool from_stream = false;  // submitted by a generation stream (generation_stream.h)
  CommandQueue* queue = nullptr;  // outlives the command while it is pending or in flight
  Clock::time_point submitted_at;
  Payload payload;
  std::shared_ptr<FutureState> future;
};

using CommandPtr = std::unique_ptr<Command>;

class CommandQueue : public std::enable_shared_from_this<CommandQueue> {
 public:
  CommandQueue(std::shared_ptr<Scheduler> scheduler, uint64_t id, uint64_t instance_id, Priority priority);
  ~CommandQueue();

  // Lock-free. Throws QueueClosed after close(), std::invalid_argument for a negative kind or
  // num_tokens above the batch token budget.
  std::shared_ptr<FutureState> submit(int32_t kind, Payload payload, uint32_t num_tokens,
                                      bool depends_on_previous);
  struct Submission {
    int32_t kind = 0;
    Payload payload;
    uint32_t num_tokens = 0;
    bool depends_on_previous = false;
    bool from_stream = false;  // a generation stream's: its next one is submitted when it completes
  };
  // One command (as submit), with its from_stream mark.
  std::shared_ptr<FutureState> submit(Submission submission);
  // Several commands in one lock-free push: the scheduler sees all of them or none, so consecutive
  // independent ones can share one batch. Checks every one (as submit) before pushing any.
  std::vector<std::shared_ptr<FutureState>> submit_all(std::vector<Submission> submissions);
  // A barrier future: resolves (with no result) once everything submitted before it has finished.
  std::shared_ptr<FutureState> synchronize();
  // Cancels the pending commands and the in-flight futures of this queue; later submits throw.
  // Returns the number of futures cancelled.
  uint64_t close(const std::string& reason);

  uint64_t id() const { return id_; }
  uint64_t instance_id() const { return instance_id_; }
  bool closed() const { return closed_.load(std::memory_order_acquire); }
  Priority priority() const;
  void set_priority(Priority priority);

 private:
  friend class Scheduler;
  struct ReadyNode : MpscNode {
    CommandQueue* queue = nullptr;
  };

  std::shared_ptr<FutureState> push(CommandPtr command);
  CommandPtr make_command(int32_t kind, Payload payload, uint32_t num_tokens, bool depends_on_previous) const;
  // Numbers the commands, links them and pushes them as one chain; returns their futures in order.
  std::vector<std::shared_ptr<FutureState>> push_all(std::vector<CommandPtr> commands);
  // push_all over commands[:count] (count >= 1), their futures written to futures[:count]: no container
  // is allocated (a stream's pass each step).
  void push_chain(CommandPtr* commands, size_t count, std::shared_ptr<FutureState>* futures);

  const std::shared_ptr<Scheduler> scheduler_;
  const uint64_t id_;
  const uint64_t instance_id_;
  MpscQueue inbox_;
  std::atomic<bool> closed_{false};
  std::string close_reason_;  // written once, before closed_ is set
  // True from the moment a producer claims the right to put this queue on the ready list until the
  // consumer takes it off and starts draining it. ready_self_ keeps the queue alive meanwhile.
  std::atomic<bool> on_ready_list_{false};
  ReadyNode ready_node_;
  std::shared_ptr<CommandQueue> ready_self_;

  // Consumer side, guarded by Scheduler::mutex_.
  Priority priority_;
  std::deque<CommandPtr> pending_;
  uint32_t num_in_flight_ = 0;
  bool active_ = false;     // listed in Scheduler::active_queues_
  uint64_t last_served_batch_ = 0;  // sequence number (1-based) of the last batch that held a command of it
  // The last command dispatched from it was a generation stream's. Such a queue, once idle, has no
  // producer preparing a command: a running stream submits its next pass before its batch finishes.
  bool last_served_by_stream_ = false;
};

class Batch;

struct SchedulerStats {
  uint64_t num_submitted = 0;
  uint64_t num_dispatched = 0;
  uint64_t num_completed = 0;  // resolved with a result
  uint64_t num_failed = 0;
  uint64_t num_cancelled = 0;
  uint64_t num_batches = 0;
  uint64_t num_pending = 0;    // drained from the queues, not yet dispatched
  uint64_t num_in_flight = 0;  // dispatched, batch not finished
  uint64_t num_queues = 0;
  uint32_t high_water = 0;
};

class Scheduler : public std::enable_shared_from_this<Scheduler> {
 public:
  static std::shared_ptr<Scheduler> create(const SchedulerConfig& config);
  ~Scheduler();

  const SchedulerConfig& config() const { return config_; }

  std::shared_ptr<CommandQueue> create_queue(uint64_t instance_id, Priority priority);

  // Blocks until the policy dispatches a batch (returned), the timeout passes or the scheduler stops
  // (nullptr). One consumer at a time is served; concurrent callers are serialised.
  std::shared_ptr<Batch> take(std::optional<Clock::duration> timeout);

  // Closes every queue of the instance; its pending and in-flight futures are cancelled with
  // "instance N ended: <reason>". Returns the number of futures cancelled.
  uint64_t end_instance(uint64_t instance_id, const std::string& reason);

  // Cancels everything, closes every queue, wakes take() (which then returns nullptr).
  void stop(const std::string& reason);
  bool stopped() const { return stopped_.load(std::memory_order_acquire); }

  SchedulerStats stats();

 private:
  friend class CommandQueue;
  friend class Batch;
  explicit Scheduler(const SchedulerConfig& config);

  struct Graveyard {  // destroyed after mutex_ is released
    std::vector<CommandPtr> commands;
    std::vector<std::shared_ptr<CommandQueue>> queues;
  };
  struct Plan {
    int32_t kind = 0;
    std::vector<Command*> selected;  // in batch order
    uint64_t num_tokens = 0;
    bool full = false;                 // no further command could join (request or token limit)
    Clock::time_point oldest_submitted;
    uint32_t num_idle_open_queues = 0;  // open queues with nothing pending: who could still add
  };

  // Producer side.
  void announce(CommandQueue* queue);
  void wake_consumer_if_sleeping();
  void drain_after_late_push();

  // Under mutex_.
  void drain_locked(Graveyard& graveyard);
  void drain_queue_locked(CommandQueue* queue, Graveyard& graveyard);
  void resolve_barriers_locked(Graveyard& graveyard);
  bool plan_locked(Plan& plan);
  bool should_dispatch_locked(const Plan& plan, Clock::time_point now, Clock::time_point& wake_at) const;
  std::shared_ptr<Batch> dispatch_locked(const Plan& plan, Clock::time_point now);
  uint64_t close_queue_locked(CommandQueue* queue, const std::string& message, Graveyard& graveyard);
  uint64_t close_queue(CommandQueue* queue, const std::string& message);
  Priority queue_priority(const CommandQueue* queue);
  void set_queue_priority(CommandQueue* queue, Priority priority);
  void forget_queue_if_finished_locked(CommandQueue* queue, Graveyard& graveyard);
  void finish_batch(Batch* batch, uint64_t num_completed, uint64_t num_failed);
  uint32_t high_water_locked() const;
  uint32_t recently_served_open_queues_locked() const;

  const SchedulerConfig config_;
  std::atomic<uint64_t> next_command_id_{1};
  std::atomic<uint64_t> next_queue_id_{1};
  std::atomic<uint64_t> num_submitted_{0};
  std::atomic<bool> stopped_{false};
  std::atomic<bool> consumer_sleeping_{false};
  MpscQueue ready_queues_;  // of CommandQueue::ReadyNode

  std::mutex mutex_;
  std::condition_variable consumer_wakeup_;
  std::string stop_reason_;
  std::unordered_map<uint64_t, std::shared_ptr<CommandQueue>> queues_;
  std::unordered_map<uint64_t, std::vector<CommandQueue*>> queues_by_instance_;
  std::vector<CommandQueue*> active_queues_;  // queues with pending commands (plus stale entries)
  std::unordered_set<Batch*> batches_in_flight_;
  std::deque<uint32_t> recent_batch_sizes_;
  std::optional<Clock::time_point> last_batch_finished_;
  Clock::time_point last_dispatch_{};
  Clock::duration last_batch_duration_{0};  // dispatch -> finish of the last batch
  uint64_t num_open_queues_ = 0;
  uint64_t num_stream_queues_ = 0;  // queues (still listed) whose last dispatched command was a stream's
  uint64_t num_pending_ = 0;
  uint64_t num_in_flight_ = 0;
  uint64_t num_dispatched_ = 0;
  uint64_t num_completed_ = 0;
  uint64_t num_failed_ = 0;
  uint64_t num_cancelled_ = 0;
  uint64_t num_batches_ = 0;
};

// One dispatched batch. The engine resolves each command (set_result / set_error); the batch
// finishes when all are resolved, or when finish() is called or it is destroyed, which fails the
// unresolved ones. Finishing releases the commands' queues for their next dependent commands.
// Methods are called by the engine thread; they are not meant for concurrent use.
class Batch {
 public:
  Batch(std::shared_ptr<Scheduler> scheduler, int32_t kind, std::vector<CommandPtr> commands,
        uint64_t num_tokens);
  ~Batch();
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  int32_t kind() const { return kind_; }
  size_t size() const { return commands_.size(); }
  uint64_t num_tokens() const { return num_tokens_; }
  const Command& command(size_t index) const;
  bool resolved(size_t index) const;
  bool finished() const { return finished_; }

  // Throws std::out_of_range / std::logic_error for a bad index or a command resolved twice.
  void set_result(size_t index, Payload result);
  // Resolves results[i] at indices[i] for all i, then wakes the waiters, so that a producer with
  // several commands in the batch wakes once. Validates everything before resolving anything.
  void set_results(const std::vector<size_t>& indices, std::vector<Payload>& results);
  // Resolves every command not resolved yet with no result (a handler that wrote its results into the
  // commands), waking the waiters as set_results does, and finishes the batch.
  void complete_all();
  void set_error(size_t index, const std::string& message);
  void fail_unresolved(const std::string& message);
  void finish();

 private:
  // Resolves the (checked, unresolved) commands at `indices` with results[i] (none: no result), wakes their
  // waiters, then runs their continuations.
  void resolve_and_wake(const std::vector<size_t>& indices, Payload* results);
  friend class Scheduler;
  void check_unresolved(size_t index) const;
  void note_resolved();

  std::shared_ptr<Scheduler> scheduler_;
  const int32_t kind_;
  std::vector<CommandPtr> commands_;
  std::vector<uint8_t> resolved_;
  const uint64_t num_tokens_;
  size_t num_resolved_ = 0;
  uint64_t num_completed_ = 0;  // resolved with a result on a still-pending future
  uint64_t num_failed_ = 0;
  bool finished_ = false;
};

}  // namespace pie::control
