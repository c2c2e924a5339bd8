// The one form of a forward pass in the control layer, from the hot call that builds it to the engine
// that runs it and writes its results into it.
//
// A ForwardCommand is built once: by the runtime's forward.submit (from the WIT record, page handles
// resolved to physical pages) or by a Python client of the control plane (pie.control.ForwardCommand).
// It is checked once, by check_forward(), before it is submitted; the engine trusts what it receives.
// The batch loop hands FORWARD batches to pie/control/handlers.py, which runs them on the model runner
// and writes each output into `results`; then the command's future completes and its submitter reads
// the results from the same object (it holds a shared_ptr).
//
// KV sequence of a pass: the pages `kv_page_ids` in order, all full but the last, which holds
// `kv_last_page_len` tokens (kv_len() tokens in all). The pass writes the K/V of its T input tokens to
// the last T slots of the sequence; input token i sees sequence indices j <= kv_len - T + i (causal),
// or what its `mask` row allows (BRLE runs over kv_len entries, "may attend" first).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace pie::control {

// The command kinds the engine runs. The scheduler batches only commands of one kind together.
enum class CommandKind : int32_t {
  kForward = 0,    // payload: ForwardCommand
  kCopyPages = 1,  // payload: PageCopyCommand (copy-on-write before a pass, kv.copy-tokens)
};

// What an output asks of its logits row. Shared by C++ (the hot calls) and Python (pie.control.SamplerKind).
enum class SamplerKind : uint8_t {
  kGreedy = 0,            // the argmax token
  kSample = 1,            // a draw from softmax(logits / temperature), top-k / top-p / min-p filtered
  kTopKDistribution = 2,  // the k most likely tokens and their probabilities (k = top_k)
  kLogprobs = 3,          // log-probabilities of token_ids
  kRawLogits = 4,         // the whole (vocab,) logits row
};

struct Sampler {
  SamplerKind kind = SamplerKind::kGreedy;
  float temperature = 1.0f;  // kSample (0: greedy), kTopKDistribution (> 0)
  uint32_t top_k = 0;        // kSample (0: no filter); k of kTopKDistribution
  float top_p = 1.0f;        // kSample
  float min_p = 0.0f;        // kSample
  std::optional<uint64_t> seed;     // kSample: the draw is a function of (seed, logits row) alone
  std::vector<uint32_t> token_ids;  // kLogprobs
};

struct ForwardOutput {
  uint32_t index = 0;  // input row in [0, T)
  Sampler sampler;
  // BRLE runs over the vocabulary, "allowed" first, adding up to the vocabulary size; empty: unmasked.
  std::vector<uint32_t> vocab_mask;
};

// What the engine wrote for one output: greedy / sample -> ids = [token]; top-k distribution -> ids and
// probabilities; logprobs -> ids = the asked tokens, values their logprobs; raw logits -> values.
struct OutputValue {
  std::vector<uint32_t> ids;
  std::vector<float> values;
};

struct ForwardCommand {
  std::vector<uint32_t> token_ids;   // (T,) input tokens (placeholders when embed_slots is given)
  std::vector<uint32_t> positions;   // (T,) RoPE positions
  std::vector<uint32_t> kv_page_ids; // (P,) physical pages of the KV sequence, P >= 1
  uint32_t kv_last_page_len = 0;     // tokens in the last page, in [1, page_size]
  std::vector<std::vector<uint32_t>> mask;  // T BRLE rows over kv_len entries, or empty: causal
  std::vector<uint32_t> embed_slots;  // (T,) physical input-embedding slots read instead of tokens, or empty
  std::vector<ForwardOutput> outputs;
  uint32_t adapter = 0;               // the model runner's LoRA adapter (pie.engine.lora), 0 = none
  std::vector<OutputValue> results;   // written by the engine, one per output, before the future completes
  // The pages it reads and writes, pinned in the KV pool until the pass has run (write_outputs releases
  // them) or the command is dropped unrun: an instance that frees them meanwhile cannot have them handed
  // to another. Empty: not pinned (a Python client holds its pages until its passes are done).
  std::shared_ptr<void> pins;
  // The batch it ran in, stamped by the engine's handler (pack_forward / write_batch_outputs) for traces:
  // how many commands and input tokens the forward pass had, and when it ran (steady clock, ns).
  uint32_t batch_size = 0;
  uint32_t batch_tokens = 0;
  int64_t run_start_ns = 0;
  int64_t run_end_ns = 0;

  uint32_t num_tokens() const { return static_cast<uint32_t>(token_ids.size()); }
  // Empties it for another pass (every field as a new command's), keeping its vectors' capacity.
  void reset();
  // Tokens in the KV sequence: full pages plus the last page's tokens (the one expression of it).
  uint64_t kv_len(uint32_t page_size) const {
    return kv_page_ids.empty() ? 0 : (kv_page_ids.size() - 1) * uint64_t(page_size) + kv_last_page_len;
  }
};

// Copies `count` token slots of every layer's K/V: src_page[src_offset:] -> dst_page[dst_offset:].
// Physical page ids; offset + count <= page size on both sides.
struct CopySpan {
  uint32_t src_page = 0, src_offset = 0, dst_page = 0, dst_offset = 0, count = 0;
};

// A COPY_PAGES command: its spans run in order (a later span may read what an earlier one wrote).
struct PageCopyCommand {
  std::vector<CopySpan> spans;
  std::vector<std::shared_ptr<void>> pins;  // its source and destination pages, pinned until it has run
};

// What a command is checked against: the model and the engine it runs on.
struct ForwardLimits {
  uint32_t vocab_size = 0;
  uint32_t page_size = 0;
  uint32_t num_pages = 0;
  uint32_t max_tokens = 0;       // input tokens of one pass (the engine's batch token budget)
  uint32_t num_embed_slots = 0;
  uint32_t max_position = 0;     // positions are < this (0: unbounded); the model runner's max_position
  uint32_t num_adapters = 1;     // adapters are < this: the runner's adapter table, 0 = none
};

// The field a check failed on. Each front end names it in its own words (forward_field_name).
enum class ForwardField : uint8_t {
  kTokens, kEmbedSlots, kPositions, kPages, kLastPageLen, kMask, kOutputIndex, kSampler, kVocabMask, kAdapter
};
enum class FieldNaming : uint8_t { kWit, kPython };

struct ForwardError {
  ForwardField field;
  int64_t element = -1;  // index into the field's list, or -1
  std::string message;   // what is wrong, without the field's name
};

// Checks everything the engine relies on; nullopt when the command may run.
std::optional<ForwardError> check_forward(const ForwardCommand& command, const ForwardLimits& limits);

// "<field>[<element>]: <message>", the field named for the front end ("fwd.tokens[1]: ..." for the WIT,
// "token_ids[1]: ..." for Python).
std::string describe(const ForwardError& error, FieldNaming naming);

}  // namespace pie::control
