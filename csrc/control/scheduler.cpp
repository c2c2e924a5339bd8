#include "scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

#include "errors.h"

namespace pie::control {

namespace {

Clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string queue_label(uint64_t queue_id, uint64_t instance_id) {
  return "queue " + std::to_string(queue_id) + " of instance " + std::to_string(instance_id);
}

}  // namespace

const char* policy_name(Policy policy) {
  switch (policy) {
    case Policy::kAdaptive: return "adaptive";
    case Policy::kEager: return "eager";
    case Policy::kFixedSize: return "fixed_size";
    case Policy::kFixedWait: return "fixed_wait";
    case Policy::kSizeOrWait: return "size_or_wait";
  }
  return "unknown";
}

void SchedulerConfig::validate() const {
  if (max_batch_requests == 0) throw std::invalid_argument("max_batch_requests must be >= 1");
  if (max_batch_tokens == 0) throw std::invalid_argument("max_batch_tokens must be >= 1");
  bool uses_size = policy == Policy::kFixedSize || policy == Policy::kSizeOrWait;
  bool uses_wait = policy == Policy::kFixedWait || policy == Policy::kSizeOrWait;
  if (uses_size && batch_size == 0) {
    throw std::invalid_argument(std::string("policy ") + policy_name(policy) + " needs batch_size >= 1");
  }
  if (uses_wait && !(max_wait_seconds > 0.0)) {
    throw std::invalid_argument(std::string("policy ") + policy_name(policy) + " needs max_wait > 0 seconds");
  }
  if (!(deadline_seconds >= 0.0)) throw std::invalid_argument("deadline must be >= 0 seconds");
  if (high_water_window == 0) throw std::invalid_argument("high_water_window must be >= 1");
}

// ---------------------------------------------------------------------------------------------
// CommandQueue

CommandQueue::CommandQueue(std::shared_ptr<Scheduler> scheduler, uint64_t id, uint64_t instance_id,
                           Priority priority)
    : scheduler_(std::move(scheduler)), id_(id), instance_id_(instance_id), priority_(priority) {
  ready_node_.queue = this;
}

CommandQueue::~CommandQueue() {
  // Commands pushed after the scheduler stopped draining; their futures are already unreachable.
  while (MpscNode* node = inbox_.pop()) {
    CommandPtr command(static_cast<Command*>(node));
    command->future->set_error(FutureStatus::kCancelled, close_reason_);
  }
}

CommandPtr CommandQueue::make_command(int32_t kind, Payload payload, uint32_t num_tokens,
                                      bool depends_on_previous) const {
  if (kind < 0) {
    throw std::invalid_argument(queue_label(id_, instance_id_) + ": command kind must be >= 0, got " +
                                std::to_string(kind));
  }
  if (num_tokens > scheduler_->config_.max_batch_tokens) {
    throw std::invalid_argument(queue_label(id_, instance_id_) + ": a command of " +
                                std::to_string(num_tokens) + " tokens exceeds the batch token budget (" +
                                std::to_string(scheduler_->config_.max_batch_tokens) + ")");
  }
  auto command = std::make_unique<Command>();
  command->kind = kind;
  command->num_tokens = num_tokens;
  command->depends_on_previous = depends_on_previous;
  command->payload = std::move(payload);
  return command;
}

std::shared_ptr<FutureState> CommandQueue::submit(int32_t kind, Payload payload, uint32_t num_tokens,
                                                  bool depends_on_previous) {
  return push(make_command(kind, std::move(payload), num_tokens, depends_on_previous));
}

std::vector<std::shared_ptr<FutureState>> CommandQueue::submit_all(std::vector<Submission> submissions) {
  std::vector<CommandPtr> commands;
  commands.reserve(submissions.size());
  for (Submission& s : submissions) {
    commands.push_back(make_command(s.kind, std::move(s.payload), s.num_tokens, s.depends_on_previous));
    commands.back()->from_stream = s.from_stream;
  }
  return push_all(std::move(commands));
}

std::shared_ptr<FutureState> CommandQueue::synchronize() {
  auto command = std::make_unique<Command>();
  command->kind = kSynchronizeKind;
  return push(std::move(command));
}

std::shared_ptr<FutureState> CommandQueue::submit(Submission submission) {
  CommandPtr command = make_command(submission.kind, std::move(submission.payload), submission.num_tokens,
                                    submission.depends_on_previous);
  command->from_stream = submission.from_stream;
  return push(std::move(command));
}

std::shared_ptr<FutureState> CommandQueue::push(CommandPtr command) {
  std::shared_ptr<FutureState> future;
  push_chain(&command, 1, &future);
  return future;
}

std::vector<std::shared_ptr<FutureState>> CommandQueue::push_all(std::vector<CommandPtr> commands) {
  if (closed()) throw QueueClosed(queue_label(id_, instance_id_) + " is closed (" + close_reason_ + ")");
  std::vector<std::shared_ptr<FutureState>> futures(commands.size());
  if (!commands.empty()) push_chain(commands.data(), commands.size(), futures.data());
  return futures;
}

void CommandQueue::push_chain(CommandPtr* commands, size_t count, std::shared_ptr<FutureState>* futures) {
  if (closed()) throw QueueClosed(queue_label(id_, instance_id_) + " is closed (" + close_reason_ + ")");
  const Clock::time_point now = Clock::now();
  for (size_t i = 0; i < count; ++i) {
    Command& command = *commands[i];
    command.id = scheduler_->next_command_id_.fetch_add(1, std::memory_order_relaxed);
    command.queue_id = id_;
    command.instance_id = instance_id_;
    command.queue = this;
    command.submitted_at = now;
    command.future = std::make_shared<FutureState>(command.id);
    futures[i] = command.future;
    if (i > 0) commands[i - 1]->next.store(&command, std::memory_order_relaxed);
  }
  scheduler_->num_submitted_.fetch_add(count, std::memory_order_relaxed);
  MpscNode* first = commands[0].get();
  MpscNode* last = commands[count - 1].get();
  for (size_t i = 0; i < count; ++i) commands[i].release();  // owned by the inbox from here
  inbox_.push_chain(first, last);
  scheduler_->announce(this);
  // Dekker pairing with close_queue_locked: either its drain sees this push, or we see closed_.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (closed_.load(std::memory_order_relaxed)) scheduler_->drain_after_late_push();
}

uint64_t CommandQueue::close(const std::string& reason) {
  return scheduler_->close_queue(this, queue_label(id_, instance_id_) + " closed: " + reason);
}

Priority CommandQueue::priority() const { return scheduler_->queue_priority(this); }

void CommandQueue::set_priority(Priority priority) { scheduler_->set_queue_priority(this, priority); }

// ---------------------------------------------------------------------------------------------
// Scheduler: producer side

std::shared_ptr<Scheduler> Scheduler::create(const SchedulerConfig& config) {
  config.validate();
  return std::shared_ptr<Scheduler>(new Scheduler(config));
}

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config) {}

Scheduler::~Scheduler() = default;

void Scheduler::announce(CommandQueue* queue) {
  if (!queue->on_ready_list_.exchange(true, std::memory_order_acq_rel)) {
    queue->ready_self_ = queue->shared_from_this();
    ready_queues_.push(&queue->ready_node_);
  }
  wake_consumer_if_sleeping();
}

void Scheduler::wake_consumer_if_sleeping() {
  // Dekker pairing with take(): it sets consumer_sleeping_, fences, then re-checks ready_queues_.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (consumer_sleeping_.load(std::memory_order_relaxed) &&
      consumer_sleeping_.exchange(false, std::memory_order_acq_rel)) {
    std::lock_guard<std::mutex> lock(mutex_);
    consumer_wakeup_.notify_all();
  }
}

void Scheduler::drain_after_late_push() {
  Graveyard graveyard;
  std::lock_guard<std::mutex> lock(mutex_);
  drain_locked(graveyard);
}

// ---------------------------------------------------------------------------------------------
// Scheduler: consumer side (all under mutex_)

void Scheduler::drain_locked(Graveyard& graveyard) {
  while (MpscNode* node = ready_queues_.pop()) {
    CommandQueue* queue = static_cast<CommandQueue::ReadyNode*>(node)->queue;
    std::shared_ptr<CommandQueue> keep_alive = std::move(queue->ready_self_);
    // Taken off the list before draining: a push that lands after this puts it back.
    queue->on_ready_list_.exchange(false, std::memory_order_acq_rel);
    drain_queue_locked(queue, graveyard);
    graveyard.queues.push_back(std::move(keep_alive));
  }
}

void Scheduler::drain_queue_locked(CommandQueue* queue, Graveyard& graveyard) {
  while (MpscNode* node = queue->inbox_.pop()) {
    CommandPtr command(static_cast<Command*>(node));
    if (queue->closed_.load(std::memory_order_acquire)) {
      if (command->future->set_error(FutureStatus::kCancelled, queue->close_reason_)) ++num_cancelled_;
      graveyard.commands.push_back(std::move(command));
      continue;
    }
    queue->pending_.push_back(std::move(command));
    ++num_pending_;
    if (!queue->active_) {
      queue->active_ = true;
      active_queues_.push_back(queue);
    }
  }
}

void Scheduler::resolve_barriers_locked(Graveyard& graveyard) {
  for (CommandQueue* queue : active_queues_) {
    while (!queue->pending_.empty() && queue->pending_.front()->kind == kSynchronizeKind &&
           queue->num_in_flight_ == 0) {
      CommandPtr barrier = std::move(queue->pending_.front());
      queue->pending_.pop_front();
      --num_pending_;
      Payload nothing;
      if (barrier->future->set_result(nothing)) ++num_completed_;
      graveyard.commands.push_back(std::move(barrier));
    }
  }
}

uint32_t Scheduler::high_water_locked() const {
  uint32_t high_water = 1;
  for (uint32_t size : recent_batch_sizes_) high_water = std::max(high_water, size);
  return high_water;
}

uint32_t Scheduler::recently_served_open_queues_locked() const {
  uint32_t count = 0;
  for (const auto& entry : queues_) {
    const CommandQueue& queue = *entry.second;
    if (queue.last_served_batch_ != 0 && queue.last_served_batch_ + config_.high_water_window > num_batches_ &&
        !queue.closed_.load(std::memory_order_relaxed) && !(queue.last_served_by_stream_ && queue.pending_.empty())) {
      ++count;
    }
  }
  return count;
}

bool Scheduler::plan_locked(Plan& plan) {
  // Drop queues whose pending list emptied.
  active_queues_.erase(std::remove_if(active_queues_.begin(), active_queues_.end(),
                                      [](CommandQueue* queue) {
                                        if (!queue->pending_.empty()) return false;
                                        queue->active_ = false;
                                        return true;
                                      }),
                       active_queues_.end());

  auto head_is_ready = [](const CommandQueue* queue) {
    const Command& head = *queue->pending_.front();
    if (head.kind == kSynchronizeKind) return false;
    return !(head.depends_on_previous && queue->num_in_flight_ > 0);
  };
  const Command* best_head = nullptr;
  const CommandQueue* best_queue = nullptr;
  for (const CommandQueue* queue : active_queues_) {
    if (!head_is_ready(queue)) continue;
    const Command* head = queue->pending_.front().get();
    if (best_head == nullptr || queue->priority_ > best_queue->priority_ ||
        (queue->priority_ == best_queue->priority_ && head->id < best_head->id)) {
      best_head = head;
      best_queue = queue;
    }
  }
  if (best_head == nullptr) return false;
  plan.kind = best_head->kind;

  uint32_t max_requests = config_.max_batch_requests;
  if (config_.policy == Policy::kFixedSize || config_.policy == Policy::kSizeOrWait) {
    max_requests = std::min(max_requests, config_.batch_size);
  }

  // Fill by (priority desc, depth in queue asc, age asc): for each priority, layer d holds the queues
  // whose first d commands were all selected; a queue leaves the layers at its first left-out command.
  auto eligible_at = [&](const CommandQueue* queue, size_t depth) {
    if (depth >= queue->pending_.size() || depth >= max_requests) return false;
    const Command& command = *queue->pending_[depth];
    return command.kind == plan.kind && (depth == 0 || !command.depends_on_previous);
  };
  plan.selected.reserve(std::min<uint64_t>(max_requests, num_pending_));
  plan.oldest_submitted = best_head->submitted_at;
  std::vector<CommandQueue*> layer;
  std::vector<CommandQueue*> next_layer;
  bool budget_reached = false;
  for (int priority = static_cast<int>(Priority::kHigh); priority >= 0 && plan.selected.size() < max_requests;
       --priority) {
    layer.clear();
    for (CommandQueue* queue : active_queues_) {
      if (static_cast<int>(queue->priority_) == priority && head_is_ready(queue) && eligible_at(queue, 0)) {
        layer.push_back(queue);
      }
    }
    for (size_t depth = 0; !layer.empty() && plan.selected.size() < max_requests; ++depth) {
      std::sort(layer.begin(), layer.end(), [depth](const CommandQueue* a, const CommandQueue* b) {
        return a->pending_[depth]->id < b->pending_[depth]->id;
      });
      next_layer.clear();
      for (CommandQueue* queue : layer) {
        if (plan.selected.size() >= max_requests) break;
        Command* command = queue->pending_[depth].get();
        if (plan.num_tokens + command->num_tokens > config_.max_batch_tokens) {
          budget_reached = true;  // this queue stops here; smaller commands of others may still fit
          continue;
        }
        plan.selected.push_back(command);
        plan.num_tokens += command->num_tokens;
        plan.oldest_submitted = std::min(plan.oldest_submitted, command->submitted_at);
        if (eligible_at(queue, depth + 1)) next_layer.push_back(queue);
      }
      layer.swap(next_layer);
    }
  }
  plan.full = budget_reached || plan.selected.size() >= max_requests;
  plan.num_idle_open_queues =
      num_open_queues_ > active_queues_.size() ? static_cast<uint32_t>(num_open_queues_ - active_queues_.size()) : 0;
  if (plan.num_idle_open_queues > 0 && num_stream_queues_ > 0) {  // idle queues of ended streams add nothing
    uint32_t ended_streams = 0;
    for (const auto& entry : queues_) {
      const CommandQueue& queue = *entry.second;
      if (queue.last_served_by_stream_ && !queue.active_ && !queue.closed_.load(std::memory_order_relaxed))
        ++ended_streams;
    }
    plan.num_idle_open_queues -= std::min(plan.num_idle_open_queues, ended_streams);
  }
  return !plan.selected.empty();
}

bool Scheduler::should_dispatch_locked(const Plan& plan, Clock::time_point now,
                                       Clock::time_point& wake_at) const {
  if (plan.selected.empty()) return false;
  if (plan.full) return true;
  const size_t num_ready = plan.selected.size();
  auto due_or_wait = [&](Clock::time_point due) {
    if (now >= due) return true;
    wake_at = std::min(wake_at, due);
    return false;
  };
  switch (config_.policy) {
    case Policy::kEager:
      return true;
    case Policy::kFixedSize:
      // With no idle open queue nobody can add a command beside these: waiting would never end.
      return num_ready >= config_.batch_size || plan.num_idle_open_queues == 0;
    case Policy::kFixedWait:
      return due_or_wait(plan.oldest_submitted + to_duration(config_.max_wait_seconds));
    case Policy::kSizeOrWait:
      if (num_ready >= config_.batch_size) return true;
      return due_or_wait(plan.oldest_submitted + to_duration(config_.max_wait_seconds));
    case Policy::kAdaptive: {
      // Expect back every open queue served by the last few batches: their producers are likely
      // preparing their next command while this one waits.
      const uint32_t target = std::min(std::max(high_water_locked(), recently_served_open_queues_locked()),
                                       config_.max_batch_requests);
      if (num_ready >= target || plan.num_idle_open_queues == 0) return true;
      // Waiting for the stragglers costs them at most the wait; dispatching without them costs them a
      // whole batch later (on a CPU a decode batch of 32 takes about 5x one of 1). So the wait grows
      // with the batch time: the configured deadline, or a tenth of the last batch's duration.
      const Clock::duration deadline =
          std::max<Clock::duration>(to_duration(config_.deadline_seconds), last_batch_duration_ / 10);
      if (batches_in_flight_.empty()) {
        // The engine waits: at once on a cold start or after it idled for the deadline; otherwise
        // at most the deadline after the last batch finished. (Time a command spent waiting for a
        // busy engine does not count: it was not the policy holding it back.)
        if (!last_batch_finished_) return true;
        return due_or_wait(*last_batch_finished_ + deadline);
      }
      return due_or_wait(plan.oldest_submitted + deadline);
    }
  }
  return true;
}

std::shared_ptr<Batch> Scheduler::dispatch_locked(const Plan& plan, Clock::time_point) {
  std::vector<CommandPtr> commands;
  commands.reserve(plan.selected.size());
  for (Command* selected : plan.selected) {
    CommandQueue* queue = selected->queue;
    // Each queue's selection is a prefix of its pending list, listed in order.
    if (queue->pending_.front().get() != selected) throw std::logic_error("scheduler: plan out of order");
    commands.push_back(std::move(queue->pending_.front()));
    queue->pending_.pop_front();
    ++queue->num_in_flight_;
    queue->last_served_batch_ = num_batches_ + 1;
    if (queue->last_served_by_stream_ != selected->from_stream) {
      queue->last_served_by_stream_ = selected->from_stream;
      num_stream_queues_ += selected->from_stream ? 1 : -1;
    }
  }
  const uint32_t size = static_cast<uint32_t>(commands.size());
  num_pending_ -= size;
  num_in_flight_ += size;
  num_dispatched_ += size;
  ++num_batches_;
  recent_batch_sizes_.push_back(size);
  while (recent_batch_sizes_.size() > config_.high_water_window) recent_batch_sizes_.pop_front();
  auto batch = std::make_shared<Batch>(shared_from_this(), plan.kind, std::move(commands), plan.num_tokens);
  batches_in_flight_.insert(batch.get());
  last_dispatch_ = Clock::now();
  return batch;
}

std::shared_ptr<Batch> Scheduler::take(std::optional<Clock::duration> timeout) {
  std::optional<Clock::time_point> until;
  if (timeout) until = Clock::now() + *timeout;
  Graveyard graveyard;  // declared before the lock: destroyed after it is released
  std::unique_lock<std::mutex> lock(mutex_);
  uint32_t num_spins_in_a_row = 0;
  while (true) {
    if (stopped_.load(std::memory_order_acquire)) return nullptr;
    drain_locked(graveyard);
    resolve_barriers_locked(graveyard);
    Plan plan;
    const Clock::time_point now = Clock::now();
    Clock::time_point wake_at = Clock::time_point::max();
    if (plan_locked(plan) && should_dispatch_locked(plan, now, wake_at)) return dispatch_locked(plan, now);
    if (until && now >= *until) return nullptr;
    if (!graveyard.commands.empty() || !graveyard.queues.empty()) {
      lock.unlock();
      graveyard.commands.clear();
      graveyard.queues.clear();
      lock.lock();
      continue;
    }
    consumer_sleeping_.store(true, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!ready_queues_.looks_empty()) {
      consumer_sleeping_.store(false, std::memory_order_relaxed);
      // A push is mid-way; its producer may have been preempted: let it run.
      if (++num_spins_in_a_row > 64) {
        lock.unlock();
        std::this_thread::yield();
        lock.lock();
        num_spins_in_a_row = 0;
      }
      continue;
    }
    num_spins_in_a_row = 0;
    if (until) wake_at = std::min(wake_at, *until);
    if (wake_at == Clock::time_point::max()) {
      consumer_wakeup_.wait(lock);
    } else {
      consumer_wakeup_.wait_until(lock, wake_at);
    }
    consumer_sleeping_.store(false, std::memory_order_relaxed);
  }
}

// ---------------------------------------------------------------------------------------------
// Scheduler: queues, instances, lifecycle

std::shared_ptr<CommandQueue> Scheduler::create_queue(uint64_t instance_id, Priority priority) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopped_.load(std::memory_order_acquire)) throw QueueClosed("scheduler stopped: " + stop_reason_);
  const uint64_t id = next_queue_id_.fetch_add(1, std::memory_order_relaxed);
  auto queue = std::make_shared<CommandQueue>(shared_from_this(), id, instance_id, priority);
  queues_.emplace(id, queue);
  queues_by_instance_[instance_id].push_back(queue.get());
  ++num_open_queues_;
  consumer_wakeup_.notify_all();
  return queue;
}

Priority Scheduler::queue_priority(const CommandQueue* queue) {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue->priority_;
}

void Scheduler::set_queue_priority(CommandQueue* queue, Priority priority) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue->priority_ = priority;
  consumer_wakeup_.notify_all();
}

uint64_t Scheduler::close_queue_locked(CommandQueue* queue, const std::string& message, Graveyard& graveyard) {
  if (queue->closed_.load(std::memory_order_acquire)) return 0;
  queue->close_reason_ = message;
  queue->closed_.store(true, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with CommandQueue::push
  --num_open_queues_;
  const uint64_t cancelled_before = num_cancelled_;
  drain_queue_locked(queue, graveyard);  // cancels what was still in the inbox
  for (CommandPtr& command : queue->pending_) {
    if (command->future->set_error(FutureStatus::kCancelled, message)) ++num_cancelled_;
    graveyard.commands.push_back(std::move(command));
  }
  num_pending_ -= queue->pending_.size();
  queue->pending_.clear();
  if (queue->num_in_flight_ > 0) {
    for (Batch* batch : batches_in_flight_) {
      for (const CommandPtr& command : batch->commands_) {
        if (command->queue == queue && command->future->set_error(FutureStatus::kCancelled, message)) {
          ++num_cancelled_;
        }
      }
    }
  }
  forget_queue_if_finished_locked(queue, graveyard);
  consumer_wakeup_.notify_all();
  return num_cancelled_ - cancelled_before;
}

uint64_t Scheduler::close_queue(CommandQueue* queue, const std::string& message) {
  Graveyard graveyard;
  std::lock_guard<std::mutex> lock(mutex_);
  return close_queue_locked(queue, message, graveyard);
}

void Scheduler::forget_queue_if_finished_locked(CommandQueue* queue, Graveyard& graveyard) {
  if (!queue->closed_.load(std::memory_order_acquire) || !queue->pending_.empty() ||
      queue->num_in_flight_ > 0) {
    return;
  }
  auto found = queues_.find(queue->id_);
  if (found == queues_.end()) return;
  if (queue->active_) {
    active_queues_.erase(std::find(active_queues_.begin(), active_queues_.end(), queue));
    queue->active_ = false;
  }
  auto by_instance = queues_by_instance_.find(queue->instance_id_);
  if (by_instance != queues_by_instance_.end()) {
    auto& list = by_instance->second;
    list.erase(std::remove(list.begin(), list.end(), queue), list.end());
    if (list.empty()) queues_by_instance_.erase(by_instance);
  }
  if (queue->last_served_by_stream_) {
    queue->last_served_by_stream_ = false;
    --num_stream_queues_;
  }
  graveyard.queues.push_back(std::move(found->second));
  queues_.erase(found);
}

uint64_t Scheduler::end_instance(uint64_t instance_id, const std::string& reason) {
  Graveyard graveyard;
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = queues_by_instance_.find(instance_id);
  if (found == queues_by_instance_.end()) return 0;
  const std::vector<CommandQueue*> queues = found->second;  // close_queue_locked edits the index
  const std::string message = "instance " + std::to_string(instance_id) + " ended: " + reason;
  uint64_t num_cancelled = 0;
  for (CommandQueue* queue : queues) num_cancelled += close_queue_locked(queue, message, graveyard);
  return num_cancelled;
}

void Scheduler::stop(const std::string& reason) {
  Graveyard graveyard;
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopped_.load(std::memory_order_acquire)) return;
  stop_reason_ = reason;
  stopped_.store(true, std::memory_order_release);
  std::vector<CommandQueue*> queues;
  queues.reserve(queues_.size());
  for (auto& entry : queues_) queues.push_back(entry.second.get());
  for (CommandQueue* queue : queues) close_queue_locked(queue, "scheduler stopped: " + reason, graveyard);
  drain_locked(graveyard);
  consumer_wakeup_.notify_all();
}

SchedulerStats Scheduler::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  SchedulerStats stats;
  stats.num_submitted = num_submitted_.load(std::memory_order_relaxed);
  stats.num_dispatched = num_dispatched_;
  stats.num_completed = num_completed_;
  stats.num_failed = num_failed_;
  stats.num_cancelled = num_cancelled_;
  stats.num_batches = num_batches_;
  stats.num_pending = num_pending_;
  stats.num_in_flight = num_in_flight_;
  stats.num_queues = queues_.size();
  stats.high_water = high_water_locked();
  return stats;
}

void Scheduler::finish_batch(Batch* batch, uint64_t num_completed, uint64_t num_failed) {
  Graveyard graveyard;
  std::lock_guard<std::mutex> lock(mutex_);
  batches_in_flight_.erase(batch);
  num_completed_ += num_completed;
  num_failed_ += num_failed;
  num_in_flight_ -= batch->commands_.size();
  for (const CommandPtr& command : batch->commands_) {
    CommandQueue* queue = command->queue;
    --queue->num_in_flight_;
    forget_queue_if_finished_locked(queue, graveyard);
  }
  last_batch_finished_ = Clock::now();
  if (batches_in_flight_.empty()) last_batch_duration_ = *last_batch_finished_ - last_dispatch_;
  resolve_barriers_locked(graveyard);
  consumer_wakeup_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Batch

Batch::Batch(std::shared_ptr<Scheduler> scheduler, int32_t kind, std::vector<CommandPtr> commands,
             uint64_t num_tokens)
    : scheduler_(std::move(scheduler)),
      kind_(kind),
      commands_(std::move(commands)),
      resolved_(commands_.size(), 0),
      num_tokens_(num_tokens) {}

Batch::~Batch() { finish(); }

const Command& Batch::command(size_t index) const {
  if (index >= commands_.size()) {
    throw std::out_of_range("batch index " + std::to_string(index) + " out of range for a batch of " +
                            std::to_string(commands_.size()));
  }
  return *commands_[index];
}

bool Batch::resolved(size_t index) const {
  command(index);
  return resolved_[index] != 0;
}

void Batch::check_unresolved(size_t index) const {
  const Command& target = command(index);
  if (resolved_[index]) {
    throw std::logic_error("batch index " + std::to_string(index) + " (command " + std::to_string(target.id) +
                           ") was already resolved");
  }
}

void Batch::note_resolved() {
  if (++num_resolved_ == commands_.size()) finish();
}

void Batch::set_result(size_t index, Payload result) {
  check_unresolved(index);
  resolved_[index] = 1;
  if (commands_[index]->future->set_result(result)) ++num_completed_;
  note_resolved();
}

void Batch::set_results(const std::vector<size_t>& indices, std::vector<Payload>& results) {
  if (indices.size() != results.size()) {
    throw std::invalid_argument(std::to_string(results.size()) + " results for " + std::to_string(indices.size()) +
                                " indices");
  }
  std::vector<uint8_t> listed(commands_.size(), 0);
  for (size_t index : indices) {
    check_unresolved(index);
    if (listed[index]) throw std::invalid_argument("batch index " + std::to_string(index) + " is listed twice");
    listed[index] = 1;
  }
  resolve_and_wake(indices, results.data());
  if (num_resolved_ == commands_.size()) finish();
}

void Batch::complete_all() {
  std::vector<size_t> unresolved;
  unresolved.reserve(commands_.size() - num_resolved_);
  for (size_t index = 0; index < commands_.size(); ++index)
    if (!resolved_[index]) unresolved.push_back(index);
  resolve_and_wake(unresolved, nullptr);
  finish();
}

void Batch::resolve_and_wake(const std::vector<size_t>& indices, Payload* results) {
  std::vector<FutureState*> to_wake;
  for (size_t i = 0; i < indices.size(); ++i) {
    const size_t index = indices[i];
    resolved_[index] = 1;
    ++num_resolved_;
    Payload none;
    switch (commands_[index]->future->resolve_quietly(results != nullptr ? results[i] : none)) {
      case FutureState::Resolution::kResolvedWithWaiters: to_wake.push_back(commands_[index]->future.get()); [[fallthrough]];
      case FutureState::Resolution::kResolved: ++num_completed_; break;
      case FutureState::Resolution::kAlreadyResolved: break;
    }
  }
  for (FutureState* future : to_wake) future->notify_waiters();
  // Continuations (a generation stream's next pass) run once every waiter of the batch is awake.
  for (size_t index : indices) commands_[index]->future->run_continuation();
}

void Batch::set_error(size_t index, const std::string& message) {
  check_unresolved(index);
  resolved_[index] = 1;
  if (commands_[index]->future->set_error(FutureStatus::kFailed, message)) ++num_failed_;
  note_resolved();
}

void Batch::fail_unresolved(const std::string& message) {
  for (size_t index = 0; index < commands_.size(); ++index) {
    if (resolved_[index]) continue;
    resolved_[index] = 1;
    if (commands_[index]->future->set_error(FutureStatus::kFailed, message)) ++num_failed_;
    ++num_resolved_;
  }
  finish();
}

void Batch::finish() {
  if (finished_) return;
  finished_ = true;
  for (size_t index = 0; index < commands_.size(); ++index) {
    if (resolved_[index]) continue;
    resolved_[index] = 1;
    ++num_resolved_;
    if (commands_[index]->future->set_error(FutureStatus::kFailed,
                                            "the engine finished the batch without a result for command " +
                                                std::to_string(commands_[index]->id))) {
      ++num_failed_;
    }
  }
  scheduler_->finish_batch(this, num_completed_, num_failed_);
}

}  // namespace pie::control
