#include "forward_command.h"

#include <cmath>

namespace pie::control {

namespace {

std::string str(uint64_t x) { return std::to_string(x); }

ForwardError fail(ForwardField field, int64_t element, std::string message) {
  return ForwardError{field, element, std::move(message)};
}

std::optional<std::string> check_sampler(const Sampler& s, uint32_t vocab_size) {
  switch (s.kind) {
    case SamplerKind::kGreedy:
    case SamplerKind::kRawLogits:
      return std::nullopt;
    case SamplerKind::kSample:
      if (!(s.temperature >= 0) || !std::isfinite(s.temperature))
        return "sample: temperature " + std::to_string(s.temperature) + " must be >= 0 (0: greedy)";
      if (!(s.top_p > 0 && s.top_p <= 1)) return "sample: top-p " + std::to_string(s.top_p) + " is not in (0, 1]";
      if (!(s.min_p >= 0 && s.min_p <= 1)) return "sample: min-p " + std::to_string(s.min_p) + " is not in [0, 1]";
      return std::nullopt;
    case SamplerKind::kTopKDistribution:
      if (s.top_k == 0) return std::string("top-k-distribution: k must be >= 1");
      if (s.top_k > vocab_size) return "top-k-distribution: k exceeds the vocabulary size " + str(vocab_size);
      if (!(s.temperature > 0) || !std::isfinite(s.temperature))
        return std::string("top-k-distribution: temperature must be > 0");
      return std::nullopt;
    case SamplerKind::kLogprobs:
      for (uint32_t token : s.token_ids)
        if (token >= vocab_size)
          return "logprobs: token id " + str(token) + " is outside the vocabulary [0, " + str(vocab_size) + ")";
      return std::nullopt;
  }
  return std::string("unknown sampler kind");
}

std::optional<std::string> check_vocab_mask(const std::vector<uint32_t>& runs, uint32_t vocab_size) {
  uint64_t total = 0, allowed = 0;
  for (size_t r = 0; r < runs.size(); ++r) {
    total += runs[r];
    if (r % 2 == 0) allowed += runs[r];  // runs alternate allowed / forbidden, allowed first
  }
  if (total != vocab_size) return "runs add up to " + str(total) + ", not the vocabulary size " + str(vocab_size);
  if (allowed == 0) return std::string("no token is allowed");
  return std::nullopt;
}

}  // namespace

// Every field of ForwardCommand is reset below: one added must be added there too (this fails then).
static_assert(sizeof(void*) != 8 || sizeof(ForwardCommand) == 224, "ForwardCommand changed: update reset()");

void ForwardCommand::reset() {
  token_ids.clear();
  positions.clear();
  kv_page_ids.clear();
  kv_last_page_len = 0;
  mask.clear();
  embed_slots.clear();
  outputs.clear();
  adapter = 0;
  results.clear();
  pins.reset();
  batch_size = batch_tokens = 0;
  run_start_ns = run_end_ns = 0;
}

std::optional<ForwardError> check_forward(const ForwardCommand& c, const ForwardLimits& limits) {
  using F = ForwardField;
  const size_t t = c.token_ids.size();
  if (t == 0) return fail(F::kTokens, -1, "empty request: a pass needs at least one input token (or input embedding)");
  if (t > limits.max_tokens)
    return fail(F::kTokens, -1, str(t) + " tokens exceed max-batch-tokens " + str(limits.max_tokens) + " (split the pass)");
  for (size_t i = 0; i < t; ++i)
    if (c.token_ids[i] >= limits.vocab_size)
      return fail(F::kTokens, int64_t(i), "token id " + str(c.token_ids[i]) + " is outside the vocabulary [0, " +
                                              str(limits.vocab_size) + ")");
  if (!c.embed_slots.empty()) {
    if (c.embed_slots.size() != t) return fail(F::kEmbedSlots, -1, str(c.embed_slots.size()) + " slots for " + str(t) + " tokens");
    for (size_t i = 0; i < t; ++i)
      if (c.embed_slots[i] >= limits.num_embed_slots)
        return fail(F::kEmbedSlots, int64_t(i), "slot " + str(c.embed_slots[i]) + " is out of range [0, " +
                                                    str(limits.num_embed_slots) + ")");
  }
  if (c.positions.size() != t) return fail(F::kPositions, -1, str(c.positions.size()) + " positions for " + str(t) + " tokens");
  if (limits.max_position != 0)
    for (size_t i = 0; i < t; ++i)
      if (c.positions[i] >= limits.max_position)
        return fail(F::kPositions, int64_t(i), "position " + str(c.positions[i]) + " is past the model's " +
                                                   str(limits.max_position) + " positions");
  if (c.kv_page_ids.empty()) return fail(F::kPages, -1, "empty: the sequence must hold at least the input tokens");
  for (size_t i = 0; i < c.kv_page_ids.size(); ++i)
    if (c.kv_page_ids[i] >= limits.num_pages)
      return fail(F::kPages, int64_t(i), "page id " + str(c.kv_page_ids[i]) + " is out of range [0, " +
                                             str(limits.num_pages) + ")");
  if (c.kv_last_page_len < 1 || c.kv_last_page_len > limits.page_size)
    return fail(F::kLastPageLen, -1, str(c.kv_last_page_len) + " is not in [1, " + str(limits.page_size) + "]");
  const uint64_t kv_len = c.kv_len(limits.page_size);
  if (kv_len < t)
    return fail(F::kPages, -1, "the sequence holds " + str(kv_len) + " tokens, fewer than the " + str(t) + " input tokens");
  if (!c.mask.empty()) {
    if (c.mask.size() != t)
      return fail(F::kMask, -1, str(c.mask.size()) + " rows for " + str(t) +
                                    " tokens (one BRLE row per input token, or none for causal)");
    for (size_t i = 0; i < t; ++i) {
      uint64_t sum = 0;
      for (uint32_t run : c.mask[i]) sum += run;
      if (sum != kv_len)
        return fail(F::kMask, int64_t(i), "runs add up to " + str(sum) + ", not the sequence length " + str(kv_len));
    }
  }
  if (c.adapter >= limits.num_adapters)
    return fail(F::kAdapter, -1, str(c.adapter) + " is not a loaded adapter (0 = none, 1.." +
                                     str(limits.num_adapters - 1) + ")");
  for (size_t j = 0; j < c.outputs.size(); ++j) {
    const ForwardOutput& o = c.outputs[j];
    if (o.index >= t) return fail(F::kOutputIndex, int64_t(j), str(o.index) + " is not in [0, " + str(t) + ")");
    if (auto problem = check_sampler(o.sampler, limits.vocab_size)) return fail(F::kSampler, int64_t(j), *problem);
    if (!o.vocab_mask.empty())
      if (auto problem = check_vocab_mask(o.vocab_mask, limits.vocab_size))
        return fail(F::kVocabMask, int64_t(j), *problem);
  }
  return std::nullopt;
}

std::string describe(const ForwardError& error, FieldNaming naming) {
  static const char* const kWit[] = {"fwd.tokens", "fwd.input-embeddings", "fwd.positions",
                                     "fwd.pages",  "fwd.last-page-len",    "fwd.mask",
                                     "fwd.output-indices", "fwd.samplers", "fwd.output-masks", "adapter"};
  static const char* const kPython[] = {"token_ids", "embed_slots", "positions", "kv_page_ids", "kv_last_page_len",
                                        "mask", "index", "sampler", "vocab_mask", "adapter"};
  const size_t field = static_cast<size_t>(error.field);
  const std::string element = error.element >= 0 ? "[" + std::to_string(error.element) + "]" : "";
  if (naming == FieldNaming::kWit) return std::string(kWit[field]) + element + ": " + error.message;
  switch (error.field) {  // an output's parts are named under outputs[j]
    case ForwardField::kOutputIndex:
    case ForwardField::kSampler:
    case ForwardField::kVocabMask:
      return "outputs" + element + "." + kPython[field] + ": " + error.message;
    default:
      return std::string(kPython[field]) + element + ": " + error.message;
  }
}

}  // namespace pie::control
