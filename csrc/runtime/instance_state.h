// The runtime's C++ state of one running instance, behind the hot host calls: its control-layer queues,
// its page and embedding-slot handles (held in the control layer's pools), its forward passes in flight
// and its page masks. Nothing here takes the GIL.
//
// Pages come from the control layer's ref-counted KV pool and commands go to the instance's control
// queues, through the C ABI in csrc/control/control_api.h. A pass is one pie::control::ForwardCommand,
// built and checked by forward.submit; the engine writes its results into it before its future
// resolves, and forward.wait reads them from there.
//
// Invariants
// - An instance sees only its own handles (the pool maps them to physical pages per instance).
// - Every submitted pass is waited for at most once; a future handle is consumed by `wait`.
// - Pages and queued commands are released by the control plane when the instance ends (end_instance).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "control_api.h"      // csrc/control: the control layer's C ABI (capsule pie._ext._control._C_API)
#include "forward_command.h"  // csrc/control: ForwardCommand, CopySpan, ForwardLimits

namespace pie_rt {

using pie::control::CopySpan;
using pie::control::ForwardCommand;
using pie::control::ForwardLimits;

// The control layer behind an instance: its default command queue and the pools its handles live in.
struct ControlLink {
  const PieControlApi* api = nullptr;
  PieControlQueue* queue = nullptr;
  PieControlPool* pool = nullptr;        // KV pages
  PieControlPool* embed_pool = nullptr;  // input-embedding slots (page size 1); nullptr: no embeddings
};

// Results of InstanceState::wait.
enum class WaitStatus { kDone, kFailed, kUnknownFuture, kDeadline, kTerminated };

class InstanceState {
 public:
  InstanceState(uint64_t id, double deadline_s, ControlLink control, ForwardLimits limits);
  ~InstanceState();

  uint64_t id() const { return id_; }
  const ForwardLimits& limits() const { return limits_; }

  // Page handles. Errors return false and set `error` (one line naming the argument).
  bool allocate(uint32_t count, std::vector<uint32_t>& handles, std::string& error);
  bool free(const std::vector<uint32_t>& handles, std::string& error);
  bool resolve(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages, std::string& error);
  // resolve, with the pages pinned in the pool until `pins` (and every copy of it) is dropped.
  bool resolve_pinned(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages, std::shared_ptr<void>& pins,
                      std::string& error);
  // New handles to the same pages (shared until written: copy-on-write).
  bool fork(const std::vector<uint32_t>& handles, std::vector<uint32_t>& out, std::string& error);
  // Gives each handle whose page is shared its own copy; appends the whole-page copies to run first and
  // their pages' pins to `pins`.
  bool prepare_write(const std::vector<uint32_t>& handles, std::vector<CopySpan>& copies,
                     std::vector<std::shared_ptr<void>>& pins, std::string& error);
  // Queues the copies on `queue` (0 = default), ordered before whatever is submitted after; the command
  // keeps the pins of its pages.
  bool submit_copies(uint32_t queue, const std::vector<CopySpan>& copies, const std::vector<std::shared_ptr<void>>& pins,
                     std::string& error);
  // Embedding slot handles -> physical slots.
  bool resolve_embeddings(const std::vector<uint32_t>& handles, std::vector<uint32_t>& slots, std::string& error);
  // Page masks (kv.mask-page): hidden[o] hides slot o of the page from later passes of this instance.
  // An all-visible mask removes the entry. Masks of freed handles are dropped.
  bool set_page_mask(uint32_t handle, std::vector<uint8_t> hidden, std::string& error);
  // If any handle of the pass has a page mask: rewrites `mask` (T rows, or empty = causal) as explicit
  // BRLE rows over the kv_len sequence with the masked slots hidden.
  void apply_page_masks(const std::vector<uint32_t>& handles, size_t kv_len, size_t t,
                        std::vector<std::vector<uint32_t>>& mask);
  bool has_page_masks();

  // Submits a checked pass on `queue` (0 = the default queue, others from add_queue). A future handle,
  // or 0 with `error` set (unknown queue, or the control layer refused the command).
  uint64_t submit(uint32_t queue, std::shared_ptr<ForwardCommand> command, std::string& error);
  // Extra control queues (queues.create): the instance owns them (released by take_queue's caller or at
  // release). add_queue returns false if the handle is taken or the instance has ended.
  bool add_queue(uint32_t handle, PieControlQueue* queue);
  PieControlQueue* take_queue(uint32_t handle);
  // Waits for the pass; kDone hands back the command, its results written. kFailed sets `error`.
  WaitStatus wait(uint64_t future, std::shared_ptr<ForwardCommand>& command, std::string& error);
  int ready(uint64_t future);  // 1 ready, 0 not yet, -1 unknown handle

  // Ends the instance: makes waits return, drops its futures and queues. Its pages and queued commands
  // are released by the control plane (end_instance).
  void release(const std::string& reason);
  void terminate(const std::string& reason);  // from another thread: makes waits return kTerminated
  bool terminated();
  std::string terminate_reason();
  double seconds_left();  // -1: no deadline

  void* py_owner = nullptr;  // borrowed PyObject* of the Python-side instance (cold calls)

  // Tracing (pie run --trace): while enabled, the instance's thread records each hot call (and, for a
  // forward.wait, the pass it waited for). At most max_events (enable_trace); later ones are counted, not kept.
  struct TraceEvent {
    uint32_t call;        // index of the hot function (pie_rt::hot_function_calls)
    int64_t start_ns;     // steady clock
    int64_t end_ns;
    uint32_t num_tokens;  // forward.wait: the pass's input tokens, its batch's commands and tokens, when it ran
    uint32_t batch_size;  // 0: not a forward.wait
    uint32_t batch_tokens;
    int64_t run_start_ns;
    int64_t run_end_ns;
  };
  void enable_trace(size_t max_events) {
    trace_max_events_ = max_events;
    tracing_ = true;
  }
  bool tracing() const { return tracing_; }
  void trace_call(uint32_t call, int64_t start_ns, int64_t end_ns);
  void trace_pass(const ForwardCommand& command);  // amends the forward.wait being recorded
  const std::vector<TraceEvent>& trace_events() const { return trace_; }
  uint64_t trace_dropped() const { return trace_dropped_; }

 private:
  struct PendingPass {  // behind one future handle
    PieControlFuture* future = nullptr;  // owned
    std::shared_ptr<ForwardCommand> command;
  };

  PieControlQueue* queue_of(uint32_t handle, std::string& error);  // nullptr + error

  const uint64_t id_;
  const ControlLink ctl_;
  const ForwardLimits limits_;
  std::chrono::steady_clock::time_point deadline_;
  std::mutex mu_;
  std::unordered_map<uint64_t, PendingPass> futures_;
  std::unordered_map<uint32_t, PieControlQueue*> queues_;  // handle -> extra queue (not 0)
  std::unordered_map<uint32_t, std::vector<uint8_t>> page_masks_;  // handle -> (page_size,) hidden flags
  uint64_t next_future_ = 1;
  bool terminated_ = false;
  bool released_ = false;
  std::string reason_;
  // only the instance's thread touches these while it runs
  bool tracing_ = false;
  std::vector<TraceEvent> trace_;
  uint64_t trace_dropped_ = 0;
  size_t trace_max_events_ = 0;
  TraceEvent pending_pass_{};  // set by trace_pass, taken by the next trace_call
};

// The instance whose guest runs on this thread (set by the instance thread before calling the guest).
InstanceState* current_instance();
void set_current_instance(InstanceState* inst);

}  // namespace pie_rt
