#include "host_calls.h"

#include <atomic>
#include <chrono>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "instance_state.h"
#include "wasmtime_c.h"

namespace pie_wt {

namespace {
Api g_api{};
bool g_loaded = false;
}  // namespace

const Api& api() { return g_api; }

const char* load_api(const char* path) {
  if (g_loaded) return "";
  void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (!lib) lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return "cannot open the wasmtime library";
#define PIE_SYM(field, symbol)                                            \
  g_api.field = reinterpret_cast<decltype(g_api.field)>(dlsym(lib, symbol)); \
  if (!g_api.field) return "missing symbol " symbol " in the wasmtime library";
  PIE_SYM(byte_vec_new, "wasm_byte_vec_new")
  PIE_SYM(vallist_new_uninit, "wasmtime_component_vallist_new_uninit")
  PIE_SYM(valrecord_new_uninit, "wasmtime_component_valrecord_new_uninit")
  PIE_SYM(val_new, "wasmtime_component_val_new")
  PIE_SYM(error_new, "wasmtime_error_new")
  PIE_SYM(linker_instance_add_func, "wasmtime_component_linker_instance_add_func")
  PIE_SYM(error_message, "wasmtime_error_message")
  PIE_SYM(byte_vec_delete, "wasm_byte_vec_delete")
  PIE_SYM(error_delete, "wasmtime_error_delete")
#undef PIE_SYM
  g_loaded = true;
  return "";
}

}  // namespace pie_wt

namespace pie_rt {

using namespace pie_wt;

namespace {

void* trap(const std::string& message) { return api().error_new(message.c_str()); }

// The calling thread's instance, or a trap naming the call.
#define PIE_INSTANCE(call)                                                          \
  InstanceState* inst = current_instance();                                         \
  if (!inst) return trap(call ": no inferlet instance is bound to this thread");    \
  if (inst->terminated()) return trap(call ": " + inst->terminate_reason());

// The guest's view of a call (its import type, which wasmtime does not check against our untyped
// registration) must match the WIT before any argument or result slot is touched: top-level argument
// kinds and the number of results. Nested values are checked where they are read.
bool signature_ok(const val_t* args, size_t nargs, std::initializer_list<uint8_t> kinds, size_t nresults,
                  size_t want_results) {
  if (nargs != kinds.size() || nresults != want_results) return false;
  size_t i = 0;
  for (uint8_t k : kinds)
    if (args[i++].kind != k) return false;
  return true;
}

#define PIE_SIGNATURE(call, want_results, ...)                                                  \
  if (!signature_ok(args, nargs, {__VA_ARGS__}, nresults, want_results))                         \
    return trap(call ": the guest imports it with a type other than the WIT's (pie:inferlet@0.1.0)");

void set_u32(val_t* v, uint32_t x) {
  v->kind = K_U32;
  v->of.u32 = x;
}

void set_u64(val_t* v, uint64_t x) {
  v->kind = K_U64;
  v->of.u64 = x;
}

void set_u32_list(val_t* v, const std::vector<uint32_t>& xs) {
  v->kind = K_LIST;
  api().vallist_new_uninit(&v->of.list, xs.size());
  for (size_t i = 0; i < xs.size(); ++i) set_u32(&v->of.list.data[i], xs[i]);
}

void set_f32_list(val_t* v, const std::vector<float>& xs) {
  v->kind = K_LIST;
  api().vallist_new_uninit(&v->of.list, xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    v->of.list.data[i].kind = K_F32;
    v->of.list.data[i].of.f32 = xs[i];
  }
}

void set_name(wasm_byte_vec_t* out, const char* name) {
  api().byte_vec_new(out, std::strlen(name), reinterpret_cast<const uint8_t*>(name));
}

// list<u32> argument -> vector; false if the value is not a list of u32.
bool get_u32_list(const val_t& v, std::vector<uint32_t>& out) {
  if (v.kind != K_LIST) return false;
  out.resize(v.of.list.size);
  for (size_t i = 0; i < v.of.list.size; ++i) {
    const val_t& e = v.of.list.data[i];
    if (e.kind != K_U32) return false;
    out[i] = e.of.u32;
  }
  return true;
}

bool name_is(const wasm_byte_vec_t& name, const char* s) {
  size_t n = std::strlen(s);
  return name.size == n && std::memcmp(name.data, s, n) == 0;
}

// ---- runtime ----------------------------------------------------------------------------------

void* runtime_instance_id(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("runtime.instance-id", 1)
  PIE_INSTANCE("runtime.instance-id")
  set_u64(&results[0], inst->id());
  return nullptr;
}

// ---- kv ---------------------------------------------------------------------------------------

void* kv_page_size(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.page-size", 1)
  PIE_INSTANCE("kv.page-size")
  set_u32(&results[0], inst->limits().page_size);
  return nullptr;
}

void* kv_allocate(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.allocate", 1, K_U32)
  PIE_INSTANCE("kv.allocate")
  std::vector<uint32_t> handles;
  std::string error;
  if (!inst->allocate(args[0].of.u32, handles, error)) return trap("kv.allocate: " + error);
  set_u32_list(&results[0], handles);
  return nullptr;
}

void* kv_free(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.free", 0, K_LIST)
  PIE_INSTANCE("kv.free")
  std::vector<uint32_t> handles;
  std::string error;
  if (!get_u32_list(args[0], handles)) return trap("kv.free: pages: expected list<u32>");
  if (!inst->free(handles, error)) return trap("kv.free: " + error);
  return nullptr;
}

void* kv_fork(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.fork", 1, K_LIST)
  PIE_INSTANCE("kv.fork")
  std::vector<uint32_t> handles, out;
  std::string error;
  if (!get_u32_list(args[0], handles)) return trap("kv.fork: pages: expected list<u32>");
  if (!inst->fork(handles, out, error)) return trap("kv.fork: " + error);
  set_u32_list(&results[0], out);
  return nullptr;
}

void* kv_copy_tokens(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.copy-tokens", 0, K_U32, K_U32, K_U32, K_U32, K_U32)
  PIE_INSTANCE("kv.copy-tokens")
  const uint32_t src = args[0].of.u32, dst = args[1].of.u32;
  const uint32_t src_off = args[2].of.u32, dst_off = args[3].of.u32, count = args[4].of.u32;
  const uint64_t ps = inst->limits().page_size;
  if (src_off + uint64_t(count) > ps)
    return trap("kv.copy-tokens: src-offset + count = " + std::to_string(src_off + uint64_t(count)) +
                " exceeds the page size " + std::to_string(ps));
  if (dst_off + uint64_t(count) > ps)
    return trap("kv.copy-tokens: dst-offset + count = " + std::to_string(dst_off + uint64_t(count)) +
                " exceeds the page size " + std::to_string(ps));
  std::vector<uint32_t> pages;  // physical (src, dst)
  std::string error;
  if (!inst->resolve({src}, pages, error))
    return trap("kv.copy-tokens: src: " + std::to_string(src) + " is not a page handle of this instance");
  if (!inst->resolve({dst}, pages, error))
    return trap("kv.copy-tokens: dst: " + std::to_string(dst) + " is not a page handle of this instance");
  if (count == 0) return nullptr;
  std::vector<CopySpan> copies;  // dst's own copy first if it is shared, then the tokens
  std::vector<std::shared_ptr<void>> pins(1);  // the pages the copies read and write, held until they ran
  if (!inst->prepare_write({dst}, copies, pins, error)) return trap("kv.copy-tokens: dst: " + error);
  if (!inst->resolve_pinned({src, dst}, pages, pins[0], error)) return trap("kv.copy-tokens: " + error);
  copies.push_back({pages[0], src_off, pages[1], dst_off, count});
  if (!inst->submit_copies(0, copies, pins, error)) return trap("kv.copy-tokens: " + error);
  return nullptr;
}

void* kv_mask_page(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("kv.mask-page", 0, K_U32, K_LIST)
  PIE_INSTANCE("kv.mask-page")
  std::vector<uint32_t> runs;
  if (!get_u32_list(args[1], runs)) return trap("kv.mask-page: mask: expected list<u32>");
  const uint32_t ps = inst->limits().page_size;
  std::vector<uint8_t> hidden;
  hidden.reserve(ps);
  bool hide = false;  // runs alternate visible / hidden, starting with visible
  for (uint32_t run : runs) {
    if (hidden.size() + uint64_t(run) > ps) break;
    hidden.insert(hidden.end(), run, hide ? 1 : 0);
    hide = !hide;
  }
  uint64_t sum = 0;
  for (uint32_t run : runs) sum += run;
  if (sum != ps)
    return trap("kv.mask-page: mask: runs add up to " + std::to_string(sum) + ", not the page size " +
                std::to_string(ps));
  std::string error;
  if (!inst->set_page_mask(args[0].of.u32, std::move(hidden), error)) return trap("kv.mask-page: " + error);
  return nullptr;
}

// ---- forward ----------------------------------------------------------------------------------

// forward-pass record fields, in WIT order
enum PassField {
  F_TOKENS, F_EMBEDS, F_POSITIONS, F_PAGES, F_LAST_LEN, F_MASK, F_OUT_IDX, F_SAMPLERS, F_OUT_MASKS, F_COUNT
};

using pie::control::Sampler;
using pie::control::SamplerKind;

// The sampler variant -> Sampler. Checks the WIT shape of its payload and the WIT's own rule that a
// sample has temperature > 0 (greedy is its own case); the values are checked with the whole pass.
bool parse_sampler(const val_t& v, Sampler& spec, std::string& error) {
  if (v.kind != K_VARIANT) {
    error = "expected a sampler variant";
    return false;
  }
  const wasm_byte_vec_t& d = v.of.variant.discriminant;
  const val_t* payload = v.of.variant.val;
  if (name_is(d, "greedy")) {
    spec.kind = SamplerKind::kGreedy;
  } else if (name_is(d, "sample")) {
    spec.kind = SamplerKind::kSample;
    if (!payload || payload->kind != K_RECORD || payload->of.record.size != 5) {
      error = "sample: expected sample-params";
      return false;
    }
    const valrecord_t& r = payload->of.record;
    const uint8_t want[5] = {K_F32, K_U32, K_F32, K_F32, K_OPTION};
    for (int i = 0; i < 5; ++i)
      if (r.data[i].val.kind != want[i]) {
        error = "sample: expected sample-params";
        return false;
      }
    if (r.data[4].val.of.option && r.data[4].val.of.option->kind != K_U64) {
      error = "sample: seed: expected option<u64>";
      return false;
    }
    spec.temperature = r.data[0].val.of.f32;
    spec.top_k = r.data[1].val.of.u32;
    spec.top_p = r.data[2].val.of.f32;
    spec.min_p = r.data[3].val.of.f32;
    if (const val_t* seed = r.data[4].val.of.option) spec.seed = seed->of.u64;
    if (!(spec.temperature > 0)) {
      error = "sample: temperature " + std::to_string(spec.temperature) + " must be > 0 (use greedy for 0)";
      return false;
    }
  } else if (name_is(d, "top-k-distribution")) {
    spec.kind = SamplerKind::kTopKDistribution;
    if (!payload || payload->kind != K_TUPLE || payload->of.tuple.size != 2 ||
        payload->of.tuple.data[0].kind != K_U32 || payload->of.tuple.data[1].kind != K_F32) {
      error = "top-k-distribution: expected tuple<u32, f32>";
      return false;
    }
    spec.top_k = payload->of.tuple.data[0].of.u32;
    spec.temperature = payload->of.tuple.data[1].of.f32;
  } else if (name_is(d, "logprobs")) {
    spec.kind = SamplerKind::kLogprobs;
    if (!payload || !get_u32_list(*payload, spec.token_ids)) {
      error = "logprobs: expected list<u32>";
      return false;
    }
  } else if (name_is(d, "raw-logits")) {
    spec.kind = SamplerKind::kRawLogits;
  } else {
    error = "unknown sampler case";
    return false;
  }
  return true;
}

// forward.submit / submit-with-adapter: the WIT record -> one ForwardCommand (handles resolved to pages,
// page masks folded into the mask; the adapter, 0 = none), checked once (pie::control::check_forward),
// then submitted. args: (queue, forward-pass[, adapter]).
void* submit_pass(InstanceState* inst, const std::string& call, const val_t* args, uint32_t adapter, val_t* results) {
  auto fail = [&call](const std::string& m) { return trap(call + ": " + m); };
  const val_t& pass = args[1];
  if (pass.kind != K_RECORD || pass.of.record.size != F_COUNT) return fail("fwd: expected a forward-pass record");
  const record_entry_t* f = pass.of.record.data;
  auto cmd = std::make_shared<ForwardCommand>();
  cmd->adapter = adapter;
  std::vector<uint32_t> handles, embeds, out_idx;
  if (!get_u32_list(f[F_TOKENS].val, cmd->token_ids) || !get_u32_list(f[F_EMBEDS].val, embeds) ||
      !get_u32_list(f[F_POSITIONS].val, cmd->positions) || !get_u32_list(f[F_PAGES].val, handles) ||
      !get_u32_list(f[F_OUT_IDX].val, out_idx))
    return fail("fwd: malformed forward-pass");
  if (f[F_LAST_LEN].val.kind != K_U32) return fail("fwd.last-page-len: expected u32");
  cmd->kv_last_page_len = f[F_LAST_LEN].val.of.u32;
  std::string error;
  if (!embeds.empty()) {
    if (!cmd->token_ids.empty())
      return fail("fwd.tokens: give either tokens or input-embeddings, not both (tokens must be empty)");
    if (!inst->resolve_embeddings(embeds, cmd->embed_slots, error)) return fail("fwd.input-embeddings: " + error);
    cmd->token_ids.assign(embeds.size(), 0);  // placeholders: the engine reads the embedding slots
  }
  const val_t& mask = f[F_MASK].val;
  if (mask.kind != K_LIST) return fail("fwd.mask: expected list<list<u32>>");
  cmd->mask.resize(mask.of.list.size);
  for (size_t i = 0; i < mask.of.list.size; ++i)
    if (!get_u32_list(mask.of.list.data[i], cmd->mask[i])) return fail("fwd.mask: expected list<list<u32>>");
  const val_t& samplers = f[F_SAMPLERS].val;
  if (samplers.kind != K_LIST) return fail("fwd.samplers: expected list<sampler>");
  if (samplers.of.list.size != out_idx.size())
    return fail("fwd.samplers: " + std::to_string(samplers.of.list.size) + " samplers for " +
                std::to_string(out_idx.size()) + " output indices");
  const val_t& out_masks = f[F_OUT_MASKS].val;
  if (out_masks.kind != K_LIST) return fail("fwd.output-masks: expected list<list<u32>>");
  if (out_masks.of.list.size != 0 && out_masks.of.list.size != out_idx.size())
    return fail("fwd.output-masks: " + std::to_string(out_masks.of.list.size) + " masks for " +
                std::to_string(out_idx.size()) + " outputs (one per output, or none)");
  cmd->outputs.resize(out_idx.size());
  for (size_t i = 0; i < out_idx.size(); ++i) {
    cmd->outputs[i].index = out_idx[i];
    if (!parse_sampler(samplers.of.list.data[i], cmd->outputs[i].sampler, error))
      return fail("fwd.samplers[" + std::to_string(i) + "]: " + error);
    // an empty row: this output is not masked
    if (out_masks.of.list.size != 0 && !get_u32_list(out_masks.of.list.data[i], cmd->outputs[i].vocab_mask))
      return fail("fwd.output-masks: expected list<list<u32>>");
  }
  if (handles.empty()) return fail("fwd.pages: empty: the sequence must hold at least the input tokens");
  if (!inst->resolve_pinned(handles, cmd->kv_page_ids, cmd->pins, error)) return fail(error);
  if (auto problem = pie::control::check_forward(*cmd, inst->limits()))
    return fail(pie::control::describe(*problem, pie::control::FieldNaming::kWit));
  // The pass writes the last t slots of the sequence: those pages get their own copy first if shared
  // (fork / import); page masks are folded into the mask rows. The pages it reads and writes stay pinned
  // (cmd->pins) until the command is dropped, however the instance frees them meanwhile.
  const uint32_t ps = inst->limits().page_size;
  const size_t t = cmd->num_tokens(), kv_len = cmd->kv_len(ps);
  const uint32_t q = args[0].of.u32;
  std::vector<uint32_t> written(handles.begin() + (kv_len - t) / ps, handles.end());
  std::vector<CopySpan> copies;
  std::vector<std::shared_ptr<void>> copy_pins;
  if (!inst->prepare_write(written, copies, copy_pins, error)) return fail("fwd.pages: " + error);
  if (!copies.empty()) {  // the copies moved some handles to new pages
    if (!inst->submit_copies(q, copies, copy_pins, error)) return fail(error);
    if (!inst->resolve_pinned(handles, cmd->kv_page_ids, cmd->pins, error)) return fail(error);
  }
  inst->apply_page_masks(handles, kv_len, t, cmd->mask);
  uint64_t future = inst->submit(q, std::move(cmd), error);
  if (future == 0) return fail(error);
  set_u64(&results[0], future);
  return nullptr;
}

void* forward_submit(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("forward.submit", 1, K_U32, K_RECORD)
  PIE_INSTANCE("forward.submit")
  return submit_pass(inst, "forward.submit", args, 0, results);
}

void* forward_submit_with_adapter(void*, void*, const void*, val_t* args, size_t nargs, val_t* results,
                                  size_t nresults) {
  PIE_SIGNATURE("forward.submit-with-adapter", 1, K_U32, K_RECORD, K_U32)
  PIE_INSTANCE("forward.submit-with-adapter")
  return submit_pass(inst, "forward.submit-with-adapter", args, args[2].of.u32, results);
}

void* forward_wait(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("forward.wait", 1, K_U64)
  PIE_INSTANCE("forward.wait")
  std::shared_ptr<ForwardCommand> command;
  std::string error;
  uint64_t f = args[0].of.u64;
  switch (inst->wait(f, command, error)) {
    case WaitStatus::kDone:
      break;
    case WaitStatus::kFailed:
      return trap("forward.wait: the pass failed: " + error);
    case WaitStatus::kUnknownFuture:
      return trap("forward.wait: f: " + std::to_string(f) + " is not a pending future of this instance");
    case WaitStatus::kDeadline:
      return trap("forward.wait: the instance's deadline passed while waiting");
    case WaitStatus::kTerminated:
      return trap("forward.wait: " + error);
  }
  if (inst->tracing()) inst->trace_pass(*command);
  const std::vector<pie::control::OutputValue>& outputs = command->results;
  val_t& list = results[0];
  list.kind = K_LIST;
  api().vallist_new_uninit(&list.of.list, outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    val_t& rec = list.of.list.data[i];
    rec.kind = K_RECORD;
    api().valrecord_new_uninit(&rec.of.record, 2);
    set_name(&rec.of.record.data[0].name, "ids");
    set_u32_list(&rec.of.record.data[0].val, outputs[i].ids);
    set_name(&rec.of.record.data[1].name, "values");
    set_f32_list(&rec.of.record.data[1].val, outputs[i].values);
  }
  return nullptr;
}

void* forward_ready(void*, void*, const void*, val_t* args, size_t nargs, val_t* results, size_t nresults) {
  PIE_SIGNATURE("forward.ready", 1, K_U64)
  PIE_INSTANCE("forward.ready")
  uint64_t f = args[0].of.u64;
  int r = inst->ready(f);
  if (r < 0) return trap("forward.ready: f: " + std::to_string(f) + " is not a pending future of this instance");
  results[0].kind = K_BOOL;
  results[0].of.boolean = r == 1;
  return nullptr;
}

void* unimplemented(void* env, void*, const void*, val_t*, size_t, val_t*, size_t) {
  return trap(std::string("not implemented yet: ") + static_cast<const char*>(env));
}

void free_env(void* env) { std::free(env); }

struct HotEntry {
  const char* iface;
  const char* name;
  func_callback_t fn;
};

const HotEntry kHot[] = {
    {"runtime", "instance-id", runtime_instance_id},
    {"kv", "page-size", kv_page_size},
    {"kv", "allocate", kv_allocate},
    {"kv", "free", kv_free},
    {"kv", "fork", kv_fork},
    {"kv", "copy-tokens", kv_copy_tokens},
    {"kv", "mask-page", kv_mask_page},
    {"forward", "submit", forward_submit},
    {"forward", "wait", forward_wait},
    {"forward", "ready", forward_ready},
    {"forward", "submit-with-adapter", forward_submit_with_adapter},
};

constexpr size_t kNumHot = sizeof(kHot) / sizeof(kHot[0]);

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
std::atomic<unsigned long long> g_hot_calls[kNumHot];

// What the linker calls for a hot function: counts the call, then runs it (env: its kHot entry).
void* counted_hot_call(void* env, void* context, const void* func_type, val_t* args, size_t nargs, val_t* results,
                       size_t nresults) {
  const HotEntry* e = static_cast<const HotEntry*>(env);
  const size_t index = static_cast<size_t>(e - kHot);
  g_hot_calls[index].fetch_add(1, std::memory_order_relaxed);
  InstanceState* inst = current_instance();
  if (inst == nullptr || !inst->tracing()) return e->fn(nullptr, context, func_type, args, nargs, results, nresults);
  const int64_t start = steady_ns();
  void* trap = e->fn(nullptr, context, func_type, args, nargs, results, nresults);
  inst->trace_call(static_cast<uint32_t>(index), start, steady_ns());
  return trap;
}

const HotEntry* find_hot(const char* iface, const char* name) {
  for (const auto& e : kHot)
    if (std::strcmp(e.iface, iface) == 0 && std::strcmp(e.name, name) == 0) return &e;
  return nullptr;
}

thread_local std::string g_error;

const char* take_error(void* err) {
  if (!err) return "";
  wasm_byte_vec_t msg{0, nullptr};
  api().error_message(err, &msg);
  g_error.assign(reinterpret_cast<const char*>(msg.data), msg.size);
  api().byte_vec_delete(&msg);
  api().error_delete(err);
  return g_error.c_str();
}

}  // namespace

bool is_hot(const char* iface, const char* name) { return find_hot(iface, name) != nullptr; }

const char* register_hot(void* linker_instance, const char* iface, const char* name) {
  const HotEntry* e = find_hot(iface, name);
  if (!e) return "no such hot function";
  return take_error(api().linker_instance_add_func(linker_instance, name, std::strlen(name), counted_hot_call,
                                                   const_cast<HotEntry*>(e), nullptr));
}

size_t num_hot_functions() { return kNumHot; }

void hot_function_calls(size_t i, const char** iface, const char** name, unsigned long long* count) {
  *iface = kHot[i].iface;
  *name = kHot[i].name;
  *count = g_hot_calls[i].load(std::memory_order_relaxed);
}

const char* register_unimplemented(void* linker_instance, const char* name, const char* call) {
  char* env = strdup(call);
  return take_error(api().linker_instance_add_func(linker_instance, name, std::strlen(name), unimplemented, env, free_env));
}

}  // namespace pie_rt
