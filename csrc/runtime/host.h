// The runtime's C++ core: per-instance state behind the hot host calls (page handles, forward
// commands, futures). Nothing here takes the GIL.
//
// Two backends, chosen per instance:
// - control (default): pages come from the control layer's ref-counted KV pool and commands go to the
//   instance's control queue, through the C ABI in csrc/control/control_api.h; the engine loop runs them
//   and the Python FORWARD handler writes each command's outputs (Host::set_outputs) before its control
//   future resolves.
// - fallback: Host's own free list and command queue, drained by pie.runtime.service.EngineService
//   (`take`, GIL released by the caller) and resolved with `complete` / `fail`.
//
// Invariants
// - An instance sees only its own handles (handle -> physical page), never another instance's pages.
// - Every submitted command is resolved at most once; a future handle is consumed by `wait`.
// - Fallback: an instance ends only after its commands in flight on the engine have been resolved, so a
//   page is never reused while a forward pass may still write it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "control_api.h"  // csrc/control: the control layer's C ABI (capsule pie._ext._control._C_API)

namespace pie_rt {

// The control layer behind an instance: its command queue and the KV page pool (handles are the pool's
// per-instance handles). `api == nullptr`: the runtime's own fallback (Host's free list and queue).
struct ControlLink {
  const PieControlApi* api = nullptr;
  PieControlQueue* queue = nullptr;
  PieControlPool* pool = nullptr;
  PieControlPool* embed_pool = nullptr;  // embedding slots (page size 1); nullptr: no embeddings
  int32_t forward_kind = 0;
  int32_t copy_kind = 2;  // pie.control.CommandKind.COPY_PAGES: payload a CopyCommand
};

// Copies `count` token slots of every layer's K/V: src_page[src_offset:] -> dst_page[dst_offset:].
// Physical page ids; offset + count <= page size on both sides.
struct CopySpan {
  uint32_t src_page = 0, src_offset = 0, dst_page = 0, dst_offset = 0, count = 0;
};

// Payload of a COPY_PAGES command (copy-on-write before a pass, kv.copy-tokens): spans run in order.
struct CopyCommand {
  std::vector<CopySpan> spans;
};

enum SamplerKind : uint8_t { S_GREEDY = 0, S_SAMPLE = 1, S_TOPK = 2, S_LOGPROBS = 3, S_RAW = 4 };

struct OutputSpec {
  uint32_t index = 0;  // input index in [0, T)
  uint8_t kind = S_GREEDY;
  float temperature = 1.0f;  // S_SAMPLE, S_TOPK
  uint32_t top_k = 0;        // S_SAMPLE; k of S_TOPK
  float top_p = 1.0f;
  float min_p = 0.0f;
  bool has_seed = false;
  uint64_t seed = 0;
  std::vector<uint32_t> token_ids;  // S_LOGPROBS
  bool has_mask = false;
  std::vector<uint32_t> allowed;  // has_mask: BRLE over the vocabulary, runs allowed / forbidden
};

struct Output {
  std::vector<uint32_t> ids;
  std::vector<float> values;
};

struct Pending {  // the state behind one future handle; guarded by its instance's mutex
  PieControlFuture* future = nullptr;  // control backend: the control layer's future (owned)
  bool done = false;
  bool failed = false;
  std::string error;
  std::vector<Output> outputs;
};

class Instance;

struct Command {
  uint64_t id = 0;
  uint64_t instance_id = 0;
  std::vector<uint32_t> tokens;     // (T,)
  std::vector<uint32_t> positions;  // (T,)
  std::vector<uint32_t> pages;      // (P,) physical page ids
  uint32_t last_page_len = 0;
  std::vector<std::vector<uint32_t>> mask;  // T BRLE rows, or empty = causal
  std::vector<uint32_t> embed_slots;  // (T,) physical embedding slots instead of tokens, or empty
  std::vector<OutputSpec> outputs;
  std::shared_ptr<Pending> pending;
  std::weak_ptr<Instance> owner;
};

class Host {
 public:
  Host(uint32_t num_pages, uint32_t page_size, uint32_t vocab_size, uint32_t max_batch_tokens);

  uint32_t num_pages() const { return num_pages_; }
  uint32_t page_size() const { return page_size_; }
  uint32_t vocab_size() const { return vocab_size_; }
  uint32_t max_batch_tokens() const { return max_batch_tokens_; }
  uint32_t num_free_pages();

  // Physical pages: all-or-nothing.
  bool allocate_pages(uint32_t count, std::vector<uint32_t>& out);
  void free_pages(const std::vector<uint32_t>& pages);

  void push(std::shared_ptr<Command> cmd);
  // Up to max_requests commands whose tokens fit max_tokens (at least one); waits up to timeout_s.
  std::vector<std::shared_ptr<Command>> take(size_t max_requests, size_t max_tokens, double timeout_s);
  void complete(const std::shared_ptr<Command>& cmd, std::vector<Output>&& outputs);
  // Control backend: the outputs of a command run by the control layer's engine loop (its future
  // resolves when the handler returns).
  static void set_outputs(const std::shared_ptr<Command>& cmd, std::vector<Output>&& outputs);
  void fail(const std::shared_ptr<Command>& cmd, const std::string& message);
  size_t cancel_instance(uint64_t instance_id);  // drops its queued commands; returns how many
  void stop();  // wakes `take` for good
  uint64_t num_pending();

 private:
  uint32_t num_pages_, page_size_, vocab_size_, max_batch_tokens_;
  std::mutex pages_mu_;
  std::vector<uint32_t> free_list_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<std::shared_ptr<Command>> queue_;
  bool stopped_ = false;
  uint64_t next_command_ = 1;
};

class Instance : public std::enable_shared_from_this<Instance> {
 public:
  Instance(std::shared_ptr<Host> host, uint64_t id, double deadline_s, ControlLink control = ControlLink());
  ~Instance();

  Host& host() { return *host_; }
  uint64_t id() const { return id_; }

  // Page handles. Errors return false and set `error` (one line naming the argument).
  bool allocate(uint32_t count, std::vector<uint32_t>& handles, std::string& error);
  bool free(const std::vector<uint32_t>& handles, std::string& error);
  bool resolve(const std::vector<uint32_t>& handles, std::vector<uint32_t>& pages, std::string& error);
  size_t num_pages_held();
  // Control backend only. New handles to the same pages (shared until written: copy-on-write).
  bool fork(const std::vector<uint32_t>& handles, std::vector<uint32_t>& out, std::string& error);
  // Gives each handle whose page is shared its own copy; appends the whole-page copies to run first.
  bool prepare_write(const std::vector<uint32_t>& handles, std::vector<CopySpan>& copies, std::string& error);
  // Queues the copies on `queue` (0 = default), ordered before whatever is submitted after.
  bool submit_copies(uint32_t queue, std::vector<CopySpan> copies, std::string& error);
  // Embedding slot handles -> physical slots (control backend with an embedding pool).
  bool resolve_embeddings(const std::vector<uint32_t>& handles, std::vector<uint32_t>& slots, std::string& error);
  // Page masks (kv.mask-page): hidden[o] hides slot o of the page from later passes of this instance.
  // An all-visible mask removes the entry. Masks of freed handles are dropped.
  bool set_page_mask(uint32_t handle, std::vector<uint8_t> hidden, std::string& error);
  // If any handle of the pass has a page mask: rewrites `mask` (T rows, or empty = causal) as explicit
  // BRLE rows over the kv_len sequence with the masked slots hidden.
  void apply_page_masks(const std::vector<uint32_t>& handles, size_t kv_len, size_t t,
                        std::vector<std::vector<uint32_t>>& mask);

  // A future handle, or 0 with `error` set (the control layer refused the command).
  // `queue` 0 = the instance's default queue; others come from add_queue (control backend only).
  uint64_t submit(uint32_t queue, std::shared_ptr<Command> cmd, std::string& error);
  bool uses_control() const { return ctl_.api != nullptr; }
  // Extra control queues (queues.create): the instance owns them (released by take_queue's caller or at
  // release). add_queue returns false if the handle is taken or the instance has ended.
  bool add_queue(uint32_t handle, PieControlQueue* queue);
  PieControlQueue* take_queue(uint32_t handle);
  // 0 = done (outputs moved out), 1 = failed (error set), 2 = unknown handle, 3 = deadline, 4 = terminated
  int wait(uint64_t future, std::vector<Output>& outputs, std::string& error);
  int ready(uint64_t future);  // 1 ready, 0 not yet, -1 unknown handle

  // Ends the instance: wakes waiters, drops queued commands, waits for commands in flight, frees pages.
  void release(const std::string& reason);
  void terminate(const std::string& reason);  // from another thread: makes waits return 4
  bool terminated();
  std::string terminate_reason();
  double seconds_left();

  void* py_owner = nullptr;  // borrowed PyObject* of the Python-side instance (cold calls)

  friend class Host;

 private:
  uint64_t submit_control(PieControlQueue* queue, std::shared_ptr<Command> cmd, std::string& error);
  PieControlQueue* queue_of(uint32_t handle, std::string& error);  // control backend; nullptr + error
  int wait_control(std::shared_ptr<Pending> pending, std::vector<Output>& outputs, std::string& error);

  std::shared_ptr<Host> host_;
  ControlLink ctl_;
  uint64_t id_;
  std::chrono::steady_clock::time_point deadline_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint32_t, uint32_t> handles_;  // handle -> physical page
  uint32_t next_handle_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> futures_;
  std::unordered_map<uint32_t, PieControlQueue*> queues_;  // handle -> extra queue (not 0)
  std::unordered_map<uint32_t, std::vector<uint8_t>> page_masks_;  // handle -> (page_size,) hidden flags
  uint64_t next_future_ = 1;
  size_t in_flight_ = 0;  // commands submitted and not yet resolved
  bool terminated_ = false;
  bool released_ = false;
  std::string reason_;
};

// The instance whose guest runs on this thread (set by the instance thread before calling the guest).
Instance* current_instance();
void set_current_instance(Instance* inst);

}  // namespace pie_rt
