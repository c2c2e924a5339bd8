#include "generation_stream.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "command_payload.h"
#include "errors.h"

namespace pie::control {

namespace {

uint64_t pages_for(uint64_t num_tokens, uint32_t page_size) { return (num_tokens + page_size - 1) / page_size; }

std::optional<Clock::time_point> deadline_after(double timeout_seconds) {
  if (timeout_seconds < 0) return std::nullopt;
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_seconds));
}

}  // namespace

const char* stream_end_name(StreamEnd end) {
  switch (end) {
    case StreamEnd::kRunning: return "running";
    case StreamEnd::kEos: return "eos";
    case StreamEnd::kStopTokens: return "stop-tokens";
    case StreamEnd::kStopString: return "stop-string";
    case StreamEnd::kLength: return "length";
    case StreamEnd::kGrammar: return "grammar";
    case StreamEnd::kCancelled: return "cancelled";
    case StreamEnd::kFailed: return "failed";
  }
  return "unknown";
}

uint64_t step_seed(uint64_t seed, uint64_t step) {
  return (seed * 1'000'003ULL + step) & 0x7FFF'FFFF'FFFF'FFFFULL;
}

GenerationStream::GenerationStream(StreamSpec spec, std::shared_ptr<CommandQueue> queue, std::shared_ptr<PagePool> pool,
                                   ForwardLimits limits, std::shared_ptr<const TokenBytes> token_bytes,
                                   StreamHooks hooks)
    : spec_(std::move(spec)),
      queue_(std::move(queue)),
      pool_(std::move(pool)),
      limits_(limits),
      token_bytes_(std::move(token_bytes)),
      hooks_(std::move(hooks)),
      stop_overlap_([this] {
        size_t longest = 0;
        for (const std::string& s : spec_.stop_strings) longest = std::max(longest, s.size());
        return longest > 0 ? longest - 1 : 0;
      }()) {}

GenerationStream::~GenerationStream() = default;

std::shared_ptr<GenerationStream> GenerationStream::start(StreamSpec spec, std::shared_ptr<CommandQueue> queue,
                                                          std::shared_ptr<PagePool> pool, ForwardLimits limits,
                                                          std::shared_ptr<const TokenBytes> token_bytes,
                                                          StreamHooks hooks) {
  if (!queue || !pool) throw std::invalid_argument("a generation stream needs a queue and a page pool");
  if (spec.pending.empty()) throw std::invalid_argument("pending: empty: a stream starts with at least one token to run");
  if (spec.max_tokens == 0) throw std::invalid_argument("max_tokens: must be >= 1");
  if (spec.sampler.kind != SamplerKind::kGreedy && spec.sampler.kind != SamplerKind::kSample)
    throw std::invalid_argument("sampler: a stream draws tokens: greedy or sample");
  if (!spec.stop_strings.empty() && !token_bytes)
    throw std::invalid_argument("stop_strings: this model has no token byte table");
  for (size_t i = 0; i < spec.stop_tokens.size(); ++i)
    if (spec.stop_tokens[i].empty()) throw std::invalid_argument("stop_tokens[" + std::to_string(i) + "]: empty");
  // Bounds: a stream's checks run on the batch loop's thread, shared by every instance, and what it keeps
  // for its reader grows with every token.
  if (spec.top_logprobs > std::min<uint32_t>(kMaxTopLogprobs, limits.vocab_size))
    throw std::invalid_argument("top_logprobs: " + std::to_string(spec.top_logprobs) + " exceeds " +
                                std::to_string(std::min<uint32_t>(kMaxTopLogprobs, limits.vocab_size)));
  if (spec.stop_strings.size() > kMaxStops || spec.stop_tokens.size() > kMaxStops)
    throw std::invalid_argument(std::string(spec.stop_strings.size() > kMaxStops ? "stop_strings" : "stop_tokens") +
                                ": more than " + std::to_string(kMaxStops));
  for (size_t i = 0; i < spec.stop_strings.size(); ++i)
    if (spec.stop_strings[i].size() > kMaxStopLength)
      throw std::invalid_argument("stop_strings[" + std::to_string(i) + "]: longer than " +
                                  std::to_string(kMaxStopLength) + " bytes");
  for (size_t i = 0; i < spec.stop_tokens.size(); ++i)
    if (spec.stop_tokens[i].size() > kMaxStopLength)
      throw std::invalid_argument("stop_tokens[" + std::to_string(i) + "]: longer than " +
                                  std::to_string(kMaxStopLength) + " tokens");
  if (!spec.first_mask.empty() && !hooks.grammar)
    throw std::invalid_argument("first_mask: a masked stream needs a grammar to give the next masks");
  auto stream = std::shared_ptr<GenerationStream>(new GenerationStream(std::move(spec), std::move(queue), std::move(pool),
                                                                       limits, std::move(token_bytes), std::move(hooks)));
  stream->handles_ = stream->spec_.handles;
  stream->inputs_ = stream->spec_.pending;
  stream->cached_ = stream->spec_.num_cached;
  stream->total_ = stream->cached_ + stream->inputs_.size();
  stream->mask_ = stream->spec_.first_mask;
  try {
    stream->submit_next();
  } catch (...) {  // nobody will learn of the pages it allocated: give them back
    if (!stream->new_handles_.empty()) {
      try {
        stream->pool_->free(stream->spec_.instance_id, stream->new_handles_);
      } catch (const std::exception&) {  // the instance was terminated meanwhile: its pages are gone already
      }
    }
    throw;
  }
  return stream;
}

std::vector<uint32_t> GenerationStream::allocate(uint32_t count) {
  std::vector<Termination> terminations;
  try {
    std::vector<uint32_t> fresh = pool_->allocate(spec_.instance_id, count, terminations);
    if (hooks_.report_terminations && !terminations.empty()) hooks_.report_terminations(terminations);
    return fresh;
  } catch (...) {
    if (hooks_.report_terminations && !terminations.empty()) hooks_.report_terminations(terminations);
    throw;
  }
}

// The pass of inputs_[:t] (t within the token budget) over the sequence's first `end` tokens, with the
// stream's outputs when it reaches the end of the sequence. Pages: the whole sequence's, allocated
// before the pass (as the SDK reserves them before a step).
void GenerationStream::submit_next() {
  const uint32_t ps = limits_.page_size;
  if (limits_.max_position != 0 && total_ > limits_.max_position)  // before any page is allocated for it
    throw std::invalid_argument("the sequence of " + std::to_string(total_) + " tokens exceeds the model's " +
                                std::to_string(limits_.max_position) + " positions");
  const uint64_t end = std::min<uint64_t>(total_, cached_ + std::max<uint32_t>(limits_.max_tokens, 1));
  const uint64_t need = pages_for(total_, ps);
  if (need > handles_.size()) {
    std::vector<uint32_t> fresh = allocate(static_cast<uint32_t>(need - handles_.size()));
    handles_.insert(handles_.end(), fresh.begin(), fresh.end());
    std::lock_guard<std::mutex> lock(mutex_);
    new_handles_.insert(new_handles_.end(), fresh.begin(), fresh.end());
  }
  const size_t t = static_cast<size_t>(end - cached_);
  std::shared_ptr<ForwardCommand> command = next_command();
  command->token_ids.assign(inputs_.begin(), inputs_.begin() + static_cast<std::ptrdiff_t>(t));
  command->positions.resize(t);
  for (size_t i = 0; i < t; ++i) command->positions[i] = static_cast<uint32_t>(cached_ + i);
  const uint64_t num_pages = pages_for(end, ps);
  command->kv_last_page_len = static_cast<uint32_t>(end - (num_pages - 1) * ps);
  command->adapter = spec_.adapter;
  if (end == total_) {
    ForwardOutput& draw = command->outputs.emplace_back();
    draw.index = static_cast<uint32_t>(t - 1);
    draw.sampler = spec_.sampler;
    if (draw.sampler.kind == SamplerKind::kSample && draw.sampler.seed)
      draw.sampler.seed = step_seed(*spec_.sampler.seed, num_generated_);
    draw.vocab_mask = mask_;
    if (spec_.top_logprobs > 0) {
      ForwardOutput& top = command->outputs.emplace_back();
      top.index = static_cast<uint32_t>(t - 1);
      top.sampler.kind = SamplerKind::kTopKDistribution;
      top.sampler.top_k = spec_.top_logprobs;
      top.sampler.temperature = 1.0f;
    }
  }
  // The pass writes its last t slots: pages [(end - t) / ps, num_pages).
  const size_t first_written = static_cast<size_t>((end - t) / ps);
  // Checked before anything changes (as forward.submit): a refused pass leaves the pages as they were.
  const bool written_shared = point_at_pages(*command, num_pages, first_written);
  if (auto problem = check_forward(*command, limits_))
    throw std::invalid_argument(describe(*problem, FieldNaming::kPython));
  // Copy-on-write of the pages the pass writes that are shared (a fork, an import): the copies move
  // those handles to new pages, so the pass's pages are resolved (and pinned) again.
  std::vector<PageCopy> copies;
  PagePins copy_pins;
  if (written_shared) {
    const std::vector<uint32_t> written(handles_.begin() + static_cast<std::ptrdiff_t>(first_written),
                                        handles_.begin() + static_cast<std::ptrdiff_t>(num_pages));
    std::vector<Termination> terminations;
    try {
      copies = pool_->prepare_write(spec_.instance_id, written, terminations, &copy_pins);
    } catch (...) {
      if (hooks_.report_terminations && !terminations.empty()) hooks_.report_terminations(terminations);
      throw;
    }
    if (hooks_.report_terminations && !terminations.empty()) hooks_.report_terminations(terminations);
    if (!copies.empty()) point_at_pages(*command, num_pages, num_pages);
  }
  if (hooks_.fold_page_masks) {
    const std::vector<uint32_t> pass_handles(handles_.begin(), handles_.begin() + static_cast<std::ptrdiff_t>(num_pages));
    hooks_.fold_page_masks(pass_handles, end, t, command->mask);
  }

  CommandQueue::Submission pass;
  pass.kind = static_cast<int32_t>(CommandKind::kForward);
  pass.payload = command_payload(command);
  pass.num_tokens = static_cast<uint32_t>(t);
  pass.from_stream = true;
  std::shared_ptr<FutureState> future;
  if (copies.empty()) {
    future = queue_->submit(std::move(pass));
  } else {
    auto copy = std::make_shared<PageCopyCommand>();
    for (const PageCopy& c : copies) copy->spans.push_back(CopySpan{c.src_page, 0, c.dst_page, 0, ps});
    copy->pins.push_back(std::move(copy_pins));
    std::vector<CommandQueue::Submission> submissions(2);
    submissions[0].kind = static_cast<int32_t>(CommandKind::kCopyPages);
    submissions[0].payload = command_payload(std::move(copy));
    submissions[0].depends_on_previous = true;  // it reads what earlier passes wrote
    submissions[0].from_stream = true;
    submissions[1] = std::move(pass);
    future = queue_->submit_all(std::move(submissions)).back();
  }
  // The pass before the one that just completed becomes the spare; the one it replaces is dropped
  // here, where no lock is held.
  std::shared_ptr<ForwardCommand> retired = std::exchange(spare_, std::exchange(in_flight_, std::move(command)));
  retired.reset();
  // A weak listener: a stream its owner dropped stops (nobody could read it).
  future->then(weak_from_this());
}

std::shared_ptr<ForwardCommand> GenerationStream::next_command() {
  std::shared_ptr<ForwardCommand> command = std::move(spare_);
  if (command && command.use_count() == 1) {  // only this stream holds it: nothing reads it any more
    // (the acquire pairs with the release of the last other holder's drop: its reads happened before)
    std::atomic_thread_fence(std::memory_order_acquire);
    command->reset();
    return command;
  }
  return std::make_shared<ForwardCommand>();
}

bool GenerationStream::point_at_pages(ForwardCommand& command, size_t count, size_t written_from) {
  PagePins fresh;
  bool written_shared = false;
  if (pool_->resolve_more(spec_.instance_id, handles_, count, pages_epoch_, pages_, fresh, written_from,
                          &written_shared) ||
      !page_pins_) {
    page_pins_ = std::make_shared<PinGroups>();  // the earlier set stays with the passes that hold it
  }
  if (fresh) page_pins_->groups.push_back(std::move(fresh));  // a step that added no page pins nothing
  command.kv_page_ids.assign(pages_.begin(), pages_.begin() + static_cast<std::ptrdiff_t>(count));
  command.pins = page_pins_;
  return written_shared;
}

void GenerationStream::release_pages() {
  in_flight_.reset();
  spare_.reset();
  page_pins_.reset();
  pages_.clear();
}

void GenerationStream::on_future_resolved(FutureState& future) {
  const std::shared_ptr<ForwardCommand> command = in_flight_;  // the pass of this future
  if (future.status() != FutureStatus::kReady) {  // possibly under the scheduler's mutex: only record
    release_pages();  // a pass still running keeps its pins (its batch holds it); the pool's lock nests in
                      // the scheduler's
    finish(StreamEnd::kFailed, future.error());
    return;
  }
  const size_t t = command->num_tokens();
  cached_ += t;
  inputs_.erase(inputs_.begin(), inputs_.begin() + static_cast<std::ptrdiff_t>(t));
  StreamEnd end = StreamEnd::kRunning;
  std::string message;
  if (!command->outputs.empty()) {
    if (command->results.empty() || command->results[0].ids.empty()) {
      release_pages();
      finish(StreamEnd::kFailed, "the engine wrote no token for the stream's pass");
      return;
    }
    const uint32_t token = command->results[0].ids[0];
    end = accept_token(token, message);
    if (end == StreamEnd::kRunning && cancel_requested_.load(std::memory_order_acquire)) end = StreamEnd::kCancelled;
    if (end != StreamEnd::kRunning) release_pages();
    if (end != StreamEnd::kEos) {  // the token, and the end it caused if any, become readable together
      const OutputValue* top = spec_.top_logprobs > 0 && command->results.size() > 1 ? &command->results[1] : nullptr;
      publish(token, top, end, std::move(message));
      if (end != StreamEnd::kRunning) return;
    }
  } else if (cancel_requested_.load(std::memory_order_acquire)) {
    end = StreamEnd::kCancelled;
  }
  if (end != StreamEnd::kRunning) {
    release_pages();
    finish(end, std::move(message));
    return;
  }
  try {
    submit_next();
  } catch (const std::exception& failure) {
    release_pages();
    finish(StreamEnd::kFailed, failure.what());
  }
}

void GenerationStream::publish(uint32_t token, const OutputValue* top, StreamEnd end, std::string message) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generated_.push_back(token);
    if (top) top_.push_back(*top);
    if (end != StreamEnd::kRunning) end_locked(end, std::move(message));
    wake = num_token_waiters_ > 0;
  }
  if (end != StreamEnd::kRunning) {
    changed_.notify_all();
    ended_cv_.notify_all();
  } else if (wake) {  // a reader blocked in wait() (for the end) is not woken per token
    changed_.notify_all();
  }
}

StreamEnd GenerationStream::accept_token(uint32_t token, std::string& message) {
  if (std::find(spec_.eos_ids.begin(), spec_.eos_ids.end(), token) != spec_.eos_ids.end()) return StreamEnd::kEos;
  ++num_generated_;
  ++total_;
  inputs_.assign(1, token);
  tail_.push_back(token);
  if (token_bytes_ && token < token_bytes_->bytes.size()) text_ += token_bytes_->bytes[token];
  if (hooks_.grammar) {
    GrammarStep step;
    try {
      step = hooks_.grammar(token);
    } catch (const std::exception& failure) {
      message = std::string("grammar: ") + failure.what();
      return StreamEnd::kFailed;
    }
    if (!step.accepted) {
      message = "the grammar rejected token " + std::to_string(token) + ", which its own mask allowed";
      return StreamEnd::kFailed;
    }
    if (step.terminated) return StreamEnd::kGrammar;
    mask_ = std::move(step.next_mask);
  }
  if (!spec_.stop_strings.empty() && stop_string_found()) return StreamEnd::kStopString;
  if (!spec_.stop_tokens.empty() && stop_tokens_found()) return StreamEnd::kStopTokens;
  if (num_generated_ >= spec_.max_tokens) return StreamEnd::kLength;
  return StreamEnd::kRunning;
}

// Searches only the new bytes and the stop_overlap_ bytes before them: linear in the generated length.
bool GenerationStream::stop_string_found() {
  const size_t from = scanned_ > stop_overlap_ ? scanned_ - stop_overlap_ : 0;
  scanned_ = text_.size();
  for (const std::string& stop : spec_.stop_strings)
    if (text_.find(stop, from) != std::string::npos) return true;
  return false;
}

bool GenerationStream::stop_tokens_found() const {
  for (const std::vector<uint32_t>& stop : spec_.stop_tokens)
    if (stop.size() <= tail_.size() && std::equal(stop.rbegin(), stop.rend(), tail_.rbegin())) return true;
  return false;
}

void GenerationStream::end_locked(StreamEnd end, std::string message) {
  if (end_ != StreamEnd::kRunning) return;
  end_ = end;
  message_ = std::move(message);
  end_cached_ = static_cast<uint32_t>(cached_);
}

void GenerationStream::finish(StreamEnd end, std::string message) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    end_locked(end, std::move(message));
  }
  changed_.notify_all();
  ended_cv_.notify_all();
}

// ---- readers

namespace {

StreamChunk take_locked(std::vector<uint32_t>& generated, size_t& num_read, std::vector<OutputValue>& top, StreamEnd end,
                        const std::string& message, const std::vector<uint32_t>& new_handles, uint32_t num_cached) {
  StreamChunk chunk;
  chunk.tokens.assign(generated.begin() + static_cast<std::ptrdiff_t>(num_read), generated.end());
  num_read = generated.size();
  chunk.top.swap(top);
  chunk.end = end;
  if (end != StreamEnd::kRunning) {
    chunk.message = message;
    chunk.new_handles = new_handles;
    chunk.num_cached = num_cached;
  }
  return chunk;
}

}  // namespace

StreamChunk GenerationStream::next(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto ready = [this] { return generated_.size() > num_read_ || end_ != StreamEnd::kRunning; };
  ++num_token_waiters_;
  if (auto deadline = deadline_after(timeout_seconds)) {
    changed_.wait_until(lock, *deadline, ready);
  } else {
    changed_.wait(lock, ready);
  }
  --num_token_waiters_;
  return take_locked(generated_, num_read_, top_, end_, message_, new_handles_, end_cached_);
}

StreamChunk GenerationStream::poll() {
  std::lock_guard<std::mutex> lock(mutex_);
  return take_locked(generated_, num_read_, top_, end_, message_, new_handles_, end_cached_);
}

void GenerationStream::cancel() { cancel_requested_.store(true, std::memory_order_release); }

bool GenerationStream::wait(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto over = [this] { return end_ != StreamEnd::kRunning; };
  if (auto deadline = deadline_after(timeout_seconds)) return ended_cv_.wait_until(lock, *deadline, over);
  ended_cv_.wait(lock, over);
  return true;
}

bool GenerationStream::ended() {
  std::lock_guard<std::mutex> lock(mutex_);
  return end_ != StreamEnd::kRunning;
}

std::vector<uint32_t> GenerationStream::generated() {
  std::lock_guard<std::mutex> lock(mutex_);
  return generated_;
}

}  // namespace pie::control
