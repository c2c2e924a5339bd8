#include "instance_state.h"

namespace pie_rt {

namespace {
thread_local InstanceState* g_current = nullptr;
constexpr size_t kErrorSize = 512;
}  // namespace

InstanceState* current_instance() { return g_current; }
void set_current_instance(InstanceState* inst) { g_current = inst; }

InstanceState::InstanceState(uint64_t id, double deadline_s, ControlLink control, ForwardLimits limits)
    : id_(id), ctl_(control), limits_(limits) {
  auto now = std::chrono::steady_clock::now();
  deadline_ = deadline_s > 0 ? now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                         std::chrono::duration<double>(deadline_s))
                             : std::chrono::steady_clock::time_point::max();
}

InstanceState::~InstanceState() { release("dropped"); }

bool InstanceState::allocate(uint32_t count, std::vector<uint32_t>& handles, std::string& error) {
  if (count > limits_.num_pages) {  // before sizing any buffer by `count`
    error = "count: " + std::to_string(count) + " pages requested, more than the pool's " +
            std::to_string(limits_.num_pages);
    return false;
  }
  char err[kErrorSize] = {0};
  std::vector<uint32_t> out(count);
  if (ctl_.api->pool_allocate(ctl_.pool, id_, count, out.data(), err, sizeof err) != PIE_OK) {
    error = std::string("count: ") + err;
    return false;
  }
  handles.insert(handles.end(), out.begin(), out.end());
  return true;
}

bool InstanceState::free(const std::vector<uint32_t>& handles, std::string& error) {
  char err[kErrorSize] = {0};
  if (ctl_.api->pool_free(ctl_.pool, id_, handles.data(), handles.size(), err, sizeof err) != PIE_OK) {
    error = std::string("pages: ") + err;
    return false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!page_masks_.empty())
    for (uint32_t h : handles) page_masks_.erase(h);
  return true;
}

bool InstanceState::resolve(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages, std::string& error) {
  char err[kErrorSize] = {0};
  pages.resize(handles.size());
  if (ctl_.api->pool_resolve(ctl_.pool, id_, handles.data(), handles.size(), pages.data(), err, sizeof err) != PIE_OK) {
    error = std::string("fwd.pages: ") + err;
    return false;
  }
  return true;
}

bool InstanceState::resolve_pinned(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages,
                                   std::shared_ptr<void>& pins, std::string& error) {
  char err[kErrorSize] = {0};
  pages.resize(handles.size());
  if (ctl_.api->pool_resolve_pinned(ctl_.pool, id_, handles.data(), handles.size(), pages.data(), &pins, err,
                                    sizeof err) != PIE_OK) {
    error = std::string("fwd.pages: ") + err;
    return false;
  }
  return true;
}

bool InstanceState::fork(const std::vector<uint32_t>& handles, std::vector<uint32_t>& out, std::string& error) {
  char err[kErrorSize] = {0};
  out.resize(handles.size());
  if (ctl_.api->pool_fork(ctl_.pool, id_, handles.data(), handles.size(), out.data(), err, sizeof err) != PIE_OK) {
    error = std::string("pages: ") + err;
    return false;
  }
  return true;
}

bool InstanceState::prepare_write(const std::vector<uint32_t>& handles, std::vector<CopySpan>& copies,
                                  std::vector<std::shared_ptr<void>>& pins, std::string& error) {
  if (handles.empty()) return true;
  char err[kErrorSize] = {0};
  std::vector<uint32_t> src(handles.size()), dst(handles.size());
  size_t n = 0;
  std::shared_ptr<void> pinned;
  if (ctl_.api->pool_prepare_write_pinned(ctl_.pool, id_, handles.data(), handles.size(), src.data(), dst.data(), &n,
                                          &pinned, err, sizeof err) != PIE_OK) {
    error = err;
    return false;
  }
  for (size_t i = 0; i < n; ++i) copies.push_back({src[i], 0, dst[i], 0, limits_.page_size});
  if (pinned) pins.push_back(std::move(pinned));
  return true;
}

PieControlQueue* InstanceState::queue_of(uint32_t handle, std::string& error) {
  if (handle == 0) return ctl_.queue;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(handle);
  if (it == queues_.end()) {
    error = "q: " + std::to_string(handle) + " is not a queue of this instance";
    return nullptr;
  }
  return it->second;
}

bool InstanceState::submit_copies(uint32_t queue, const std::vector<CopySpan>& copies,
                                  const std::vector<std::shared_ptr<void>>& pins, std::string& error) {
  if (copies.empty()) return true;
  PieControlQueue* q = queue_of(queue, error);
  if (!q) return false;
  static_assert(sizeof(CopySpan) == 5 * sizeof(uint32_t), "CopySpan is five uint32");
  char err[kErrorSize] = {0};
  PieControlFuture* fut = ctl_.api->submit_copies(q, reinterpret_cast<const uint32_t*>(copies.data()), copies.size(),
                                                  pins.data(), pins.size(), err, sizeof err);
  if (!fut) {
    error = err;
    return false;
  }
  ctl_.api->future_release(fut);  // nobody waits for a copy: the queue's order is what matters
  return true;
}

bool InstanceState::resolve_embeddings(const std::vector<uint32_t>& handles, std::vector<uint32_t>& slots,
                                       std::string& error) {
  if (!ctl_.embed_pool) {
    error = "input embeddings need embedding slots (none are configured)";
    return false;
  }
  char err[kErrorSize] = {0};
  slots.resize(handles.size());
  if (ctl_.api->pool_resolve(ctl_.embed_pool, id_, handles.data(), handles.size(), slots.data(), err, sizeof err) !=
      PIE_OK) {
    error = err;
    return false;
  }
  return true;
}

bool InstanceState::set_page_mask(uint32_t handle, std::vector<uint8_t> hidden, std::string& error) {
  std::vector<uint32_t> page;
  std::string e;
  if (!resolve({handle}, page, e)) {
    error = "p: " + std::to_string(handle) + " is not a page handle of this instance";
    return false;
  }
  bool any = false;
  for (uint8_t h : hidden) any |= h != 0;
  std::lock_guard<std::mutex> lock(mu_);
  if (any)
    page_masks_[handle] = std::move(hidden);
  else
    page_masks_.erase(handle);
  return true;
}

bool InstanceState::has_page_masks() {
  std::lock_guard<std::mutex> lock(mu_);
  return !page_masks_.empty();
}

void InstanceState::apply_page_masks(const std::vector<uint32_t>& handles, size_t kv_len, size_t t,
                                     std::vector<std::vector<uint32_t>>& mask) {
  const size_t ps = limits_.page_size;
  std::vector<uint8_t> hidden;  // (kv_len,) 1 = hidden by a page mask
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (page_masks_.empty()) return;
    for (size_t p = 0; p < handles.size(); ++p) {
      auto it = page_masks_.find(handles[p]);
      if (it == page_masks_.end()) continue;
      if (hidden.empty()) hidden.assign(kv_len, 0);
      for (size_t o = 0; o < ps && p * ps + o < kv_len; ++o) hidden[p * ps + o] = it->second[o];
    }
  }
  if (hidden.empty()) return;
  std::vector<std::vector<uint32_t>> rows(t);
  std::vector<uint8_t> visible(kv_len);
  for (size_t i = 0; i < t; ++i) {
    if (mask.empty()) {  // causal: input i sits at sequence index kv_len - t + i
      for (size_t j = 0; j < kv_len; ++j) visible[j] = j <= kv_len - t + i;
    } else {
      size_t j = 0;
      bool attend = true;
      for (uint32_t run : mask[i]) {
        for (uint32_t r = 0; r < run; ++r) visible[j++] = attend;
        attend = !attend;
      }
    }
    // re-encode (visible & !hidden) as BRLE, starting with "may attend"
    std::vector<uint32_t>& row = rows[i];
    bool attend = true;
    uint32_t run = 0;
    for (size_t j = 0; j < kv_len; ++j) {
      bool v = visible[j] && !hidden[j];
      if (v != attend) {
        row.push_back(run);
        run = 0;
        attend = v;
      }
      ++run;
    }
    row.push_back(run);
  }
  mask.swap(rows);
}

bool InstanceState::add_queue(uint32_t handle, PieControlQueue* queue) {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_ || handle == 0 || queues_.count(handle)) return false;
  queues_[handle] = queue;
  return true;
}

PieControlQueue* InstanceState::take_queue(uint32_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(handle);
  if (it == queues_.end()) return nullptr;
  PieControlQueue* q = it->second;
  queues_.erase(it);
  return q;
}

uint64_t InstanceState::submit(uint32_t queue, std::shared_ptr<ForwardCommand> command, std::string& error) {
  PieControlQueue* q = queue_of(queue, error);
  if (!q) return 0;
  char err[kErrorSize] = {0};
  PieControlFuture* fut = ctl_.api->submit_forward(q, &command, 0, err, sizeof err);
  if (!fut) {
    error = err;
    return 0;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) {
    ctl_.api->future_release(fut);
    error = "the instance has ended";
    return 0;
  }
  uint64_t f = next_future_++;
  futures_[f] = PendingPass{fut, std::move(command)};
  return f;
}

WaitStatus InstanceState::wait(uint64_t future, std::shared_ptr<ForwardCommand>& command, std::string& error) {
  PendingPass pass;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = futures_.find(future);
    if (it == futures_.end()) return WaitStatus::kUnknownFuture;
    pass = std::move(it->second);
    futures_.erase(it);  // consumed whatever happens
  }
  WaitStatus status = WaitStatus::kDeadline;
  // Wait in slices so a termination or the deadline is noticed (both also cancel the control future).
  for (;;) {
    double left = seconds_left();
    if (left != -1.0 && left <= 0) break;
    double slice = (left == -1.0 || left > 0.05) ? 0.05 : left;
    int s = ctl_.api->future_wait(pass.future, slice);
    if (s == PIE_FUTURE_READY) {
      command = std::move(pass.command);
      status = WaitStatus::kDone;
      break;
    }
    if (s == PIE_FUTURE_FAILED || s == PIE_FUTURE_CANCELLED) {
      const char* e = ctl_.api->future_error(pass.future);
      error = e ? e : "the command was cancelled";
      status = WaitStatus::kFailed;
      if (s == PIE_FUTURE_CANCELLED && terminated()) {
        error = terminate_reason();
        status = WaitStatus::kTerminated;
      }
      break;
    }
    if (terminated()) {
      error = terminate_reason();
      status = WaitStatus::kTerminated;
      break;
    }
  }
  ctl_.api->future_release(pass.future);
  return status;
}

int InstanceState::ready(uint64_t future) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = futures_.find(future);
  if (it == futures_.end()) return -1;
  return ctl_.api->future_status(it->second.future) != PIE_FUTURE_PENDING ? 1 : 0;
}

void InstanceState::terminate(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (terminated_) return;
  terminated_ = true;
  reason_ = reason;
}

bool InstanceState::terminated() {
  std::lock_guard<std::mutex> lock(mu_);
  return terminated_;
}

std::string InstanceState::terminate_reason() {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

void InstanceState::trace_pass(const ForwardCommand& command) {
  pending_pass_.num_tokens = command.num_tokens();
  pending_pass_.batch_size = command.batch_size;
  pending_pass_.batch_tokens = command.batch_tokens;
  pending_pass_.run_start_ns = command.run_start_ns;
  pending_pass_.run_end_ns = command.run_end_ns;
}

void InstanceState::trace_call(uint32_t call, int64_t start_ns, int64_t end_ns) {
  TraceEvent event = pending_pass_;
  pending_pass_ = TraceEvent{};
  if (trace_.size() >= trace_max_events_) {
    ++trace_dropped_;
    return;
  }
  event.call = call;
  event.start_ns = start_ns;
  event.end_ns = end_ns;
  trace_.push_back(event);
}

double InstanceState::seconds_left() {
  if (deadline_ == std::chrono::steady_clock::time_point::max()) return -1.0;
  return std::chrono::duration<double>(deadline_ - std::chrono::steady_clock::now()).count();
}

void InstanceState::release(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) return;
  released_ = true;
  if (!terminated_) {
    terminated_ = true;
    reason_ = reason;
  }
  for (auto& kv : futures_) ctl_.api->future_release(kv.second.future);
  futures_.clear();
  for (auto& kv : queues_) ctl_.api->queue_release(kv.second);
  queues_.clear();
  page_masks_.clear();
}

}  // namespace pie_rt
