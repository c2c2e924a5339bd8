#include "host.h"

#include <algorithm>
#include <unordered_set>

namespace pie_rt {

namespace {
thread_local Instance* g_current = nullptr;
}

Instance* current_instance() { return g_current; }
void set_current_instance(Instance* inst) { g_current = inst; }

// ---- Host ---------------------------------------------------------------------------------------

Host::Host(uint32_t num_pages, uint32_t page_size, uint32_t vocab_size, uint32_t max_batch_tokens)
    : num_pages_(num_pages), page_size_(page_size), vocab_size_(vocab_size), max_batch_tokens_(max_batch_tokens) {
  free_list_.reserve(num_pages);
  for (uint32_t p = num_pages; p > 0; --p) free_list_.push_back(p - 1);  // pop_back hands out 0, 1, ...
}

uint32_t Host::num_free_pages() {
  std::lock_guard<std::mutex> lock(pages_mu_);
  return static_cast<uint32_t>(free_list_.size());
}

bool Host::allocate_pages(uint32_t count, std::vector<uint32_t>& out) {
  std::lock_guard<std::mutex> lock(pages_mu_);
  if (count > free_list_.size()) return false;
  for (uint32_t i = 0; i < count; ++i) {
    out.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return true;
}

void Host::free_pages(const std::vector<uint32_t>& pages) {
  std::lock_guard<std::mutex> lock(pages_mu_);
  free_list_.insert(free_list_.end(), pages.begin(), pages.end());
}

void Host::push(std::shared_ptr<Command> cmd) {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    cmd->id = next_command_++;
    queue_.push_back(std::move(cmd));
  }
  queue_cv_.notify_one();
}

std::vector<std::shared_ptr<Command>> Host::take(size_t max_requests, size_t max_tokens, double timeout_s) {
  std::vector<std::shared_ptr<Command>> batch;
  std::unique_lock<std::mutex> lock(queue_mu_);
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  queue_cv_.wait_until(lock, until, [&] { return stopped_ || !queue_.empty(); });
  size_t tokens = 0;
  while (!queue_.empty() && batch.size() < max_requests) {
    auto& next = queue_.front();
    if (next->owner.expired()) {  // its instance is gone: nobody waits for it
      queue_.pop_front();
      continue;
    }
    size_t t = next->tokens.size();
    if (!batch.empty() && tokens + t > max_tokens) break;
    tokens += t;
    batch.push_back(std::move(next));
    queue_.pop_front();
  }
  return batch;
}

size_t Host::cancel_instance(uint64_t instance_id) {
  std::lock_guard<std::mutex> lock(queue_mu_);
  size_t before = queue_.size();
  queue_.erase(std::remove_if(queue_.begin(), queue_.end(),
                              [&](const std::shared_ptr<Command>& c) { return c->instance_id == instance_id; }),
               queue_.end());
  return before - queue_.size();
}

void Host::complete(const std::shared_ptr<Command>& cmd, std::vector<Output>&& outputs) {
  auto inst = cmd->owner.lock();
  if (!inst) return;
  {
    std::lock_guard<std::mutex> lock(inst->mu_);
    if (!cmd->pending->done) {
      cmd->pending->outputs = std::move(outputs);
      cmd->pending->done = true;
      --inst->in_flight_;
    }
  }
  inst->cv_.notify_all();
}

void Host::fail(const std::shared_ptr<Command>& cmd, const std::string& message) {
  auto inst = cmd->owner.lock();
  if (!inst) return;
  {
    std::lock_guard<std::mutex> lock(inst->mu_);
    if (!cmd->pending->done) {
      cmd->pending->error = message;
      cmd->pending->failed = true;
      cmd->pending->done = true;
      --inst->in_flight_;
    }
  }
  inst->cv_.notify_all();
}

void Host::stop() {
  std::deque<std::shared_ptr<Command>> dropped;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    stopped_ = true;
    dropped.swap(queue_);
  }
  queue_cv_.notify_all();
  for (auto& cmd : dropped) fail(cmd, "the engine stopped");
}

void Host::set_outputs(const std::shared_ptr<Command>& cmd, std::vector<Output>&& outputs) {
  cmd->pending->outputs = std::move(outputs);  // read by the waiter after the control future resolves
}

uint64_t Host::num_pending() {
  std::lock_guard<std::mutex> lock(queue_mu_);
  return queue_.size();
}

// ---- Instance -----------------------------------------------------------------------------------

Instance::Instance(std::shared_ptr<Host> host, uint64_t id, double deadline_s, ControlLink control)
    : host_(std::move(host)), ctl_(control), id_(id) {
  auto now = std::chrono::steady_clock::now();
  deadline_ = deadline_s > 0 ? now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                         std::chrono::duration<double>(deadline_s))
                             : std::chrono::steady_clock::time_point::max();
}

Instance::~Instance() { release("dropped"); }

namespace {
constexpr size_t kErrorSize = 512;
}

bool Instance::allocate(uint32_t count, std::vector<uint32_t>& handles, std::string& error) {
  if (count > host_->num_pages()) {  // before sizing any buffer by `count`
    error = "count: " + std::to_string(count) + " pages requested, more than the pool's " +
            std::to_string(host_->num_pages());
    return false;
  }
  if (ctl_.api) {
    char err[kErrorSize] = {0};
    std::vector<uint32_t> out(count);
    if (ctl_.api->pool_allocate(ctl_.pool, id_, count, out.data(), err, sizeof err) != PIE_OK) {
      error = std::string("count: ") + err;
      return false;
    }
    handles.insert(handles.end(), out.begin(), out.end());
    return true;
  }
  std::vector<uint32_t> pages;
  pages.reserve(count);
  if (!host_->allocate_pages(count, pages)) {
    error = "count: " + std::to_string(count) + " pages requested, " + std::to_string(host_->num_free_pages()) +
            " free in the pool of " + std::to_string(host_->num_pages());
    return false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) {
    host_->free_pages(pages);
    error = "the instance has ended";
    return false;
  }
  for (uint32_t p : pages) {
    uint32_t h = next_handle_++;
    handles_[h] = p;
    handles.push_back(h);
  }
  return true;
}

bool Instance::free(const std::vector<uint32_t>& handles, std::string& error) {
  if (ctl_.api) {
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
  std::vector<uint32_t> pages;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::unordered_set<uint32_t> seen;
    seen.reserve(handles.size());
    for (size_t i = 0; i < handles.size(); ++i) {  // check all first: all-or-nothing
      if (!handles_.count(handles[i])) {
        error = "pages[" + std::to_string(i) + "]: " + std::to_string(handles[i]) +
                " is not a page handle of this instance";
        return false;
      }
      if (!seen.insert(handles[i]).second) {
        error = "pages[" + std::to_string(i) + "]: page " + std::to_string(handles[i]) + " is listed twice";
        return false;
      }
    }
    for (uint32_t h : handles) {
      pages.push_back(handles_[h]);
      handles_.erase(h);
    }
  }
  host_->free_pages(pages);
  return true;
}

bool Instance::resolve(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages, std::string& error) {
  if (ctl_.api) {
    char err[kErrorSize] = {0};
    pages.resize(handles.size());
    if (ctl_.api->pool_resolve(ctl_.pool, id_, handles.data(), handles.size(), pages.data(), err, sizeof err) !=
        PIE_OK) {
      error = std::string("fwd.pages: ") + err;
      return false;
    }
    return true;
  }
  std::lock_guard<std::mutex> lock(mu_);
  pages.clear();
  pages.reserve(handles.size());
  for (size_t i = 0; i < handles.size(); ++i) {
    auto it = handles_.find(handles[i]);
    if (it == handles_.end()) {
      error = "fwd.pages[" + std::to_string(i) + "]: " + std::to_string(handles[i]) +
              " is not a page handle of this instance";
      return false;
    }
    pages.push_back(it->second);
  }
  return true;
}

bool Instance::fork(const std::vector<uint32_t>& handles, std::vector<uint32_t>& out, std::string& error) {
  if (!ctl_.api) {
    error = "sharing pages needs the control layer";
    return false;
  }
  char err[kErrorSize] = {0};
  out.resize(handles.size());
  if (ctl_.api->pool_fork(ctl_.pool, id_, handles.data(), handles.size(), out.data(), err, sizeof err) != PIE_OK) {
    error = std::string("pages: ") + err;
    return false;
  }
  return true;
}

bool Instance::prepare_write(const std::vector<uint32_t>& handles, std::vector<CopySpan>& copies,
                             std::string& error) {
  if (!ctl_.api || handles.empty()) return true;  // fallback: pages are never shared
  char err[kErrorSize] = {0};
  std::vector<uint32_t> src(handles.size()), dst(handles.size());
  size_t n = 0;
  if (ctl_.api->pool_prepare_write(ctl_.pool, id_, handles.data(), handles.size(), src.data(), dst.data(), &n, err,
                                   sizeof err) != PIE_OK) {
    error = err;
    return false;
  }
  for (size_t i = 0; i < n; ++i) copies.push_back({src[i], 0, dst[i], 0, host_->page_size()});
  return true;
}

PieControlQueue* Instance::queue_of(uint32_t handle, std::string& error) {
  if (handle == 0) return ctl_.queue;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(handle);
  if (it == queues_.end()) {
    error = "q: " + std::to_string(handle) + " is not a queue of this instance";
    return nullptr;
  }
  return it->second;
}

namespace {
void release_copy(void* payload) { delete static_cast<CopyCommand*>(payload); }
}  // namespace

bool Instance::submit_copies(uint32_t queue, std::vector<CopySpan> copies, std::string& error) {
  if (copies.empty()) return true;
  if (!ctl_.api) {
    error = "copying pages needs the control layer";
    return false;
  }
  PieControlQueue* q = queue_of(queue, error);
  if (!q) return false;
  auto* payload = new CopyCommand{std::move(copies)};
  char err[kErrorSize] = {0};
  // Depends on the previous command: a copy reads what earlier passes of the queue wrote.
  PieControlFuture* fut = ctl_.api->submit(q, ctl_.copy_kind, payload, release_copy, 0, 1, err, sizeof err);
  if (!fut) {
    error = err;
    return false;
  }
  ctl_.api->future_release(fut);  // nobody waits for a copy: the queue's order is what matters
  return true;
}

bool Instance::resolve_embeddings(const std::vector<uint32_t>& handles, std::vector<uint32_t>& slots,
                                  std::string& error) {
  if (!ctl_.api || !ctl_.embed_pool) {
    error = "input embeddings need the control layer with embedding slots";
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

bool Instance::set_page_mask(uint32_t handle, std::vector<uint8_t> hidden, std::string& error) {
  std::vector<uint32_t> one{handle}, page;
  std::string e;
  if (!resolve(one, page, e)) {
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

void Instance::apply_page_masks(const std::vector<uint32_t>& handles, size_t kv_len, size_t t,
                                std::vector<std::vector<uint32_t>>& mask) {
  const size_t ps = host_->page_size();
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

size_t Instance::num_pages_held() {
  std::lock_guard<std::mutex> lock(mu_);
  return handles_.size();
}

namespace {
void release_command(void* payload) { delete static_cast<std::shared_ptr<Command>*>(payload); }
}  // namespace

bool Instance::add_queue(uint32_t handle, PieControlQueue* queue) {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_ || handle == 0 || queues_.count(handle)) return false;
  queues_[handle] = queue;
  return true;
}

PieControlQueue* Instance::take_queue(uint32_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(handle);
  if (it == queues_.end()) return nullptr;
  PieControlQueue* q = it->second;
  queues_.erase(it);
  return q;
}

uint64_t Instance::submit_control(PieControlQueue* queue, std::shared_ptr<Command> cmd, std::string& error) {
  cmd->pending = std::make_shared<Pending>();
  cmd->owner = weak_from_this();
  cmd->instance_id = id_;
  auto pending = cmd->pending;
  const uint32_t num_tokens = static_cast<uint32_t>(cmd->tokens.size());
  char err[kErrorSize] = {0};
  // The payload is a heap shared_ptr<Command>; the control layer releases it once it drops the command.
  PieControlFuture* fut = ctl_.api->submit(queue, ctl_.forward_kind, new std::shared_ptr<Command>(std::move(cmd)),
                                           release_command, num_tokens, 0, err, sizeof err);
  if (!fut) {
    error = err;
    return 0;
  }
  pending->future = fut;
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t f = next_future_++;
  futures_[f] = pending;
  return f;
}

int Instance::wait_control(std::shared_ptr<Pending> pending, std::vector<Output>& outputs, std::string& error) {
  // Wait in slices so a termination or the deadline is noticed (both also cancel the control future).
  for (;;) {
    double left = seconds_left();
    if (left != -1.0 && left <= 0) return 3;
    double slice = (left == -1.0 || left > 0.05) ? 0.05 : left;
    int status = ctl_.api->future_wait(pending->future, slice);
    if (status == PIE_FUTURE_READY) {
      std::lock_guard<std::mutex> lock(mu_);
      outputs = std::move(pending->outputs);
      return 0;
    }
    if (status == PIE_FUTURE_FAILED || status == PIE_FUTURE_CANCELLED) {
      const char* e = ctl_.api->future_error(pending->future);
      error = e ? e : "the command was cancelled";
      if (status == PIE_FUTURE_CANCELLED && terminated()) {
        error = terminate_reason();
        return 4;
      }
      return 1;
    }
    if (terminated()) {
      error = terminate_reason();
      return 4;
    }
  }
}

uint64_t Instance::submit(uint32_t queue, std::shared_ptr<Command> cmd, std::string& error) {
  if (ctl_.api) {
    PieControlQueue* q = queue_of(queue, error);
    if (!q) return 0;
    return submit_control(q, std::move(cmd), error);
  }
  if (queue != 0) {
    error = "q: " + std::to_string(queue) + " is not a queue of this instance (queues need the control layer)";
    return 0;
  }
  uint64_t f;
  {
    std::lock_guard<std::mutex> lock(mu_);
    f = next_future_++;
    cmd->pending = std::make_shared<Pending>();
    cmd->owner = weak_from_this();
    cmd->instance_id = id_;
    futures_[f] = cmd->pending;
    ++in_flight_;
  }
  host_->push(std::move(cmd));
  return f;
}

int Instance::wait(uint64_t future, std::vector<Output>& outputs, std::string& error) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = futures_.find(future);
  if (it == futures_.end()) return 2;
  auto pending = it->second;
  if (ctl_.api) {
    futures_.erase(it);  // consumed whatever happens
    lock.unlock();
    int rc = wait_control(pending, outputs, error);
    ctl_.api->future_release(pending->future);
    pending->future = nullptr;
    return rc;
  }
  bool in_time = cv_.wait_until(lock, deadline_, [&] { return pending->done || terminated_; });
  if (terminated_ && !pending->done) {
    error = reason_;
    return 4;
  }
  if (!in_time) return 3;
  futures_.erase(future);
  if (pending->failed) {
    error = pending->error;
    return 1;
  }
  outputs = std::move(pending->outputs);
  return 0;
}

int Instance::ready(uint64_t future) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = futures_.find(future);
  if (it == futures_.end()) return -1;
  if (ctl_.api) return ctl_.api->future_status(it->second->future) != PIE_FUTURE_PENDING ? 1 : 0;
  return it->second->done ? 1 : 0;
}

void Instance::terminate(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (terminated_) return;
    terminated_ = true;
    reason_ = reason;
  }
  cv_.notify_all();
}

bool Instance::terminated() {
  std::lock_guard<std::mutex> lock(mu_);
  return terminated_;
}

std::string Instance::terminate_reason() {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

double Instance::seconds_left() {
  if (deadline_ == std::chrono::steady_clock::time_point::max()) return -1.0;
  return std::chrono::duration<double>(deadline_ - std::chrono::steady_clock::now()).count();
}

void Instance::release(const std::string& reason) {
  if (ctl_.api) {  // pages and queued commands are released by the control plane (end_instance)
    std::lock_guard<std::mutex> lock(mu_);
    if (released_) return;
    released_ = true;
    if (!terminated_) {
      terminated_ = true;
      reason_ = reason;
    }
    for (auto& kv : futures_)
      if (kv.second->future) ctl_.api->future_release(kv.second->future);
    futures_.clear();
    for (auto& kv : queues_) ctl_.api->queue_release(kv.second);
    queues_.clear();
    page_masks_.clear();
    cv_.notify_all();
    return;
  }
  std::vector<uint32_t> pages;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (released_) return;
    released_ = true;
    if (!terminated_) {
      terminated_ = true;
      reason_ = reason;
    }
    cv_.notify_all();
    // Queued commands are dropped; commands taken by the engine resolve within one batch: wait for
    // those before the pages go back to the pool (lock order: instance mutex, then the host queue's).
    in_flight_ -= host_->cancel_instance(id_);
    cv_.wait_for(lock, std::chrono::seconds(30), [&] { return in_flight_ == 0; });
    for (auto& kv : handles_) pages.push_back(kv.second);
    handles_.clear();
    futures_.clear();
  }
  host_->free_pages(pages);
}

}  // namespace pie_rt
