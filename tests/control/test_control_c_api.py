"""The C API capsule (csrc/control/control_api.h), called through ctypes as the runtime's C++ would."""

from __future__ import annotations

import ctypes
import gc

import pie._ext._control as compiled
from pie.control import BatchLoop, PagePool, Policy

VOIDP = ctypes.c_void_p
RELEASE = ctypes.CFUNCTYPE(None, VOIDP)
U32P = ctypes.POINTER(ctypes.c_uint32)


class Api(ctypes.Structure):
    # CFUNCTYPE calls release the GIL (these functions must not need it); PYFUNCTYPE ones keep it.
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("queue_from_python", ctypes.PYFUNCTYPE(VOIDP, ctypes.py_object)),
        ("queue_release", ctypes.CFUNCTYPE(None, VOIDP)),
        ("submit", ctypes.CFUNCTYPE(VOIDP, VOIDP, ctypes.c_int32, VOIDP, RELEASE, ctypes.c_uint32, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_size_t)),
        ("synchronize", ctypes.CFUNCTYPE(VOIDP, VOIDP, ctypes.c_char_p, ctypes.c_size_t)),
        ("future_wait", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_double)),
        ("future_status", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP)),
        ("future_command_id", ctypes.CFUNCTYPE(ctypes.c_uint64, VOIDP)),
        ("future_result", ctypes.CFUNCTYPE(VOIDP, VOIDP)),
        ("future_error", ctypes.CFUNCTYPE(ctypes.c_char_p, VOIDP)),
        ("future_release", ctypes.CFUNCTYPE(None, VOIDP)),
        ("future_to_python", ctypes.PYFUNCTYPE(ctypes.py_object, VOIDP)),
        ("pool_from_python", ctypes.PYFUNCTYPE(VOIDP, ctypes.py_object)),
        ("pool_release", ctypes.PYFUNCTYPE(None, VOIDP)),
        ("pool_allocate", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_uint64, ctypes.c_uint32, U32P,
                                           ctypes.c_char_p, ctypes.c_size_t)),
        ("pool_free", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_uint64, U32P, ctypes.c_size_t,
                                       ctypes.c_char_p, ctypes.c_size_t)),
        ("pool_resolve", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_uint64, U32P, ctypes.c_size_t, U32P,
                                          ctypes.c_char_p, ctypes.c_size_t)),
        ("pool_fork", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_uint64, U32P, ctypes.c_size_t, U32P,
                                       ctypes.c_char_p, ctypes.c_size_t)),
        ("pool_prepare_write", ctypes.CFUNCTYPE(ctypes.c_int, VOIDP, ctypes.c_uint64, U32P, ctypes.c_size_t, U32P,
                                                U32P, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p,
                                                ctypes.c_size_t)),
    ]


def load_api() -> Api:
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = VOIDP
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(compiled._C_API, b"pie._ext._control._C_API")
    return Api.from_address(address)


READY, FAILED, CANCELLED = 1, 2, 3


def test_native_submit_and_wait_through_the_capsule(make_scheduler):
    api = load_api()
    assert api.version == compiled.C_API_VERSION == 2  # 2: ForwardCommand carries its batch (traces)
    released = []
    release = RELEASE(lambda address: released.append(address))
    scheduler = make_scheduler(policy=Policy.EAGER)
    queue = scheduler.create_queue(instance_id=42)
    native_queue = api.queue_from_python(queue)
    error = ctypes.create_string_buffer(256)

    seen = []

    def handler(payloads):
        seen.extend(payloads)
        return [{"doubled": p * 2} for p in payloads]

    with BatchLoop(scheduler, {3: handler}):
        futures = [api.submit(native_queue, 3, address, release, 5, 0, error, 256) for address in (1000, 2000)]
        assert all(futures)
        assert [api.future_wait(f, 10.0) for f in futures] == [READY, READY]
    # A native payload reaches Python as its address; the result is the handler's object.
    assert seen == [1000, 2000]
    results = [ctypes.cast(api.future_result(f), ctypes.py_object).value for f in futures]
    assert results == [{"doubled": 2000}, {"doubled": 4000}]
    assert api.future_to_python(futures[0]).result() == {"doubled": 2000}
    assert api.future_command_id(futures[1]) == api.future_command_id(futures[0]) + 1
    gc.collect()
    assert sorted(released) == [1000, 2000]  # each payload released exactly once

    queue.close("instance ended")
    assert api.submit(native_queue, 3, 3000, release, 1, 0, error, 256) is None
    assert b"is closed" in error.value
    assert 3000 in released
    for future in futures:
        api.future_release(future)
    api.queue_release(native_queue)


def test_native_wait_times_out_and_sees_cancellation(make_scheduler):
    api = load_api()
    scheduler = make_scheduler(policy=Policy.EAGER)
    queue = scheduler.create_queue(instance_id=9)
    native_queue = api.queue_from_python(queue)
    error = ctypes.create_string_buffer(128)
    future = api.submit(native_queue, 0, None, RELEASE(0), 1, 0, error, 128)
    assert api.future_wait(future, 0.01) == 0  # pending
    scheduler.end_instance(9, "client went away")
    assert api.future_wait(future, 1.0) == CANCELLED
    assert b"instance 9 ended: client went away" in api.future_error(future)
    api.future_release(future)
    api.queue_release(native_queue)


PIE_OK, PIE_ERR_INVALID_HANDLE, PIE_ERR_QUOTA, PIE_ERR_TERMINATED = 0, 2, 3, 4


def u32s(values):
    return (ctypes.c_uint32 * max(len(values), 1))(*values)


def test_native_page_pool_calls_match_the_python_view():
    api = load_api()
    told = []
    pool = PagePool(8, 4, on_terminate=lambda i, m: told.append(i))
    pool.add_instance(1, quota=6)
    pool.add_instance(2)
    native = api.pool_from_python(pool)
    error = ctypes.create_string_buffer(256)

    handles = u32s([0] * 3)
    assert api.pool_allocate(native, 1, 3, handles, error, 256) == PIE_OK
    assert list(handles) == pool.handles(1)
    pages = u32s([0] * 3)
    assert api.pool_resolve(native, 1, handles, 3, pages, error, 256) == PIE_OK
    assert list(pages) == pool.resolve(1, list(handles))

    forked = u32s([0] * 3)
    assert api.pool_fork(native, 1, handles, 3, forked, error, 256) == PIE_OK
    src, dst, num_copies = u32s([0] * 1), u32s([0] * 1), ctypes.c_size_t(99)
    assert api.pool_prepare_write(native, 1, u32s([forked[2]]), 1, src, dst, ctypes.byref(num_copies),
                                  error, 256) == PIE_OK
    assert num_copies.value == 1 and src[0] == pages[2] and pool.resolve(1, [forked[2]]) == [dst[0]]

    assert api.pool_allocate(native, 1, 1, u32s([0]), error, 256) == PIE_ERR_QUOTA
    assert b"quota of 6" in error.value
    assert api.pool_free(native, 1, u32s([77]), 1, error, 256) == PIE_ERR_INVALID_HANDLE
    assert b"instance 1: KV page handle 77 is not held" in error.value

    # Exhaustion from native code still reaches the Python on_terminate callback.
    assert api.pool_allocate(native, 2, 5, u32s([0] * 5), error, 256) == PIE_ERR_TERMINATED
    assert told == [2] and b"instance 2 terminated" in error.value
    assert api.pool_free(native, 1, handles, 3, error, 256) == PIE_OK
    api.pool_release(native)
    pool.end_instance(1)
    pool.end_instance(2)
    assert pool.stats()["num_used"] == 0
    pool.check_invariants()
