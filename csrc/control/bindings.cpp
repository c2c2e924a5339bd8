// The one binding file of the control layer: it only lists exports and converts Python values.
// Payloads and results are Python objects held by reference (None travels as "no payload"), except
// forward passes and page copies, which travel as the control layer's own commands (forward_command.h).
// Every blocking call (Scheduler.take, Future.wait/result, drive_native_producers) releases the GIL.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "command_payload.h"
#include "control_api.h"
#include "engine_batch.h"
#include "errors.h"
#include "forward_command.h"
#include "future.h"
#include "generation_stream.h"
#include "native_load.h"
#include "page_pool.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace pie::control;

// The opaque handle types of control_api.h.
struct PieControlQueue {
  std::shared_ptr<CommandQueue> queue;
};
struct PieControlFuture {
  std::shared_ptr<FutureState> future;
};
struct PagePoolHandle {
  std::shared_ptr<PagePool> pool;  // shared: the pins of commands keep it alive
  py::object on_terminate = py::none();

  PagePoolHandle(uint32_t num_pages, uint32_t page_size, std::string resource, py::object callback)
      : pool(std::make_shared<PagePool>(num_pages, page_size, std::move(resource))), on_terminate(std::move(callback)) {}

  void report(const std::vector<Termination>& terminations) {
    if (on_terminate.is_none()) return;
    for (const Termination& termination : terminations) {
      try {
        on_terminate(termination.instance_id, termination.message);
      } catch (py::error_already_set& error) {
        error.discard_as_unraisable("PagePool.on_terminate");
      }
    }
  }

  // Runs `call` (which may terminate instances) and reports terminations even when it throws.
  template <typename Call>
  auto with_terminations(Call&& call) {
    std::vector<Termination> terminations;
    try {
      auto result = call(terminations);
      report(terminations);
      return result;
    } catch (...) {
      std::exception_ptr error = std::current_exception();
      report(terminations);
      std::rethrow_exception(error);
    }
  }
};

// Pages pinned from Python (tests, clients that want a command's guarantee).
struct PinnedPages {
  std::vector<uint32_t> pages;
  PagePins pins;
};

struct PieControlPool {
  PyObject* owner;  // a strong reference to the Python PagePool
  PagePoolHandle* pool;
};

namespace {

void release_pyobject(void* object) {
  if (!Py_IsInitialized()) return;  // the interpreter is gone: nothing left to release into
  if (PyGILState_Check()) {
    Py_DECREF(static_cast<PyObject*>(object));
    return;
  }
  PyGILState_STATE state = PyGILState_Ensure();
  Py_DECREF(static_cast<PyObject*>(object));
  PyGILState_Release(state);
}

Payload to_payload(const py::handle& object) {
  if (object.is_none()) return Payload();
  return Payload(object.inc_ref().ptr(), &release_pyobject);
}

// A Python object; a ForwardCommand or PageCopyCommand for those commands; for any other payload
// submitted through the C API, its address as an int.
py::object from_payload(const Payload& payload) {
  if (!payload) return py::none();
  Payload::Release release = payload.release_function();
  if (release == &release_pyobject) {
    return py::reinterpret_borrow<py::object>(static_cast<PyObject*>(payload.get()));
  }
  if (release == &release_command<ForwardCommand>) {
    return py::cast(*static_cast<std::shared_ptr<ForwardCommand>*>(payload.get()));
  }
  if (release == &release_command<PageCopyCommand>) {
    return py::cast(*static_cast<std::shared_ptr<PageCopyCommand>*>(payload.get()));
  }
  return py::int_(reinterpret_cast<uintptr_t>(payload.get()));
}

// ---- the C API (control_api.h) ----

void copy_error(const char* message, char* error, size_t error_size) {
  if (error == nullptr || error_size == 0) return;
  size_t length = std::min(std::strlen(message), error_size - 1);
  std::memcpy(error, message, length);
  error[length] = '\0';
}

PieControlQueue* api_queue_from_python(PyObject* object) {
  try {
    return new PieControlQueue{py::cast<std::shared_ptr<CommandQueue>>(py::handle(object))};
  } catch (py::cast_error&) {
    PyErr_SetString(PyExc_TypeError, "expected a pie.control.CommandQueue");
    return nullptr;
  }
}

void api_queue_release(PieControlQueue* queue) { delete queue; }

PieControlFuture* api_submit(PieControlQueue* queue, int32_t kind, void* payload, PiePayloadRelease release,
                             uint32_t num_tokens, int depends_on_previous, char* error, size_t error_size) {
  Payload owned(payload, release);
  try {
    return new PieControlFuture{queue->queue->submit(kind, std::move(owned), num_tokens, depends_on_previous != 0)};
  } catch (const std::exception& failure) {
    copy_error(failure.what(), error, error_size);
    return nullptr;
  }
}

PieControlFuture* api_submit_forward(PieControlQueue* queue, const void* command, int depends_on_previous, char* error,
                                     size_t error_size) {
  try {
    const auto& shared = *static_cast<const std::shared_ptr<ForwardCommand>*>(command);
    const uint32_t num_tokens = shared->num_tokens();
    return new PieControlFuture{queue->queue->submit(static_cast<int32_t>(CommandKind::kForward),
                                                     command_payload(shared), num_tokens, depends_on_previous != 0)};
  } catch (const std::exception& failure) {
    copy_error(failure.what(), error, error_size);
    return nullptr;
  }
}

PieControlFuture* api_submit_copies(PieControlQueue* queue, const uint32_t* spans, size_t count, const void* pins,
                                    size_t num_pins, char* error, size_t error_size) {
  try {
    auto copies = std::make_shared<PageCopyCommand>();
    copies->spans.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      const uint32_t* s = spans + 5 * i;
      copies->spans.push_back(CopySpan{s[0], s[1], s[2], s[3], s[4]});
    }
    const auto* held = static_cast<const std::shared_ptr<void>*>(pins);
    copies->pins.assign(held, held + num_pins);
    // Depends on the previous command: a copy reads what earlier passes of the queue wrote.
    return new PieControlFuture{queue->queue->submit(static_cast<int32_t>(CommandKind::kCopyPages),
                                                     command_payload(std::move(copies)), 0, true)};
  } catch (const std::exception& failure) {
    copy_error(failure.what(), error, error_size);
    return nullptr;
  }
}

PieControlFuture* api_synchronize(PieControlQueue* queue, char* error, size_t error_size) {
  try {
    return new PieControlFuture{queue->queue->synchronize()};
  } catch (const std::exception& failure) {
    copy_error(failure.what(), error, error_size);
    return nullptr;
  }
}

int api_future_wait(PieControlFuture* future, double timeout_seconds) {
  std::optional<Clock::time_point> deadline;
  if (timeout_seconds >= 0) {
    deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_seconds));
  }
  return static_cast<int>(future->future->wait(deadline));
}

int api_future_status(PieControlFuture* future) { return static_cast<int>(future->future->status()); }
uint64_t api_future_command_id(PieControlFuture* future) { return future->future->command_id(); }
void* api_future_result(PieControlFuture* future) {
  return future->future->status() == FutureStatus::kReady ? future->future->result().get() : nullptr;
}
const char* api_future_error(PieControlFuture* future) {
  FutureStatus status = future->future->status();
  return status == FutureStatus::kFailed || status == FutureStatus::kCancelled ? future->future->error().c_str() : "";
}
void api_future_release(PieControlFuture* future) { delete future; }
PyObject* api_future_to_python(PieControlFuture* future) {
  try {
    return py::cast(future->future).release().ptr();
  } catch (py::error_already_set& error) {
    error.restore();
    return nullptr;
  }
}

int api_status_of(const std::exception& failure) {
  if (dynamic_cast<const InstanceTerminated*>(&failure)) return PIE_ERR_TERMINATED;
  if (dynamic_cast<const QuotaExceeded*>(&failure)) return PIE_ERR_QUOTA;
  if (dynamic_cast<const InvalidHandle*>(&failure)) return PIE_ERR_INVALID_HANDLE;
  if (dynamic_cast<const std::invalid_argument*>(&failure) || dynamic_cast<const std::out_of_range*>(&failure)) {
    return PIE_ERR_INVALID_ARGUMENT;
  }
  return PIE_ERR_OTHER;
}

// Runs `call` on the pool; reports terminations to Python (taking the GIL) and errors as codes.
template <typename Call>
int api_pool_call(PieControlPool* pool, char* error, size_t error_size, Call&& call) {
  std::vector<Termination> terminations;
  int status = PIE_OK;
  try {
    call(*pool->pool->pool, terminations);
  } catch (const std::exception& failure) {
    copy_error(failure.what(), error, error_size);
    status = api_status_of(failure);
  }
  if (!terminations.empty()) {
    py::gil_scoped_acquire acquire;
    pool->pool->report(terminations);
  }
  return status;
}

PieControlPool* api_pool_from_python(PyObject* object) {
  try {
    PagePoolHandle* pool = py::cast<PagePoolHandle*>(py::handle(object));
    Py_INCREF(object);
    return new PieControlPool{object, pool};
  } catch (py::cast_error&) {
    PyErr_SetString(PyExc_TypeError, "expected a pie.control.PagePool");
    return nullptr;
  }
}

void api_pool_release(PieControlPool* pool) {
  Py_DECREF(pool->owner);
  delete pool;
}

int api_pool_allocate(PieControlPool* pool, uint64_t instance_id, uint32_t count, uint32_t* out_handles, char* error,
                      size_t error_size) {
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>& t) {
    std::vector<uint32_t> handles = p.allocate(instance_id, count, t);
    std::copy(handles.begin(), handles.end(), out_handles);
  });
}

int api_pool_free(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count, char* error,
                  size_t error_size) {
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>&) {
    p.free(instance_id, std::vector<uint32_t>(handles, handles + count));
  });
}

int api_pool_resolve(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                     uint32_t* out_pages, char* error, size_t error_size) {
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>&) {
    std::vector<uint32_t> pages = p.resolve(instance_id, std::vector<uint32_t>(handles, handles + count));
    std::copy(pages.begin(), pages.end(), out_pages);
  });
}

int api_pool_fork(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                  uint32_t* out_handles, char* error, size_t error_size) {
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>&) {
    std::vector<uint32_t> forked = p.fork(instance_id, std::vector<uint32_t>(handles, handles + count));
    std::copy(forked.begin(), forked.end(), out_handles);
  });
}

int api_pool_prepare_write(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                           uint32_t* out_src_pages, uint32_t* out_dst_pages, size_t* out_num_copies, char* error,
                           size_t error_size) {
  *out_num_copies = 0;
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>& t) {
    std::vector<PageCopy> copies = p.prepare_write(instance_id, std::vector<uint32_t>(handles, handles + count), t);
    for (size_t i = 0; i < copies.size(); ++i) {
      out_src_pages[i] = copies[i].src_page;
      out_dst_pages[i] = copies[i].dst_page;
    }
    *out_num_copies = copies.size();
  });
}

int api_pool_resolve_pinned(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                            uint32_t* out_pages, void* out_pins, char* error, size_t error_size) {
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>&) {
    std::vector<uint32_t> pages =
        p.resolve_pinned(instance_id, std::vector<uint32_t>(handles, handles + count), *static_cast<PagePins*>(out_pins));
    std::copy(pages.begin(), pages.end(), out_pages);
  });
}

int api_pool_prepare_write_pinned(PieControlPool* pool, uint64_t instance_id, const uint32_t* handles, size_t count,
                                  uint32_t* out_src_pages, uint32_t* out_dst_pages, size_t* out_num_copies,
                                  void* out_pins, char* error, size_t error_size) {
  *out_num_copies = 0;
  return api_pool_call(pool, error, error_size, [&](PagePool& p, std::vector<Termination>& t) {
    std::vector<PageCopy> copies = p.prepare_write(instance_id, std::vector<uint32_t>(handles, handles + count), t,
                                                   static_cast<PagePins*>(out_pins));
    for (size_t i = 0; i < copies.size(); ++i) {
      out_src_pages[i] = copies[i].src_page;
      out_dst_pages[i] = copies[i].dst_page;
    }
    *out_num_copies = copies.size();
  });
}

const PieControlApi kControlApi = {
    PIE_CONTROL_API_VERSION, &api_queue_from_python, &api_queue_release, &api_submit, &api_synchronize,
    &api_future_wait, &api_future_status, &api_future_command_id, &api_future_result, &api_future_error,
    &api_future_release, &api_future_to_python, &api_pool_from_python, &api_pool_release, &api_pool_allocate,
    &api_pool_free, &api_pool_resolve, &api_pool_fork, &api_pool_prepare_write, &api_submit_forward,
    &api_submit_copies, &api_pool_resolve_pinned, &api_pool_prepare_write_pinned,
};

std::optional<Clock::duration> to_timeout(std::optional<double> seconds) {
  if (!seconds) return std::nullopt;
  if (*seconds < 0) throw std::invalid_argument("timeout must be >= 0 seconds");
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(*seconds));
}

[[noreturn]] void raise_timeout(const std::string& message) {
  PyErr_SetString(PyExc_TimeoutError, message.c_str());
  throw py::error_already_set();
}

// Owns the scheduler for Python: stopping it when the Python object goes away breaks the
// scheduler <-> queue reference cycle and wakes any thread blocked in take().
struct SchedulerHandle {
  std::shared_ptr<Scheduler> scheduler;
  explicit SchedulerHandle(std::shared_ptr<Scheduler> created) : scheduler(std::move(created)) {}
  SchedulerHandle(const SchedulerHandle&) = delete;
  SchedulerHandle& operator=(const SchedulerHandle&) = delete;
  ~SchedulerHandle() {
    if (scheduler) scheduler->stop("the Scheduler object was destroyed");
  }
};

py::dict pool_stats_dict(const PoolStats& stats) {
  py::dict instances;
  for (const InstanceUsage& usage : stats.instances) {
    py::dict entry;
    entry["num_handles"] = usage.num_handles;
    entry["quota"] = usage.quota;
    entry["num_exports"] = usage.num_exports;
    entry["terminated"] = usage.terminated;
    instances[py::int_(usage.instance_id)] = entry;
  }
  py::dict result;
  result["num_pages"] = stats.num_pages;
  result["page_size"] = stats.page_size;
  result["num_used"] = stats.num_used;
  result["num_free"] = stats.num_free;
  result["num_exported"] = stats.num_exported;
  result["num_shared"] = stats.num_shared;
  result["num_pinned"] = stats.num_pinned;
  result["num_exports"] = stats.num_exports;
  result["num_terminations"] = stats.num_terminations;
  result["num_evictions"] = stats.num_evictions;
  result["num_cached"] = stats.num_cached;
  result["num_cache_hits"] = stats.num_cache_hits;
  result["num_cache_evictions"] = stats.num_cache_evictions;
  result["instances"] = instances;
  py::list exports;
  for (const ExportInfo& e : stats.exports) {
    py::dict entry;
    entry["name"] = e.name;
    entry["client"] = e.client;
    entry["owner"] = e.owner;
    entry["owner_alive"] = e.owner_alive;
    entry["ownerless"] = !e.client_alive;
    entry["shared"] = e.shared;
    entry["persistent"] = e.persistent;
    entry["num_pages"] = e.num_pages;
    entry["idle_s"] = e.idle_s;
    exports.append(entry);
  }
  result["exports"] = exports;
  py::dict clients;
  for (const auto& usage : stats.clients) {
    py::dict entry;
    entry["num_handles"] = usage.num_handles;
    entry["quota"] = usage.quota;
    entry["num_instances"] = usage.num_instances;
    entry["num_export_pages"] = usage.num_export_pages;
    clients[py::int_(usage.client)] = entry;
  }
  result["clients"] = clients;
  return result;
}

py::dict scheduler_stats_dict(const SchedulerStats& stats) {
  py::dict result;
  result["num_submitted"] = stats.num_submitted;
  result["num_dispatched"] = stats.num_dispatched;
  result["num_completed"] = stats.num_completed;
  result["num_failed"] = stats.num_failed;
  result["num_cancelled"] = stats.num_cancelled;
  result["num_batches"] = stats.num_batches;
  result["num_pending"] = stats.num_pending;
  result["num_in_flight"] = stats.num_in_flight;
  result["num_queues"] = stats.num_queues;
  result["high_water"] = stats.high_water;
  return result;
}

}  // namespace

// A Python object held by C++ state that may be dropped on a thread without the GIL (a generation
// stream's hooks): released with the GIL taken.
using PyRef = std::shared_ptr<py::object>;
PyRef hold_python(py::object object) {
  return PyRef(new py::object(std::move(object)), [](py::object* held) {
    if (!Py_IsInitialized()) {
      held->release();
      delete held;
      return;
    }
    py::gil_scoped_acquire acquire;
    delete held;
  });
}

// The hooks of a stream started from Python: terminations reported to the pool's on_terminate, and
// the optional grammar and page-mask callables (run with the GIL; their errors end the stream).
StreamHooks python_stream_hooks(const py::object& pool_object, PagePoolHandle& pool, const py::object& grammar,
                                const py::object& page_masks) {
  StreamHooks hooks;
  PyRef pool_ref = hold_python(pool_object);  // keeps the handle (and its on_terminate) alive
  PagePoolHandle* handle = &pool;
  hooks.report_terminations = [pool_ref, handle](const std::vector<Termination>& terminations) {
    py::gil_scoped_acquire acquire;
    handle->report(terminations);
  };
  if (!grammar.is_none()) {
    PyRef fn = hold_python(grammar);
    hooks.grammar = [fn](uint32_t token) {
      py::gil_scoped_acquire acquire;
      try {
        py::tuple out = (*fn)(token).cast<py::tuple>();
        GrammarStep step;
        step.accepted = out[0].cast<bool>();
        step.terminated = out[1].cast<bool>();
        step.next_mask = out[2].cast<std::vector<uint32_t>>();
        return step;
      } catch (py::error_already_set& error) {
        throw std::runtime_error(error.what());  // no Python object leaves the GIL's scope
      } catch (py::cast_error& error) {
        throw std::runtime_error(std::string("the grammar hook must return (accepted, terminated, mask): ") +
                                 error.what());
      }
    };
  }
  if (!page_masks.is_none()) {
    PyRef fn = hold_python(page_masks);
    hooks.fold_page_masks = [fn](const std::vector<uint32_t>& handles, size_t kv_len, size_t t,
                                 std::vector<std::vector<uint32_t>>& mask) {
      py::gil_scoped_acquire acquire;
      try {
        py::object rows = (*fn)(handles, kv_len, t);
        if (!rows.is_none()) mask = rows.cast<std::vector<std::vector<uint32_t>>>();
      } catch (py::error_already_set& error) {
        throw std::runtime_error(error.what());
      }
    };
  }
  return hooks;
}

py::dict stream_chunk_dict(StreamChunk chunk) {
  py::dict out;
  out["tokens"] = py::cast(chunk.tokens);
  py::list top(chunk.top.size());
  for (size_t i = 0; i < chunk.top.size(); ++i) top[i] = py::make_tuple(py::cast(chunk.top[i].ids), py::cast(chunk.top[i].values));
  out["top"] = top;
  out["end"] = chunk.end == StreamEnd::kRunning ? py::object(py::none()) : py::str(stream_end_name(chunk.end));
  out["message"] = chunk.message;
  out["new_handles"] = py::cast(chunk.new_handles);
  out["num_cached"] = chunk.num_cached;
  return out;
}

PYBIND11_MODULE(_control, m) {
  bind_engine_batch(m);
  m.doc() = "pie control layer: lock-free command queues, the batch scheduler and the KV page pool";
  m.attr("_C_API") = py::capsule(static_cast<const void*>(&kControlApi), PIE_CONTROL_API_CAPSULE);
  m.attr("C_API_VERSION") = PIE_CONTROL_API_VERSION;

  auto& control_error = py::register_exception<ControlError>(m, "ControlError", PyExc_RuntimeError);
  py::register_exception<CommandFailed>(m, "CommandFailed", control_error.ptr());
  py::register_exception<CommandCancelled>(m, "CommandCancelled", control_error.ptr());
  py::register_exception<QueueClosed>(m, "QueueClosed", control_error.ptr());
  py::register_exception<InstanceTerminated>(m, "InstanceTerminated", control_error.ptr());
  py::register_exception<QuotaExceeded>(m, "QuotaExceeded", control_error.ptr());
  py::register_exception<InvalidHandle>(m, "InvalidHandle", control_error.ptr());

  py::enum_<Priority>(m, "Priority", "Queue priority: higher queues fill batches first.")
      .value("LOW", Priority::kLow)
      .value("NORMAL", Priority::kNormal)
      .value("HIGH", Priority::kHigh);

  py::enum_<Policy>(m, "Policy", "Batch dispatch policy (see Scheduler).")
      .value("ADAPTIVE", Policy::kAdaptive)
      .value("EAGER", Policy::kEager)
      .value("FIXED_SIZE", Policy::kFixedSize)
      .value("FIXED_WAIT", Policy::kFixedWait)
      .value("SIZE_OR_WAIT", Policy::kSizeOrWait);

  // ---- forward passes and page copies (forward_command.h) ----
  py::enum_<CommandKind>(m, "CommandKind", "What a command asks of the engine; a batch holds one kind.")
      .value("FORWARD", CommandKind::kForward)
      .value("COPY_PAGES", CommandKind::kCopyPages);

  py::enum_<SamplerKind>(m, "SamplerKind", "What an output asks of its logits row (one enum for C++ and Python).")
      .value("GREEDY", SamplerKind::kGreedy)
      .value("SAMPLE", SamplerKind::kSample)
      .value("TOP_K_DISTRIBUTION", SamplerKind::kTopKDistribution)
      .value("LOGPROBS", SamplerKind::kLogprobs)
      .value("RAW_LOGITS", SamplerKind::kRawLogits);

  py::class_<Sampler>(m, "Sampler", "How one output is chosen from its logits row (see forward_command.h).")
      .def(py::init([](SamplerKind kind, float temperature, uint32_t top_k, float top_p, float min_p,
                       std::optional<uint64_t> seed, std::vector<uint32_t> token_ids) {
             return Sampler{kind, temperature, top_k, top_p, min_p, seed, std::move(token_ids)};
           }),
           py::arg("kind"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0u, py::arg("top_p") = 1.0f,
           py::arg("min_p") = 0.0f, py::arg("seed") = py::none(), py::arg("token_ids") = std::vector<uint32_t>{})
      .def_readwrite("kind", &Sampler::kind)
      .def_readwrite("temperature", &Sampler::temperature)
      .def_readwrite("top_k", &Sampler::top_k, "top-k filter of SAMPLE (0: none); k of TOP_K_DISTRIBUTION")
      .def_readwrite("top_p", &Sampler::top_p)
      .def_readwrite("min_p", &Sampler::min_p)
      .def_readwrite("seed", &Sampler::seed)
      .def_readwrite("token_ids", &Sampler::token_ids, "the tokens of LOGPROBS")
      .def("__eq__",
           [](const Sampler& a, const Sampler& b) {
             return a.kind == b.kind && a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p &&
                    a.min_p == b.min_p && a.seed == b.seed && a.token_ids == b.token_ids;
           })
      .def("__repr__", [](const Sampler& s) {
        return "<Sampler " + py::str(py::cast(s.kind)).cast<std::string>() + ">";
      });

  py::class_<ForwardOutput>(m, "ForwardOutput", "One output a pass asks for: an input row and its sampler.")
      .def(py::init([](uint32_t index, Sampler sampler, std::optional<std::vector<uint32_t>> vocab_mask) {
             return ForwardOutput{index, std::move(sampler), vocab_mask.value_or(std::vector<uint32_t>{})};
           }),
           py::arg("index"), py::arg("sampler"), py::arg("vocab_mask") = py::none())
      .def_readwrite("index", &ForwardOutput::index)
      .def_readwrite("sampler", &ForwardOutput::sampler)
      .def_property(
          "vocab_mask",
          [](const ForwardOutput& o) -> py::object { return o.vocab_mask.empty() ? py::none() : py::cast(o.vocab_mask); },
          [](ForwardOutput& o, std::optional<std::vector<uint32_t>> runs) { o.vocab_mask = runs.value_or(std::vector<uint32_t>{}); },
          "BRLE runs over the vocabulary (allowed first), or None");

  py::class_<OutputValue>(m, "OutputValue", "What the engine wrote for one output.")
      .def_readonly("ids", &OutputValue::ids)
      .def_property_readonly("values", [](const OutputValue& v) {
        return py::array_t<float>(static_cast<py::ssize_t>(v.values.size()), v.values.data());
      }, "(n,) float32 copy");

  py::class_<ForwardLimits>(m, "ForwardLimits", "What forward commands are checked against (the model and engine).")
      .def(py::init([](uint32_t vocab_size, uint32_t page_size, uint32_t num_pages, uint32_t max_tokens,
                       uint32_t num_embed_slots, uint32_t max_position, uint32_t num_adapters) {
             if (num_adapters == 0) throw std::invalid_argument("num_adapters: at least 1 (index 0 = no adapter)");
             return ForwardLimits{vocab_size, page_size, num_pages, max_tokens, num_embed_slots, max_position,
                                  num_adapters};
           }),
           py::arg("vocab_size"), py::arg("page_size"), py::arg("num_pages"), py::arg("max_tokens"),
           py::arg("num_embed_slots") = 0u, py::arg("max_position") = 0u, py::arg("num_adapters") = 1u)
      .def_readonly("vocab_size", &ForwardLimits::vocab_size)
      .def_readonly("page_size", &ForwardLimits::page_size)
      .def_readonly("num_pages", &ForwardLimits::num_pages)
      .def_readonly("max_tokens", &ForwardLimits::max_tokens)
      .def_readonly("num_embed_slots", &ForwardLimits::num_embed_slots)
      .def_readonly("max_position", &ForwardLimits::max_position)
      .def_readonly("num_adapters", &ForwardLimits::num_adapters);

  py::class_<ForwardCommand, std::shared_ptr<ForwardCommand>>(
      m, "ForwardCommand",
      "One forward pass: input tokens at positions over a paged KV sequence, the outputs it asks for, and "
      "the results the engine writes (see forward_command.h).")
      .def(py::init([](std::vector<uint32_t> token_ids, std::vector<uint32_t> positions,
                       std::vector<uint32_t> kv_page_ids, uint32_t kv_last_page_len,
                       std::optional<std::vector<std::vector<uint32_t>>> mask, std::vector<ForwardOutput> outputs,
                       std::optional<std::vector<uint32_t>> embed_slots, uint32_t adapter) {
             auto c = std::make_shared<ForwardCommand>();
             c->adapter = adapter;
             c->token_ids = std::move(token_ids);
             c->positions = std::move(positions);
             c->kv_page_ids = std::move(kv_page_ids);
             c->kv_last_page_len = kv_last_page_len;
             if (mask) c->mask = std::move(*mask);
             c->outputs = std::move(outputs);
             if (embed_slots) c->embed_slots = std::move(*embed_slots);
             return c;
           }),
           py::arg("token_ids"), py::arg("positions"), py::arg("kv_page_ids"), py::arg("kv_last_page_len"),
           py::arg("mask") = py::none(), py::arg("outputs") = std::vector<ForwardOutput>{},
           py::arg("embed_slots") = py::none(), py::arg("adapter") = 0u)
      .def_readwrite("token_ids", &ForwardCommand::token_ids)
      .def_readwrite("adapter", &ForwardCommand::adapter, "The runner's LoRA adapter, 0 = none")
      .def_readwrite("positions", &ForwardCommand::positions)
      .def_readwrite("kv_page_ids", &ForwardCommand::kv_page_ids)
      .def_readwrite("kv_last_page_len", &ForwardCommand::kv_last_page_len)
      .def_property(
          "mask", [](const ForwardCommand& c) -> py::object { return c.mask.empty() ? py::none() : py::cast(c.mask); },
          [](ForwardCommand& c, std::optional<std::vector<std::vector<uint32_t>>> rows) {
            c.mask = rows.value_or(std::vector<std::vector<uint32_t>>{});
          },
          "T BRLE rows over the KV sequence, or None (causal)")
      .def_property(
          "embed_slots",
          [](const ForwardCommand& c) -> py::object { return c.embed_slots.empty() ? py::none() : py::cast(c.embed_slots); },
          [](ForwardCommand& c, std::optional<std::vector<uint32_t>> slots) {
            c.embed_slots = slots.value_or(std::vector<uint32_t>{});
          },
          "(T,) physical input-embedding slots read instead of the tokens, or None")
      .def_readwrite("outputs", &ForwardCommand::outputs)
      .def_readonly("results", &ForwardCommand::results, "One OutputValue per output once the pass has run.")
      .def_property_readonly("num_tokens", &ForwardCommand::num_tokens)
      .def("kv_len", &ForwardCommand::kv_len, py::arg("page_size"), "Tokens in the KV sequence.")
      .def(
          "check",
          [](const ForwardCommand& c, const ForwardLimits& limits) {
            if (auto error = check_forward(c, limits)) throw std::invalid_argument(describe(*error, FieldNaming::kPython));
          },
          py::arg("limits"), "Raise ValueError naming the field when the command may not run under `limits`.")
      .def(
          "write_outputs",
          [](ForwardCommand& c, py::sequence outputs) {
            if (py::len(outputs) != c.outputs.size()) {
              throw std::invalid_argument(std::to_string(py::len(outputs)) + " outputs for " +
                                          std::to_string(c.outputs.size()) + " samplers");
            }
            write_command_outputs(c, outputs, 0);
          },
          py::arg("outputs"),
          "Write the engine's outputs, one per sampler in order (a token id for greedy / sample, (ids, probs) "
          "for a top-k distribution, the logprobs of the asked tokens, the raw logits row), as the results; "
          "the command's pages are unpinned.")
      .def("__repr__", [](const ForwardCommand& c) {
        return "<ForwardCommand " + std::to_string(c.num_tokens()) + " tokens over " +
               std::to_string(c.kv_page_ids.size()) + " pages, " + std::to_string(c.outputs.size()) + " outputs>";
      });

  py::class_<CopySpan>(m, "CopySpan", "Copy `count` token slots of every layer: src_page[src_offset:] -> dst_page[dst_offset:].")
      .def(py::init([](uint32_t src_page, uint32_t src_offset, uint32_t dst_page, uint32_t dst_offset, uint32_t count) {
             return CopySpan{src_page, src_offset, dst_page, dst_offset, count};
           }),
           py::arg("src_page"), py::arg("src_offset"), py::arg("dst_page"), py::arg("dst_offset"), py::arg("count"))
      .def_readonly("src_page", &CopySpan::src_page)
      .def_readonly("src_offset", &CopySpan::src_offset)
      .def_readonly("dst_page", &CopySpan::dst_page)
      .def_readonly("dst_offset", &CopySpan::dst_offset)
      .def_readonly("count", &CopySpan::count);

  py::class_<PageCopyCommand, std::shared_ptr<PageCopyCommand>>(m, "PageCopyCommand",
                                                                "Copies of KV slots, run in order.")
      .def(py::init([](std::vector<CopySpan> spans) {
             auto c = std::make_shared<PageCopyCommand>();
             c->spans = std::move(spans);
             return c;
           }),
           py::arg("spans"))
      .def_readonly("spans", &PageCopyCommand::spans)
      .def(
          "done", [](PageCopyCommand& c) { c.pins.clear(); },
          "The copies have run: their pages are unpinned (they go back to the pool once their holders let go).");

  // ---- Future ----
  py::class_<FutureState, std::shared_ptr<FutureState>>(m, "Future",
                                                        "The completion of one command; wait on it without the GIL.")
      .def_property_readonly("command_id", &FutureState::command_id)
      .def("done", &FutureState::done, "True once resolved (result, failure or cancellation).")
      .def("cancelled", [](const FutureState& f) { return f.status() == FutureStatus::kCancelled; })
      .def("failed", [](const FutureState& f) { return f.status() == FutureStatus::kFailed; })
      .def(
          "wait",
          [](FutureState& f, std::optional<double> timeout) {
            std::optional<Clock::duration> duration = to_timeout(timeout);
            py::gil_scoped_release release;
            std::optional<Clock::time_point> deadline;
            if (duration) deadline = Clock::now() + *duration;
            return f.wait(deadline) != FutureStatus::kPending;
          },
          py::arg("timeout") = py::none(), "Block until resolved or the timeout passes; returns done().")
      .def(
          "result",
          [](FutureState& f, std::optional<double> timeout) -> py::object {
            std::optional<Clock::duration> duration = to_timeout(timeout);
            FutureStatus status;
            {
              py::gil_scoped_release release;
              std::optional<Clock::time_point> deadline;
              if (duration) deadline = Clock::now() + *duration;
              status = f.wait(deadline);
            }
            switch (status) {
              case FutureStatus::kReady: return from_payload(f.result());
              case FutureStatus::kFailed: throw CommandFailed("command " + std::to_string(f.command_id()) + ": " + f.error());
              case FutureStatus::kCancelled: throw CommandCancelled("command " + std::to_string(f.command_id()) + ": " + f.error());
              case FutureStatus::kPending: break;
            }
            raise_timeout("command " + std::to_string(f.command_id()) + " did not complete within " +
                          std::to_string(*timeout) + " s");
          },
          py::arg("timeout") = py::none(),
          "The command's result; raises CommandFailed, CommandCancelled, or TimeoutError.")
      .def("__repr__", [](const FutureState& f) {
        static const char* names[] = {"pending", "ready", "failed", "cancelled"};
        return "<Future command " + std::to_string(f.command_id()) + " " + names[static_cast<int>(f.status())] + ">";
      });

  // ---- CommandQueue ----
  py::class_<CommandQueue, std::shared_ptr<CommandQueue>>(m, "CommandQueue",
                                                          "An in-order command queue of one instance (lock-free submit).")
      .def_property_readonly("id", &CommandQueue::id)
      .def_property_readonly("instance_id", &CommandQueue::instance_id)
      .def_property_readonly("closed", &CommandQueue::closed)
      .def_property("priority", &CommandQueue::priority, &CommandQueue::set_priority)
      .def(
          "submit",
          [](CommandQueue& q, int32_t kind, py::object payload, uint32_t num_tokens, bool depends_on_previous) {
            return q.submit(kind, to_payload(payload), num_tokens, depends_on_previous);
          },
          py::arg("kind"), py::arg("payload") = py::none(), py::arg("num_tokens") = 1,
          py::arg("depends_on_previous") = false,
          "Submit one command; returns its Future. `depends_on_previous` keeps it out of the batch of "
          "the command before it.")
      .def(
          "submit_forward",
          [](CommandQueue& q, std::shared_ptr<ForwardCommand> command, const ForwardLimits& limits,
             bool depends_on_previous) {
            if (auto error = check_forward(*command, limits)) throw std::invalid_argument(describe(*error, FieldNaming::kPython));
            const uint32_t num_tokens = command->num_tokens();
            return q.submit(static_cast<int32_t>(CommandKind::kForward), command_payload(std::move(command)), num_tokens,
                            depends_on_previous);
          },
          py::arg("command"), py::arg("limits"), py::arg("depends_on_previous") = false,
          "Check a ForwardCommand against `limits` (ValueError naming the field) and submit it; returns its "
          "Future, resolved once the engine has written the command's results.")
      .def(
          "submit_forward_all",
          [](CommandQueue& q, std::vector<std::shared_ptr<ForwardCommand>> commands, const ForwardLimits& limits) {
            std::vector<CommandQueue::Submission> submissions;
            submissions.reserve(commands.size());
            for (size_t i = 0; i < commands.size(); ++i) {
              if (auto error = check_forward(*commands[i], limits)) {
                throw std::invalid_argument("commands[" + std::to_string(i) + "]: " +
                                            describe(*error, FieldNaming::kPython));
              }
              const uint32_t num_tokens = commands[i]->num_tokens();
              submissions.push_back({static_cast<int32_t>(CommandKind::kForward), command_payload(commands[i]),
                                     num_tokens, false});
            }
            return q.submit_all(std::move(submissions));
          },
          py::arg("commands"), py::arg("limits"),
          "Check every ForwardCommand (ValueError naming the command and field; nothing is submitted then) "
          "and submit them in one push, so that they can share one batch; returns their Futures.")
      .def("synchronize", &CommandQueue::synchronize,
           "A Future resolved (with None) once every command submitted before it has finished.")
      .def("close", &CommandQueue::close, py::arg("reason") = "closed",
           "Cancel what is pending or in flight; later submits raise QueueClosed. Returns the number cancelled.")
      .def("__repr__", [](const CommandQueue& q) {
        return "<CommandQueue " + std::to_string(q.id()) + " of instance " + std::to_string(q.instance_id()) +
               (q.closed() ? " closed>" : ">");
      });

  // ---- Batch ----
  py::class_<Batch, std::shared_ptr<Batch>>(m, "Batch", "Commands of one kind dispatched together.")
      .def_property_readonly("kind", &Batch::kind)
      .def_property_readonly("num_tokens", &Batch::num_tokens)
      .def_property_readonly("finished", &Batch::finished)
      .def("__len__", &Batch::size)
      .def_property_readonly("payloads",
                             [](const Batch& b) {
                               py::list payloads(b.size());
                               for (size_t i = 0; i < b.size(); ++i) payloads[i] = from_payload(b.command(i).payload);
                               return payloads;
                             })
      .def_property_readonly("command_ids",
                             [](const Batch& b) {
                               std::vector<uint64_t> ids(b.size());
                               for (size_t i = 0; i < b.size(); ++i) ids[i] = b.command(i).id;
                               return ids;
                             })
      .def_property_readonly("queue_ids",
                             [](const Batch& b) {
                               std::vector<uint64_t> ids(b.size());
                               for (size_t i = 0; i < b.size(); ++i) ids[i] = b.command(i).queue_id;
                               return ids;
                             })
      .def_property_readonly("instance_ids",
                             [](const Batch& b) {
                               std::vector<uint64_t> ids(b.size());
                               for (size_t i = 0; i < b.size(); ++i) ids[i] = b.command(i).instance_id;
                               return ids;
                             })
      .def_property_readonly("token_counts",
                             [](const Batch& b) {
                               std::vector<uint32_t> counts(b.size());
                               for (size_t i = 0; i < b.size(); ++i) counts[i] = b.command(i).num_tokens;
                               return counts;
                             })
      .def("resolved", &Batch::resolved, py::arg("index"))
      .def(
          "set_result", [](Batch& b, size_t index, py::object result) { b.set_result(index, to_payload(result)); },
          py::arg("index"), py::arg("result"))
      .def("set_error", &Batch::set_error, py::arg("index"), py::arg("message"))
      .def(
          "complete",
          [](Batch& b, py::sequence results, std::optional<std::vector<size_t>> indices) {
            const size_t num_results = py::len(results);
            if (indices) {
              if (indices->size() != num_results) {
                throw std::invalid_argument("complete: " + std::to_string(num_results) + " results for " +
                                            std::to_string(indices->size()) + " indices");
              }
            } else if (num_results != b.size()) {
              throw std::invalid_argument("complete: " + std::to_string(num_results) +
                                          " results for a batch of " + std::to_string(b.size()));
            }
            std::vector<size_t> targets(num_results);
            std::vector<Payload> payloads;
            payloads.reserve(num_results);
            for (size_t i = 0; i < num_results; ++i) {
              targets[i] = indices ? (*indices)[i] : i;
              payloads.push_back(to_payload(results[i]));
            }
            b.set_results(targets, payloads);
          },
          py::arg("results"), py::arg("indices") = py::none(),
          "Resolve commands with results, in batch order (or at `indices`).")
      .def("complete_all", &Batch::complete_all,
           "Resolve every command not resolved yet with no result (the handler wrote the results into the "
           "commands) and finish the batch.")
      .def("fail_unresolved", &Batch::fail_unresolved, py::arg("message"),
           "Fail every command not resolved yet and finish the batch.")
      .def("finish", &Batch::finish, "Finish the batch; unresolved commands fail.")
      .def("__repr__", [](const Batch& b) {
        return "<Batch kind " + std::to_string(b.kind()) + ", " + std::to_string(b.size()) + " commands, " +
               std::to_string(b.num_tokens()) + " tokens>";
      });

  // ---- Scheduler ----
  py::class_<SchedulerHandle>(m, "Scheduler",
                              "Batches commands across queues by kind (horizontal) and within a queue (vertical).")
      .def(py::init([](uint32_t max_batch_requests, uint32_t max_batch_tokens, Policy policy, uint32_t batch_size,
                       double max_wait, double deadline, uint32_t high_water_window) {
             SchedulerConfig config;
             config.max_batch_requests = max_batch_requests;
             config.max_batch_tokens = max_batch_tokens;
             config.policy = policy;
             config.batch_size = batch_size;
             config.max_wait_seconds = max_wait;
             config.deadline_seconds = deadline;
             config.high_water_window = high_water_window;
             return std::make_unique<SchedulerHandle>(Scheduler::create(config));
           }),
           py::arg("max_batch_requests"), py::arg("max_batch_tokens"), py::arg("policy") = Policy::kAdaptive,
           py::arg("batch_size") = 0, py::arg("max_wait") = 0.0, py::arg("deadline") = 0.002,
           py::arg("high_water_window") = 8)
      .def_property_readonly("max_batch_requests",
                             [](const SchedulerHandle& s) { return s.scheduler->config().max_batch_requests; })
      .def_property_readonly("max_batch_tokens",
                             [](const SchedulerHandle& s) { return s.scheduler->config().max_batch_tokens; })
      .def_property_readonly("policy", [](const SchedulerHandle& s) { return s.scheduler->config().policy; })
      .def_property_readonly("batch_size", [](const SchedulerHandle& s) { return s.scheduler->config().batch_size; })
      .def_property_readonly("max_wait", [](const SchedulerHandle& s) { return s.scheduler->config().max_wait_seconds; })
      .def_property_readonly("deadline", [](const SchedulerHandle& s) { return s.scheduler->config().deadline_seconds; })
      .def_property_readonly("high_water_window",
                             [](const SchedulerHandle& s) { return s.scheduler->config().high_water_window; })
      .def_property_readonly("stopped", [](const SchedulerHandle& s) { return s.scheduler->stopped(); })
      .def(
          "create_queue",
          [](SchedulerHandle& s, uint64_t instance_id, Priority priority) {
            return s.scheduler->create_queue(instance_id, priority);
          },
          py::arg("instance_id"), py::arg("priority") = Priority::kNormal)
      .def(
          "take",
          [](SchedulerHandle& s, std::optional<double> timeout) {
            std::optional<Clock::duration> duration = to_timeout(timeout);
            py::gil_scoped_release release;
            return s.scheduler->take(duration);
          },
          py::arg("timeout") = py::none(),
          "Block (without the GIL) until the policy dispatches a batch; None on timeout or stop.")
      .def(
          "end_instance",
          [](SchedulerHandle& s, uint64_t instance_id, const std::string& reason) {
            return s.scheduler->end_instance(instance_id, reason);
          },
          py::arg("instance_id"), py::arg("reason") = "ended",
          "Close the instance's queues and cancel its futures; returns the number cancelled.")
      .def(
          "stop", [](SchedulerHandle& s, const std::string& reason) { s.scheduler->stop(reason); },
          py::arg("reason") = "stopped")
      .def("stats", [](SchedulerHandle& s) { return scheduler_stats_dict(s.scheduler->stats()); });

  py::class_<PinnedPages>(m, "PinnedPages", "Pages pinned for a command (PagePool.resolve_pinned).")
      .def_readonly("pages", &PinnedPages::pages)
      .def("release", [](PinnedPages& p) { p.pins.reset(); }, "Unpin now (dropping the object does too).");

  // ---- PagePool ----
  py::class_<PagePoolHandle>(m, "PagePool", "Ref-counted accounting of pages 0..num_pages-1 (see page_pool.h).")
      .def(py::init<uint32_t, uint32_t, std::string, py::object>(), py::arg("num_pages"), py::arg("page_size"),
           py::arg("resource") = "KV page", py::arg("on_terminate") = py::none())
      .def_property_readonly("num_pages", [](const PagePoolHandle& p) { return p.pool->num_pages(); })
      .def_property_readonly("page_size", [](const PagePoolHandle& p) { return p.pool->page_size(); })
      .def_property_readonly("resource", [](const PagePoolHandle& p) { return p.pool->resource_name(); })
      .def_readwrite("on_terminate", &PagePoolHandle::on_terminate,
                     "Called as on_terminate(instance_id, message) after the pool terminates an instance.")
      .def(
          "add_instance",
          [](PagePoolHandle& p, uint64_t id, uint32_t quota, uint64_t client, uint32_t client_quota,
             uint64_t cache_scope) { p.pool->add_instance(id, quota, client, client_quota, cache_scope); },
          py::arg("instance_id"), py::arg("quota") = 0, py::arg("client") = 0, py::arg("client_quota") = 0,
          py::arg("cache_scope") = 0,
          "Register an instance: its own quota (0 = unlimited) and its client's (client 0: none), which its "
          "client's instances share; the prefix cache scope it uses (0: none).")
      .def(
          "has_instance", [](const PagePoolHandle& p, uint64_t id) { return p.pool->has_instance(id); },
          py::arg("instance_id"))
      .def(
          "end_instance", [](PagePoolHandle& p, uint64_t id) { return p.pool->end_instance(id); },
          py::arg("instance_id"))
      .def(
          "terminate",
          [](PagePoolHandle& p, uint64_t id, const std::string& reason) { p.pool->terminate(id, reason); },
          py::arg("instance_id"), py::arg("reason"))
      .def(
          "allocate",
          [](PagePoolHandle& p, uint64_t id, uint32_t count) {
            return p.with_terminations([&](std::vector<Termination>& t) { return p.pool->allocate(id, count, t); });
          },
          py::arg("instance_id"), py::arg("count"))
      .def(
          "free", [](PagePoolHandle& p, uint64_t id, const std::vector<uint32_t>& handles) { p.pool->free(id, handles); },
          py::arg("instance_id"), py::arg("handles"))
      .def(
          "resolve",
          [](const PagePoolHandle& p, uint64_t id, const std::vector<uint32_t>& handles) {
            return p.pool->resolve(id, handles);
          },
          py::arg("instance_id"), py::arg("handles"))
      .def(
          "resolve_pinned",
          [](PagePoolHandle& p, uint64_t id, const std::vector<uint32_t>& handles) {
            PinnedPages pinned;
            pinned.pages = p.pool->resolve_pinned(id, handles, pinned.pins);
            return pinned;
          },
          py::arg("instance_id"), py::arg("handles"),
          "The handles' pages, pinned (not handed out again, even once freed) until the returned PinnedPages "
          "is released or dropped.")
      .def(
          "prepare_write",
          [](PagePoolHandle& p, uint64_t id, const std::vector<uint32_t>& handles) {
            std::vector<PageCopy> copies =
                p.with_terminations([&](std::vector<Termination>& t) { return p.pool->prepare_write(id, handles, t); });
            std::vector<std::pair<uint32_t, uint32_t>> pairs;
            pairs.reserve(copies.size());
            for (const PageCopy& copy : copies) pairs.emplace_back(copy.src_page, copy.dst_page);
            return pairs;
          },
          py::arg("instance_id"), py::arg("handles"))
      .def(
          "fork",
          [](PagePoolHandle& p, uint64_t id, const std::vector<uint32_t>& handles) { return p.pool->fork(id, handles); },
          py::arg("instance_id"), py::arg("handles"))
      .def(
          "export_pages",
          [](PagePoolHandle& p, uint64_t id, const std::string& name, const std::vector<uint32_t>& handles,
             bool persistent, bool shared) { p.pool->export_pages(id, name, handles, persistent, shared); },
          py::arg("instance_id"), py::arg("name"), py::arg("handles"), py::arg("persistent") = false,
          py::arg("shared") = false)
      .def(
          "import_pages",
          [](PagePoolHandle& p, uint64_t id, const std::string& name) { return p.pool->import_pages(id, name); },
          py::arg("instance_id"), py::arg("name"))
      .def(
          "cache_lookup",
          [](PagePoolHandle& p, uint64_t id, const std::vector<std::string>& keys) { return p.pool->cache_lookup(id, keys); },
          py::arg("instance_id"), py::arg("keys"),
          "New handles to the cached pages of the longest run keys[:k] found in the instance's cache scope.")
      .def(
          "cache_store",
          [](PagePoolHandle& p, uint64_t id, const std::vector<std::string>& keys, const std::vector<uint32_t>& handles) {
            return p.pool->cache_store(id, keys, handles);
          },
          py::arg("instance_id"), py::arg("keys"), py::arg("handles"),
          "File the pages of the handles under the keys in the instance's cache scope; returns how many were new.")
      .def(
          "cache_clear", [](PagePoolHandle& p, std::optional<uint64_t> scope) { return p.pool->cache_clear(scope); },
          py::arg("scope") = py::none(), "Drop the prefix cache entries of a scope (all when None).")
      .def(
          "unexport",
          [](PagePoolHandle& p, const std::string& name, std::optional<uint64_t> id, uint64_t client) {
            p.pool->unexport(name, id, client);
          },
          py::arg("name"), py::arg("instance_id") = py::none(), py::arg("client") = 0)
      .def(
          "export_names",
          [](const PagePoolHandle& p, std::optional<uint64_t> id) { return p.pool->export_names(id); },
          py::arg("instance_id") = py::none())
      .def(
          "end_client", [](PagePoolHandle& p, uint64_t client) { p.pool->end_client(client); }, py::arg("client"))
      .def(
          "set_export_idle_s", [](PagePoolHandle& p, double seconds) { p.pool->set_export_idle_s(seconds); },
          py::arg("seconds"))
      .def(
          "refcount", [](const PagePoolHandle& p, uint32_t page) { return p.pool->refcount(page); }, py::arg("page"))
      .def(
          "handles", [](const PagePoolHandle& p, uint64_t id) { return p.pool->handles(id); }, py::arg("instance_id"))
      .def("stats", [](const PagePoolHandle& p) { return pool_stats_dict(p.pool->stats()); })
      .def("check_invariants", [](const PagePoolHandle& p) { p.pool->check_invariants(); });

  // ---- load generator ----
  m.def(
      "drive_native_producers",
      [](SchedulerHandle& s, uint32_t num_producers, uint32_t commands_per_producer, uint32_t window, int32_t kind,
         uint64_t first_instance_id) {
        NativeLoadResult result;
        {
          py::gil_scoped_release release;
          result = drive_native_producers(s.scheduler, num_producers, commands_per_producer, window, kind,
                                          first_instance_id);
        }
        py::dict out;
        out["seconds"] = result.seconds;
        out["num_ready"] = result.num_ready;
        out["num_failed"] = result.num_failed;
        out["num_cancelled"] = result.num_cancelled;
        out["mean_latency_ns"] = result.mean_latency_ns;
        return out;
      },
      py::arg("scheduler"), py::arg("num_producers"), py::arg("commands_per_producer"), py::arg("window") = 1,
      py::arg("kind") = 0, py::arg("first_instance_id") = uint64_t{1} << 40,
      "Run native producer threads (no GIL) against the scheduler; a batch loop must be taking batches.");
  m.def(
      "wakeup_round_trip_ns",
      [](uint32_t iterations) {
        py::gil_scoped_release release;
        return wakeup_round_trip_ns(iterations);
      },
      py::arg("iterations") = 20000,
      "The OS floor of a blocking hand-off: mean ns of a condition-variable round trip between two threads.");

  // ---- generation streams ----
  py::class_<TokenBytes, std::shared_ptr<TokenBytes>>(m, "TokenBytes",
                                                       "Each token's text as bytes, by token id (special tokens: b'').")
      .def(py::init([](const std::vector<py::bytes>& table) {
             auto t = std::make_shared<TokenBytes>();
             t->bytes.reserve(table.size());
             for (const py::bytes& b : table) t->bytes.push_back(std::string(b));
             return t;
           }),
           py::arg("table"))
      .def("__len__", [](const TokenBytes& t) { return t.bytes.size(); })
      .def("__getitem__", [](const TokenBytes& t, size_t i) {
        if (i >= t.bytes.size()) throw py::index_error("token id out of range");
        return py::bytes(t.bytes[i]);
      });

  py::class_<GenerationStream, std::shared_ptr<GenerationStream>>(
      m, "GenerationStream",
      "A decode loop the control layer runs itself (generation_stream.h). Read it with next / poll (dicts: "
      "tokens, top, end (None while running, else eos | stop-tokens | stop-string | length | grammar | "
      "cancelled | failed), message, new_handles and num_cached once ended).")
      .def_static(
          "start",
          [](std::shared_ptr<CommandQueue> queue, py::object pool_object, uint64_t instance_id, const ForwardLimits& limits,
             std::vector<uint32_t> pending, uint32_t num_cached, std::vector<uint32_t> handles, const Sampler& sampler,
             uint32_t max_tokens, std::vector<uint32_t> eos_ids, std::vector<std::vector<uint32_t>> stop_tokens,
             std::vector<std::string> stop_strings, uint32_t top_logprobs, std::shared_ptr<TokenBytes> token_bytes,
             py::object grammar, std::vector<uint32_t> first_mask, py::object page_masks, uint32_t adapter) {
            PagePoolHandle& pool = pool_object.cast<PagePoolHandle&>();
            StreamSpec spec;
            spec.instance_id = instance_id;
            spec.pending = std::move(pending);
            spec.num_cached = num_cached;
            spec.handles = std::move(handles);
            spec.sampler = sampler;
            spec.max_tokens = max_tokens;
            spec.eos_ids = std::move(eos_ids);
            spec.stop_tokens = std::move(stop_tokens);
            spec.stop_strings = std::move(stop_strings);
            spec.top_logprobs = top_logprobs;
            spec.first_mask = std::move(first_mask);
            spec.adapter = adapter;
            StreamHooks hooks = python_stream_hooks(pool_object, pool, grammar, page_masks);
            std::shared_ptr<PagePool> shared_pool = pool.pool;
            return GenerationStream::start(std::move(spec), std::move(queue), std::move(shared_pool), limits,
                                           std::move(token_bytes), std::move(hooks));
          },
          py::arg("queue"), py::arg("pool"), py::arg("instance_id"), py::arg("limits"), py::arg("pending"),
          py::arg("num_cached"), py::arg("handles"), py::arg("sampler"), py::arg("max_tokens"),
          py::arg("eos_ids") = std::vector<uint32_t>{}, py::arg("stop_tokens") = std::vector<std::vector<uint32_t>>{},
          py::arg("stop_strings") = std::vector<std::string>{}, py::arg("top_logprobs") = 0,
          py::arg("token_bytes") = nullptr, py::arg("grammar") = py::none(),
          py::arg("first_mask") = std::vector<uint32_t>{}, py::arg("page_masks") = py::none(),
          py::arg("adapter") = 0u,
          "Starts a stream on `queue` over the instance's pages in `pool` and submits its first pass. "
          "grammar(token) -> (accepted, terminated, next_mask); page_masks(handles, kv_len, t) -> mask rows or None.")
      .def(
          "next",
          [](GenerationStream& s, std::optional<double> timeout) {
            StreamChunk chunk;
            {
              py::gil_scoped_release release;
              chunk = s.next(timeout ? *timeout : -1.0);
            }
            return stream_chunk_dict(std::move(chunk));
          },
          py::arg("timeout") = py::none(), "Blocks until a token is ready or the stream has ended (or the timeout).")
      .def("poll", [](GenerationStream& s) { return stream_chunk_dict(s.poll()); })
      .def("cancel", &GenerationStream::cancel, "Ends the stream after the pass in flight.")
      .def(
          "wait",
          [](GenerationStream& s, std::optional<double> timeout) {
            py::gil_scoped_release release;
            return s.wait(timeout ? *timeout : -1.0);
          },
          py::arg("timeout") = py::none(), "Blocks until the stream has ended; True if it has.")
      .def_property_readonly("ended", &GenerationStream::ended)
      .def_property_readonly("generated", &GenerationStream::generated, "Every token generated so far.")
      .def_property_readonly("instance_id", &GenerationStream::instance_id);
  m.def("step_seed", &step_seed, py::arg("seed"), py::arg("step"),
        "The seed of a seeded stream's step-th token ((seed * 1000003 + step) mod 2**64, low 63 bits).");
}
