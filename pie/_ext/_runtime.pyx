# cython: language_level=3, boundscheck=False, wraparound=False
# distutils: language = c++
"""Cython shim of the application layer (csrc/runtime): host functions registered on wasmtime component
linker instances through the wasmtime C API, the C++ state of each instance (csrc/runtime/instance_state.h),
and the Python conversion of cold calls. Private: used through pie.runtime."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, int32_t, int8_t, int16_t, uint16_t
from libc.stdlib cimport malloc, free
from libc.string cimport strlen
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr, make_shared
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "wasmtime_c.h" namespace "pie_wt":
    cdef struct wasm_byte_vec_t:
        size_t size
        uint8_t* data
    cdef struct val_t
    cdef struct record_entry_t
    cdef struct vallist_t:
        size_t size
        val_t* data
    cdef struct valrecord_t:
        size_t size
        record_entry_t* data
    cdef struct valvariant_t:
        wasm_byte_vec_t discriminant
        val_t* val
    cdef struct valresult_t:
        cbool is_ok
        val_t* val
    cdef union valunion_t:
        cbool boolean
        int8_t s8
        uint8_t u8
        int16_t s16
        uint16_t u16
        int32_t s32
        uint32_t u32
        int64_t s64
        uint64_t u64
        float f32
        double f64
        uint32_t character
        wasm_byte_vec_t string
        vallist_t list
        valrecord_t record
        vallist_t tuple
        valvariant_t variant
        wasm_byte_vec_t enumeration
        val_t* option
        valresult_t result
    cdef struct val_t:
        uint8_t kind
        valunion_t of
    cdef struct record_entry_t:
        wasm_byte_vec_t name
        val_t val
    ctypedef void* (*func_callback_t)(void*, void*, const void*, val_t*, size_t, val_t*, size_t)
    ctypedef void (*finalizer_t)(void*)
    cdef struct Api:
        void (*byte_vec_new)(wasm_byte_vec_t*, size_t, const uint8_t*)
        void (*vallist_new_uninit)(vallist_t*, size_t)
        void (*valrecord_new_uninit)(valrecord_t*, size_t)
        val_t* (*val_new)(val_t*)
        void* (*error_new)(const char*)
        void* (*linker_instance_add_func)(void*, const char*, size_t, func_callback_t, void*, finalizer_t)
        void (*error_message)(const void*, wasm_byte_vec_t*)
        void (*byte_vec_delete)(wasm_byte_vec_t*)
        void (*error_delete)(void*)
    const char* load_api(const char* path)
    const Api& api()


cdef extern from "Python.h":
    void* PyCapsule_Import(const char* name, int no_block) except? NULL


cdef extern from "control_api.h":
    ctypedef struct PieControlQueue:
        pass
    ctypedef struct PieControlPool:
        pass
    ctypedef struct PieControlApi:
        uint32_t version
        PieControlQueue* (*queue_from_python)(PyObject*)
        void (*queue_release)(PieControlQueue*)
        PieControlPool* (*pool_from_python)(PyObject*)
        void (*pool_release)(PieControlPool*)
    int PIE_CONTROL_API_VERSION


cdef extern from "forward_command.h" namespace "pie::control":
    cdef cppclass ForwardLimits:
        uint32_t vocab_size, page_size, num_pages, max_tokens, num_embed_slots, max_position, num_adapters


cdef extern from "instance_state.h" namespace "pie_rt":
    cdef cppclass ControlLink:
        const PieControlApi* api
        PieControlQueue* queue
        PieControlPool* pool
        PieControlPool* embed_pool
    cdef cppclass CInstanceState "pie_rt::InstanceState":
        CInstanceState(uint64_t, double, ControlLink, ForwardLimits)
        uint64_t id()
        void release(const string&) nogil
        void terminate(const string&) nogil
        cbool terminated() nogil
        string terminate_reason()
        double seconds_left() nogil
        cbool add_queue(uint32_t, PieControlQueue*)
        PieControlQueue* take_queue(uint32_t)
        cbool has_page_masks()
        void apply_page_masks(const vector[uint32_t]&, size_t, size_t, vector[vector[uint32_t]]&) except +
        void* py_owner
        void enable_trace(size_t)
        cbool tracing()
        const vector[CTraceEvent]& trace_events()
        uint64_t trace_dropped()
    cdef cppclass CTraceEvent "pie_rt::InstanceState::TraceEvent":
        uint32_t call
        int64_t start_ns
        int64_t end_ns
        uint32_t num_tokens
        uint32_t batch_size
        uint32_t batch_tokens
        int64_t run_start_ns
        int64_t run_end_ns
    CInstanceState* current_instance() nogil
    void set_current_instance(CInstanceState*) nogil


cdef extern from "host_calls.h" namespace "pie_rt":
    const char* c_register_hot "pie_rt::register_hot"(void*, const char*, const char*)
    const char* c_register_unimplemented "pie_rt::register_unimplemented"(void*, const char*, const char*)
    cbool c_is_hot "pie_rt::is_hot"(const char*, const char*)
    size_t c_num_hot_functions "pie_rt::num_hot_functions"()
    void c_hot_function_calls "pie_rt::hot_function_calls"(size_t, const char**, const char**, unsigned long long*)


# ---- wasmtime library ---------------------------------------------------------------------------

def load(str library_path):
    """Resolves the C API functions from wasmtime-py's already-loaded `_libwasmtime.so`."""
    cdef bytes p = library_path.encode()
    cdef const char* err = load_api(p)
    if err[0] != 0:
        raise RuntimeError(f"wasmtime C API: {err.decode()} ({library_path})")


cdef inline str _check(const char* err, str what):
    if err[0] != 0:
        raise RuntimeError(f"{what}: {err.decode()}")


def is_hot(str iface, str name):
    return c_is_hot(iface.encode(), name.encode())


def _hot_functions():
    """[("iface.name", calls since the process started)] of every hot function, in the C++ table's order."""
    cdef const char* iface
    cdef const char* name
    cdef unsigned long long count
    out = []
    for i in range(c_num_hot_functions()):
        c_hot_function_calls(i, &iface, &name, &count)
        out.append((f"{iface.decode()}.{name.decode()}", count))
    return out


def host_call_counts():
    """{"iface.name": calls since the process started} of every hot function and of every cold function
    called at least once (every instance together)."""
    out = dict(_hot_functions())
    out.update(_cold_call_counts)
    return out


def register_hot(size_t linker_instance, str iface, str name):
    """Registers the C++ implementation of `iface.name` (no GIL, no Python on the call path)."""
    _check(c_register_hot(<void*>linker_instance, iface.encode(), name.encode()), f"register {iface}.{name}")


def register_unimplemented(size_t linker_instance, str name, str call):
    _check(c_register_unimplemented(<void*>linker_instance, name.encode(), call.encode()), f"register {call}")


# ---- cold calls: Python callables ---------------------------------------------------------------

cdef struct ColdEnv:
    PyObject* func     # callable(instance, *args) -> value
    PyObject* result   # result descriptor (see _encode), or None for no result
    PyObject* call     # "iface.name" for error messages


cdef object _decode(val_t* v):
    """A component value as a Python object: record -> tuple of fields in order, variant ->
    (case, payload or None), enum -> str, option -> None or the value, result -> ("ok"|"err", payload)."""
    cdef size_t i
    cdef uint8_t k = v.kind
    if k == 0: return v.of.boolean
    if k == 1: return v.of.s8
    if k == 2: return v.of.u8
    if k == 3: return v.of.s16
    if k == 4: return v.of.u16
    if k == 5: return v.of.s32
    if k == 6: return v.of.u32
    if k == 7: return v.of.s64
    if k == 8: return v.of.u64
    if k == 9: return v.of.f32
    if k == 10: return v.of.f64
    if k == 11: return chr(v.of.character)
    if k == 12: return (<char*>v.of.string.data)[:v.of.string.size].decode("utf-8")
    if k == 13:
        if v.of.list.size and v.of.list.data[0].kind == 2:
            return _decode_u8_list(&v.of.list)
        return [_decode(&v.of.list.data[i]) for i in range(v.of.list.size)]
    if k == 14: return tuple([_decode(&v.of.record.data[i].val) for i in range(v.of.record.size)])
    if k == 15: return tuple([_decode(&v.of.tuple.data[i]) for i in range(v.of.tuple.size)])
    if k == 16:
        return ((<char*>v.of.variant.discriminant.data)[:v.of.variant.discriminant.size].decode(),
                None if v.of.variant.val == NULL else _decode(v.of.variant.val))
    if k == 17: return (<char*>v.of.enumeration.data)[:v.of.enumeration.size].decode()
    if k == 18: return None if v.of.option == NULL else _decode(v.of.option)
    if k == 19:
        return ("ok" if v.of.result.is_ok else "err", None if v.of.result.val == NULL else _decode(v.of.result.val))
    raise TypeError(f"component value kind {k} is not supported by the runtime")


cdef bytes _decode_u8_list(vallist_t* lst):
    """A list<u8> (every element of kind u8: a list's elements share one type) as bytes, in one C loop:
    no Python int per byte."""
    cdef size_t i, n = lst.size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)  # fresh and unshared: filled before anyone sees it
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    for i in range(n):
        p[i] = lst.data[i].of.u8
    return out


cdef void _encode_u8_list(const uint8_t[::1] data, val_t* out) noexcept:
    """A bytes-like value as a list<u8>, in one C loop: no Python int per byte (the component value
    model holds one val per element, so the bytes are spread, not block-copied)."""
    cdef size_t i, n = data.shape[0]
    out.kind = 13
    api().vallist_new_uninit(&out.of.list, n)
    for i in range(n):
        out.of.list.data[i].kind = 2
        out.of.list.data[i].of.u8 = data[i]


cdef void _set_bytes(wasm_byte_vec_t* out, bytes b):
    api().byte_vec_new(out, len(b), <const uint8_t*><char*>b)


cdef void _encode(object desc, object value, val_t* out) except *:
    """Writes `value` of type `desc` into `out`. desc: "bool" | "u8" | "u16" | "u32" | "u64" | "s32" |
    "s64" | "f32" | "f64" | "string" | ("list", elem) | ("option", inner) | ("tuple", (d, ...)) |
    ("record", (("field-name", d), ...)) | ("result", ok_desc | None, err_desc | None) (value ("ok"|"err", x)) |
    ("enum",) (value: the case name)."""
    cdef size_t i, n
    cdef val_t tmp
    if isinstance(desc, str):
        if desc == "u32":
            out.kind = 6; out.of.u32 = value
        elif desc == "string":
            encoded = value.encode("utf-8")  # before the kind is set: a failure leaves `out` untouched
            out.kind = 12; _set_bytes(&out.of.string, encoded)
        elif desc == "bool":
            out.kind = 0; out.of.boolean = bool(value)
        elif desc == "u64":
            out.kind = 8; out.of.u64 = value
        elif desc == "f32":
            out.kind = 9; out.of.f32 = value
        elif desc == "u8":
            out.kind = 2; out.of.u8 = value
        elif desc == "u16":
            out.kind = 4; out.of.u16 = value
        elif desc == "s32":
            out.kind = 5; out.of.s32 = value
        elif desc == "s64":
            out.kind = 7; out.of.s64 = value
        elif desc == "f64":
            out.kind = 10; out.of.f64 = value
        else:
            raise TypeError(f"unknown result type {desc!r}")
        return
    tag = desc[0]
    if tag == "list":
        if desc[1] == "u8" and isinstance(value, (bytes, bytearray, memoryview)):
            _encode_u8_list(value, out)  # the view is taken before `out` is touched: a failure leaves it as is
            return
        n = len(value)
        out.kind = 13
        api().vallist_new_uninit(&out.of.list, n)
        for i in range(n):  # on an error midway, fill the rest so the list stays well-formed
            try:
                _encode(desc[1], value[i], &out.of.list.data[i])
            except BaseException:
                for j in range(i, n):
                    out.of.list.data[j].kind = 0
                    out.of.list.data[j].of.boolean = False
                raise
    elif tag == "option":
        out.kind = 18
        if value is None:
            out.of.option = NULL
        else:
            _encode(desc[1], value, &tmp)
            out.of.option = api().val_new(&tmp)
    elif tag == "tuple":
        n = len(desc[1])
        out.kind = 15
        api().vallist_new_uninit(&out.of.tuple, n)
        for i in range(n):
            _encode(desc[1][i], value[i], &out.of.tuple.data[i])
    elif tag == "record":
        n = len(desc[1])
        out.kind = 14
        api().valrecord_new_uninit(&out.of.record, n)
        for i in range(n):
            name, d = desc[1][i]
            _set_bytes(&out.of.record.data[i].name, name.encode())
            _encode(d, value[i], &out.of.record.data[i].val)
    elif tag == "enum":
        encoded = value.encode("utf-8")
        out.kind = 17
        _set_bytes(&out.of.enumeration, encoded)
    elif tag == "result":
        ok = value[0] == "ok"
        out.kind = 19
        out.of.result.is_ok = ok
        d = desc[1] if ok else desc[2]
        if d is None:
            out.of.result.val = NULL
        else:
            _encode(d, value[1], &tmp)
            out.of.result.val = api().val_new(&tmp)
    else:
        raise TypeError(f"unknown result type {desc!r}")


from time import monotonic_ns as _monotonic_ns  # the steady clock of the C++ trace stamps

_cold_call_counts = {}  # "iface.name" -> calls of that cold function (under the GIL)


cdef void* _cold_cb(void* env, void* context, const void* func_type, val_t* args, size_t nargs,
                    val_t* results, size_t nresults) noexcept with gil:
    cdef ColdEnv* e = <ColdEnv*>env
    cdef CInstanceState* inst = current_instance()
    call = <object>e.call
    _cold_call_counts[call] = _cold_call_counts.get(call, 0) + 1
    if inst != NULL and inst.py_owner != NULL and inst.tracing():
        return _traced_cold_call(e, inst, call, args, nargs, results, nresults)
    return _cold_call(e, inst, call, args, nargs, results, nresults)


cdef void* _traced_cold_call(ColdEnv* e, CInstanceState* inst, object call, val_t* args, size_t nargs,
                             val_t* results, size_t nresults) noexcept:
    """A cold call of a traced instance: recorded with its times by the instance (Instance.trace_cold_call)."""
    start = _monotonic_ns()
    cdef void* trap = _cold_call(e, inst, call, args, nargs, results, nresults)
    try:
        (<object>inst.py_owner).trace_cold_call(call, start, _monotonic_ns(), trap != NULL)
    except BaseException:  # a trace that cannot record never fails the call
        pass
    return trap


cdef void* _cold_call(ColdEnv* e, CInstanceState* inst, object call, val_t* args, size_t nargs,
                      val_t* results, size_t nresults) noexcept:
    cdef bytes msg
    try:
        if inst == NULL or inst.py_owner == NULL:
            raise RuntimeError("no inferlet instance is bound to this thread")
        if inst.terminated():
            raise RuntimeError(inst.terminate_reason().decode("utf-8", "replace"))
        py_args = [_decode(&args[i]) for i in range(nargs)]
        value = (<object>e.func)(<object>inst.py_owner, *py_args)
        if nresults:
            try:
                _encode(<object>e.result, value, &results[0])
            except BaseException:
                # wasmtime drops the result slot even on an error: leave it a valid (bool) value, never a
                # half-built string or list (a partly built one leaks its parts instead of crashing)
                results[0].kind = 0
                results[0].of.boolean = False
                raise
        return NULL
    except BaseException as exc:
        text = str(exc) or type(exc).__name__
        msg = f"{call}: {text}".encode("utf-8", "replace")
        return api().error_new(msg)


cdef void _cold_finalize(void* env) noexcept with gil:
    cdef ColdEnv* e = <ColdEnv*>env
    Py_DECREF(<object>e.func)
    Py_DECREF(<object>e.result)
    Py_DECREF(<object>e.call)
    free(e)


def register_cold(size_t linker_instance, str name, str call, object func, object result_desc):
    """Registers `func(instance, *args)` as the host function `name`; its return value is encoded with
    `result_desc` (None: no result). Exceptions trap with "<call>: <message>"."""
    cdef ColdEnv* e = <ColdEnv*>malloc(sizeof(ColdEnv))
    Py_INCREF(func); Py_INCREF(result_desc); Py_INCREF(call)
    e.func = <PyObject*>func
    e.result = <PyObject*>result_desc
    e.call = <PyObject*>call
    cdef bytes n = name.encode()
    cdef void* err = api().linker_instance_add_func(<void*>linker_instance, n, len(n), _cold_cb, e, _cold_finalize)
    cdef wasm_byte_vec_t m
    if err != NULL:
        api().error_message(err, &m)
        text = (<char*>m.data)[:m.size].decode()
        api().byte_vec_delete(&m)
        api().error_delete(err)
        raise RuntimeError(f"register {call}: {text}")


# ---- the C++ state of an instance ---------------------------------------------------------------

cdef const PieControlApi* _control_api = NULL


cdef const PieControlApi* control_api() except NULL:
    global _control_api
    if _control_api == NULL:
        api = <const PieControlApi*>PyCapsule_Import(b"pie._ext._control._C_API", 0)
        if api.version != PIE_CONTROL_API_VERSION:
            raise RuntimeError(f"the control layer's C API is version {api.version}; the runtime was built "
                               f"for version {PIE_CONTROL_API_VERSION}")
        _control_api = api
    return _control_api


cdef class InstanceState:
    """The C++ state of one running instance: its queues, page handles and passes in flight, on the control
    layer (its queue, the KV page pool and the embedding slot pool, reached through the C API). `bind()`
    makes it the instance of the calling thread (the thread that runs its guest)."""
    cdef shared_ptr[CInstanceState] ptr
    cdef object owner
    cdef ControlLink link
    cdef public object default_queue  # the pie.control CommandQueue behind queue 0

    def __cinit__(self, uint64_t instance_id, double deadline_s, object owner, object queue, object pool,
                  object embed_pool, object limits):
        """queue: a pie.control CommandQueue of this instance; pool / embed_pool: the plane's KV PagePool and
        embedding-slot PagePool (or None); limits: the pie.control ForwardLimits passes are checked against."""
        cdef ForwardLimits c_limits
        c_limits.vocab_size = limits.vocab_size
        c_limits.page_size = limits.page_size
        c_limits.num_pages = limits.num_pages
        c_limits.max_tokens = limits.max_tokens
        c_limits.num_embed_slots = limits.num_embed_slots
        c_limits.max_position = limits.max_position
        c_limits.num_adapters = limits.num_adapters
        self.link.api = control_api()
        self.link.queue = self.link.api.queue_from_python(<PyObject*>queue)
        if self.link.queue == NULL:
            raise TypeError("queue: not a pie.control CommandQueue")
        self.link.pool = self.link.api.pool_from_python(<PyObject*>pool)
        if self.link.pool == NULL:
            self._release_link()
            raise TypeError("pool: not a pie.control PagePool")
        if embed_pool is not None:
            self.link.embed_pool = self.link.api.pool_from_python(<PyObject*>embed_pool)
            if self.link.embed_pool == NULL:
                self._release_link()
                raise TypeError("embed_pool: not a pie.control PagePool")
        self.default_queue = queue
        self.ptr = make_shared[CInstanceState](instance_id, deadline_s, self.link, c_limits)
        self.owner = owner
        self.ptr.get().py_owner = <void*>owner   # borrowed: `owner` is kept alive by this object

    @property
    def id(self):
        return self.ptr.get().id()

    def set_owner(self, object owner):
        """The Python-side instance the cold calls receive (kept alive by this object)."""
        self.owner = owner
        self.ptr.get().py_owner = <void*>owner

    @property
    def terminated(self):
        return self.ptr.get().terminated()

    @property
    def seconds_left(self):
        return self.ptr.get().seconds_left()

    def add_queue(self, uint32_t handle, object queue):
        """Makes the pie.control CommandQueue `queue` this instance's queue `handle` for forward.submit."""
        cdef PieControlQueue* q = self.link.api.queue_from_python(<PyObject*>queue)
        if q == NULL:
            raise TypeError("queue: not a pie.control CommandQueue")
        if not self.ptr.get().add_queue(handle, q):
            self.link.api.queue_release(q)
            raise ValueError(f"queue handle {handle} is taken or the instance has ended")

    def remove_queue(self, uint32_t handle):
        """False if `handle` is not an extra queue of this instance."""
        cdef PieControlQueue* q = self.ptr.get().take_queue(handle)
        if q == NULL:
            return False
        self.link.api.queue_release(q)
        return True

    def enable_trace(self, size_t max_events):
        """Records the instance's hot calls from now on, at most max_events of them (pie.runtime.trace
        builds the Chrome trace)."""
        self.ptr.get().enable_trace(max_events)

    @property
    def tracing(self):
        return self.ptr.get().tracing()

    def trace_events(self):
        """(hot calls: [(name, start_ns, end_ns, pass or None)], dropped): pass = (tokens, batch commands,
        batch tokens, run_start_ns, run_end_ns) for a forward.wait. Steady clock (time.monotonic_ns)."""
        names = [name for name, _ in _hot_functions()]
        cdef const vector[CTraceEvent]* events = &self.ptr.get().trace_events()
        out = []
        for i in range(events.size()):
            e = &events.at(i)
            run = None if e.batch_size == 0 else (e.num_tokens, e.batch_size, e.batch_tokens, e.run_start_ns,
                                                 e.run_end_ns)
            out.append((names[e.call], e.start_ns, e.end_ns, run))
        return out, self.ptr.get().trace_dropped()

    @property
    def has_page_masks(self):
        """Whether any page of the instance has a mask (kv.mask-page)."""
        return self.ptr.get().has_page_masks()

    def fold_page_masks(self, list handles, size_t kv_len, size_t num_tokens):
        """The mask rows (num_tokens BRLE rows over kv_len) of a causal pass over `handles` with the
        instance's page masks applied, or None when none of its pages is masked (a generation stream's
        passes: pie.control.GenerationStream's page_masks hook)."""
        cdef vector[uint32_t] c_handles = handles
        cdef vector[vector[uint32_t]] rows
        self.ptr.get().apply_page_masks(c_handles, kv_len, num_tokens, rows)
        return None if rows.empty() else rows

    def bind(self):
        set_current_instance(self.ptr.get())

    def unbind(self):
        set_current_instance(NULL)

    def terminate(self, str reason):
        cdef string r = reason.encode()
        with nogil:
            self.ptr.get().terminate(r)

    def release(self, str reason="ended"):
        """Drops the instance's futures and queues (its pages are released by the control plane)."""
        cdef string r = reason.encode()
        with nogil:
            self.ptr.get().release(r)
        self.ptr.get().py_owner = NULL
        self.owner = None
        self._release_link()

    cdef void _release_link(self):
        if self.link.api != NULL:
            if self.link.queue != NULL:
                self.link.api.queue_release(self.link.queue)
            if self.link.pool != NULL:
                self.link.api.pool_release(self.link.pool)
            if self.link.embed_pool != NULL:
                self.link.api.pool_release(self.link.embed_pool)
            self.link.queue = NULL
            self.link.pool = NULL
            self.link.embed_pool = NULL

    def __dealloc__(self):
        self.ptr.reset()
        self._release_link()
