// A generation stream: a decode loop the control layer runs itself, one forward pass after another,
// with no round trip to its submitter per token.
//
// An inferlet (through the runtime's `generation` interface) or a Python client (`pie generate`) starts
// a stream on a context: the tokens not yet run, the page handles holding the sequence, a sampler, stop
// conditions, optionally a grammar and per-token top-k distributions. The stream then:
//   1. submits a pass of the pending tokens (long ones in chunks of the engine's token budget), with an
//      output at the last one;
//   2. when the pass completes (a continuation of its future, on the batch loop's thread, before the
//      batch finishes, so the next pass is pending when the scheduler plans the next batch), takes the
//      token, checks the stop conditions, asks the grammar for the next mask, allocates the next page
//      from the instance's own handles (and quota) when the last is full, and submits the next pass of
//      that one token;
//   3. makes every token readable once its stop checks are done, with the end it caused if any (`next`
//      blocks until there is one, `poll` does not), and ends with a reason: EOS, a stop token sequence, a stop string, max tokens, the grammar complete, cancelled, or
//      failed (quota, termination, the instance ending, a pass that failed; `message` says which).
// Afterwards the context holds what it would hold had its owner made each pass itself (the same
// sequence as Context.generate of the SDK and the built-in loop): generated tokens but an EOS are part
// of the sequence, every one but the last has its K/V in the cache (`num_cached`), and the pages the
// stream allocated (`new_handles`) belong to the instance.
//
// Order of the checks after each token (the SDK's and the built-in loop's order): EOS (not appended),
// then the token is appended; the grammar accepts it (a refusal fails the stream) and may be complete;
// stop strings; stop token sequences; max tokens.
//
// Threads: `start` on the submitter's thread; steps on the batch loop's thread (one pass in flight at a
// time, so steps never overlap); readers on any thread. The step state is touched only by the thread
// running the step; `mutex_` guards what readers see. No lock is held while calling the pool, the
// queue or a hook.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "forward_command.h"
#include "page_pool.h"
#include "scheduler.h"

namespace pie::control {

// Each token's text as bytes, indexed by token id (special tokens: empty): the text of a generation is
// the concatenation of its tokens' bytes (pie/engine/vocabulary.py builds it from the tokenizer).
struct TokenBytes {
  std::vector<std::string> bytes;
};

enum class StreamEnd : uint8_t {
  kRunning = 0,
  kEos = 1,          // an EOS token was drawn (not part of the sequence)
  kStopTokens = 2,   // the generation ends with a stop token sequence
  kStopString = 3,   // the generated text contains a stop string
  kLength = 4,       // max_tokens generated
  kGrammar = 5,      // the grammar is complete
  kCancelled = 6,    // cancel() was called
  kFailed = 7,       // see message
};

const char* stream_end_name(StreamEnd end);

// What a grammar says after accepting a token.
struct GrammarStep {
  bool accepted = true;     // false: the grammar forbids the token (the stream fails)
  bool terminated = false;  // the grammar is complete: the stream ends
  std::vector<uint32_t> next_mask;  // BRLE over the vocabulary (allowed first) of the next token
};

constexpr uint32_t kMaxStops = 64;          // stop strings, and stop token sequences, of one stream
constexpr uint32_t kMaxStopLength = 1024;    // bytes of a stop string, tokens of a stop token sequence
constexpr uint32_t kMaxTopLogprobs = 64;     // top_logprobs of one stream

struct StreamSpec {
  uint64_t instance_id = 0;
  std::vector<uint32_t> pending;   // (N >= 1,) the context's tokens not yet run, run first
  uint32_t num_cached = 0;         // tokens before them, whose K/V are in the first pages
  std::vector<uint32_t> handles;   // the context's page handles, in order (the stream appends to them)
  Sampler sampler;                 // kGreedy or kSample; a seeded sample derives one seed per step
  std::vector<uint32_t> eos_ids;   // tokens that end the stream (empty: none)
  std::vector<std::vector<uint32_t>> stop_tokens;  // token sequences that end it (included)
  std::vector<std::string> stop_strings;           // UTF-8; need token_bytes ("" stops after the first token)
  uint32_t max_tokens = 1;         // >= 1
  uint32_t top_logprobs = 0;       // > 0: each token comes with the k most likely tokens (temperature 1)
  std::vector<uint32_t> first_mask;  // vocabulary mask of the first token (a grammar's), empty: none
  uint32_t adapter = 0;            // every pass's LoRA adapter (ForwardCommand::adapter), 0 = none
};

// What the front end lends the stream (every member optional).
struct StreamHooks {
  // Instances the pool terminated to satisfy the stream's allocations (called with no control lock held).
  std::function<void(const std::vector<Termination>&)> report_terminations;
  // Folds the instance's page masks (kv.mask-page) into a pass's mask rows (T rows, or empty = causal).
  std::function<void(const std::vector<uint32_t>& handles, size_t kv_len, size_t num_tokens,
                     std::vector<std::vector<uint32_t>>& mask)>
      fold_page_masks;
  // Advances the grammar by a token (required when the spec has a first_mask from a grammar).
  std::function<GrammarStep(uint32_t token)> grammar;
};

// What a reader gets: the tokens since its last read and, once the stream has ended, how it ended.
struct StreamChunk {
  std::vector<uint32_t> tokens;
  std::vector<OutputValue> top;  // one per token when top_logprobs > 0: (ids, probabilities)
  StreamEnd end = StreamEnd::kRunning;
  std::string message;               // kFailed: why
  std::vector<uint32_t> new_handles;  // once ended: the pages the stream allocated, in order
  uint32_t num_cached = 0;            // once ended: tokens of the sequence with K/V in the cache
};

// The stream's per-step seed: the same derivation as the SDK and the built-in loop (u64 arithmetic,
// then the 63 bits the engine's generators take).
uint64_t step_seed(uint64_t seed, uint64_t step);

class GenerationStream : public std::enable_shared_from_this<GenerationStream>, public FutureListener {
 public:
  // Checks the spec (std::invalid_argument naming the field) and submits the first pass. Errors of
  // the first pass (quota, a check of the pending tokens) throw; later ones end the stream.
  static std::shared_ptr<GenerationStream> start(StreamSpec spec, std::shared_ptr<CommandQueue> queue,
                                                 std::shared_ptr<PagePool> pool, ForwardLimits limits,
                                                 std::shared_ptr<const TokenBytes> token_bytes, StreamHooks hooks);
  ~GenerationStream();

  // Blocks until a token is ready or the stream has ended, or the timeout passes (negative: none);
  // returns what is new (an empty chunk of a running stream on timeout).
  StreamChunk next(double timeout_seconds = -1);
  StreamChunk poll();
  // Ends the stream after the pass in flight (its token is the last); a no-op once it has ended.
  void cancel();
  // Blocks until the stream has ended (or the timeout passes); true if it has.
  bool wait(double timeout_seconds = -1);
  bool ended();
  // Every token generated so far (a reader's chunks take them in turn; this does not).
  std::vector<uint32_t> generated();
  uint64_t instance_id() const { return spec_.instance_id; }

  // The pass in flight has completed (its future's continuation, on the thread that resolved it).
  void on_future_resolved(FutureState& future) override;

 private:
  GenerationStream(StreamSpec spec, std::shared_ptr<CommandQueue> queue, std::shared_ptr<PagePool> pool,
                   ForwardLimits limits, std::shared_ptr<const TokenBytes> token_bytes, StreamHooks hooks);

  // Step side (one thread at a time).
  void submit_next();                      // throws on failure
  // The command of the next pass: the one of two passes ago when nothing else holds it any more (its
  // vectors keep their capacity, so a step allocates none of them again), else a new one.
  std::shared_ptr<ForwardCommand> next_command();
  StreamEnd accept_token(uint32_t token, std::string& message);  // appends it and runs the stop checks
  // Makes the token readable, with the end it caused (kRunning: none), in one step; wakes the readers.
  void publish(uint32_t token, const OutputValue* top, StreamEnd end, std::string message);
  void end_locked(StreamEnd end, std::string message);  // under mutex_
  bool stop_string_found();
  bool stop_tokens_found() const;
  std::vector<uint32_t> allocate(uint32_t count);
  // Makes pages_ cover handles_[:count], current and pinned, and points the pass at them (its pages and
  // the stream's pins). Returns whether any of pages_[written_from:count] is shared (copy-on-write).
  bool point_at_pages(ForwardCommand& command, size_t count, size_t written_from);
  // The stream has ended: it lets go of its passes and pins (a pass still in a batch keeps its own).
  void release_pages();
  void finish(StreamEnd end, std::string message);

  const StreamSpec spec_;
  const std::shared_ptr<CommandQueue> queue_;
  const std::shared_ptr<PagePool> pool_;
  const ForwardLimits limits_;
  const std::shared_ptr<const TokenBytes> token_bytes_;
  const StreamHooks hooks_;
  const size_t stop_overlap_;  // bytes a stop string may reach back into text already scanned

  // Step state.
  std::vector<uint32_t> handles_;       // context handles, then the stream's
  std::vector<uint32_t> inputs_;        // tokens of the next pass not yet run: (total_ - cached_,)
  uint64_t cached_ = 0;                 // tokens of the sequence with K/V in the cache
  uint64_t total_ = 0;                  // tokens of the sequence (cached + inputs)
  uint32_t num_generated_ = 0;
  std::vector<uint32_t> tail_;          // every generated token (for stop token sequences)
  std::vector<uint32_t> mask_;          // the grammar's mask of the next token
  std::string text_;                    // bytes of the generated text
  size_t scanned_ = 0;                  // text_[:scanned_] has been searched for stop strings
  // The pass in flight (its future's continuation reads it), and the one before (reused by the next
  // pass once its batch has let it go). Kept until a later step (never dropped under a lock).
  std::shared_ptr<ForwardCommand> in_flight_;
  std::shared_ptr<ForwardCommand> spare_;
  // The physical pages of handles_[:pages_.size()] as of the instance's mapping epoch pages_epoch_
  // (PagePool::resolve_more: a step resolves only its new pages while no handle moved), pinned by
  // page_pins_ (shared by every pass of the stream in flight; dropped when the stream ends).
  struct PinGroups {
    std::vector<PagePins> groups;
  };
  std::vector<uint32_t> pages_;
  uint64_t pages_epoch_ = 0;
  std::shared_ptr<PinGroups> page_pins_;
  std::atomic<bool> cancel_requested_{false};

  // Reader side.
  std::mutex mutex_;
  std::condition_variable changed_;   // a token is ready or the stream ended: readers in next()
  std::condition_variable ended_cv_;  // the stream ended: readers in wait() (never woken per token)
  uint32_t num_token_waiters_ = 0;    // (guarded) readers blocked in next()
  std::vector<uint32_t> generated_;     // every token (guarded)
  size_t num_read_ = 0;                 // generated_[:num_read_] were handed to readers
  std::vector<OutputValue> top_;        // (guarded) one per unread token when top_logprobs > 0
  StreamEnd end_ = StreamEnd::kRunning;
  std::string message_;
  std::vector<uint32_t> new_handles_;
  uint32_t end_cached_ = 0;
};

}  // namespace pie::control
