"""One running inferlet: a wasmtime Store + component instance on its own OS thread.

The thread binds the instance's C++ state (page handles, futures) to itself, so the C++ host calls
find it without the GIL; the guest runs with the GIL released (wasmtime-py calls through ctypes).
However the instance ends (success, error, trap, deadline), everything it holds is released: its
C++ state here, the rest by its `on_end` callback (the Runtime's, which ends it in the control plane).

An Instance is given what it uses: its C++ state, the sandbox it runs in (pie.runtime.runtime.Sandbox),
the services its cold calls reach (pie.runtime.services.InstanceServices) and two callbacks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import wasmtime

from pie.runtime.shared import LimitReached, utf8_size
from pie.runtime.trace import MAX_EVENTS, ColdCallTrace, chrome_trace

log = logging.getLogger(__name__)


@dataclass
class InstanceResult:
    instance_id: int
    error: str | None  # None: success; else one line naming what failed
    output: str  # everything the instance sent (print included), in order
    return_value: str | None
    log: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: instantiate, run, total
    trace: dict | None = None  # launched with trace=True: its Chrome trace (pie.runtime.trace)

    @property
    def ok(self) -> bool:
        return self.error is None


class InstanceError(RuntimeError):
    """An inferlet ended with an error (the message names the call or the exception)."""


def explain_wasm_error(e: BaseException, deadline_s: float, elapsed: float) -> str:
    """One line for a trap / wasmtime error: our host-call message if there is one."""
    text = str(e).strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if "interrupt" in text and deadline_s and elapsed >= deadline_s * 0.9:
        return f"deadline exceeded: the instance ran for {elapsed:.2f} s (limit {deadline_s:g} s)"
    for l in lines:  # host calls trap with "<iface>.<func>: ..." or "not implemented yet: ..."
        if l.startswith("not implemented yet:") or (": " in l and "." in l.split(": ", 1)[0]
                                                     and " " not in l.split(": ", 1)[0]):
            return l
    return lines[0] if lines else type(e).__name__


class Instance:
    def __init__(self, instance_id: int, state: Any, component: Any, arguments: Sequence[str], *, services: Any,
                 sandbox: Any, source: str | None = None, filename: str = "inferlet.py", deadline_s: float,
                 memory_mb: int, http_allow: Sequence[str] = (), http_timeout_s: float = 30.0,
                 http_max_body_bytes: int = 16 << 20, on_output: Callable[[str], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_done: Callable[[InstanceResult], None] | None = None,
                 on_terminate: Callable[[int, str], None] | None = None,
                 on_end: Callable[["Instance", str], None] | None = None, client: int = 0,
                 keep_output: bool = True, max_kept_output_bytes: int = 64 << 20, inbox_messages: int = 1024,
                 trace: bool = False, trace_max_events: int = MAX_EVENTS, replica: int = 0):
        """state: the instance's pie._ext._runtime.InstanceState; on_terminate(id, reason): told when the
        instance is terminated (to release it in the control plane at once); on_end(instance, reason):
        called on the instance thread once it has ended, before `done` is set. client: who launched it (its
        kv-store and messaging namespace). keep_output: keep what it sends and logs for the result (a
        server that streams it passes False); what is kept is capped at max_kept_output_bytes (UTF-8),
        past which `runtime.send` / `runtime.log` fail. inbox_messages: client messages it holds unread.
        trace: record its host calls, the passes it waited for and its outputs (the result's `trace`): at
        most trace_max_events hot calls and as many other events, later ones counted, not kept.
        replica: the data-parallel replica it runs on (pie/runtime/replicas.py)."""
        self.id = instance_id
        self.replica = replica
        self.state = state
        self.services = services
        self.sandbox = sandbox
        self.component = component
        self.arguments = list(arguments)
        self.source = source
        self.filename = filename
        self.deadline_s = deadline_s
        self.memory_mb = memory_mb
        self.http_allow = tuple(http_allow)  # hosts ("host" or "host:port") http.fetch may reach
        self.http_timeout_s = http_timeout_s  # wall-clock limit of one http.fetch (besides the deadline)
        self.http_max_body_bytes = http_max_body_bytes  # largest response body http.fetch returns
        self.on_output = on_output
        self.on_log = on_log
        self.on_done = on_done  # called on the instance thread with the result, once it has ended
        self.on_terminate = on_terminate
        self.on_end = on_end
        self.client = client
        self.keep_output = keep_output
        self.max_kept_output_bytes = max_kept_output_bytes
        self.kept_output_bytes = 0
        self.messages: list[str] = []  # kept (keep_output) for the result
        self.logs: list[str] = []
        self.return_value: str | None = None
        self.error: str | None = None
        self.timings: dict[str, float] = {}
        self.inbox: "queue.Queue[str]" = queue.Queue(inbox_messages)
        self.queues: dict[int, Any] = {}  # queues.create handles -> pie.control CommandQueue
        self.next_queue_handle = 1
        self.streams: dict[int, Any] = {}  # generation.start handles -> pie.control GenerationStream
        self.next_stream_handle = 1
        self.terminate_reason: str | None = None
        self.cold_trace: ColdCallTrace | None = None  # trace=True: its cold calls and outputs (the hot ones in C++)
        self.started_ns = time.monotonic_ns()
        if trace:
            self.cold_trace = ColdCallTrace(trace_max_events)
            state.enable_trace(trace_max_events)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"pie-instance-{instance_id}", daemon=True)

    # ---- called by host functions (on the instance thread) ----------------------------------------
    def emit(self, message: str) -> None:
        if self.cold_trace is not None:
            self.cold_trace.output(time.monotonic_ns(), utf8_size(message))
        self._keep(self.messages, message)
        if self.on_output is not None:
            self.on_output(message)

    def trace_cold_call(self, call: str, start_ns: int, end_ns: int, trapped: bool) -> None:
        """A cold call of this (traced) instance ended (pie._ext._runtime records it)."""
        if self.cold_trace is not None:
            self.cold_trace.call(call, start_ns, end_ns, trapped)

    def add_log(self, message: str) -> None:
        self._keep(self.logs, message)
        if self.on_log is not None:
            self.on_log(message)

    def _keep(self, kept: list[str], message: str) -> None:
        if not self.keep_output:
            return
        size = utf8_size(message)
        if self.kept_output_bytes + size > self.max_kept_output_bytes:
            raise LimitReached(f"the instance's kept output would reach {self.kept_output_bytes + size} bytes, "
                               f"over its limit (max_kept_output_bytes = {self.max_kept_output_bytes}); a "
                               f"launcher that streams the output keeps none (keep_output=False)")
        self.kept_output_bytes += size
        kept.append(message)

    def receive(self) -> str:
        """Next client message; waits in slices so a termination or the deadline ends the wait."""
        while True:
            left = self.state.seconds_left  # -1: no deadline
            if left != -1.0 and left <= 0:
                raise TimeoutError("the instance's deadline passed while waiting for a client message")
            if self.state.terminated:
                raise RuntimeError(self.terminate_reason or "the instance was terminated")
            try:
                return self.inbox.get(timeout=0.05 if left < 0 else min(left, 0.05))
            except queue.Empty:
                pass

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "Instance":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def send(self, message: str) -> None:
        """A message from the client (read by runtime.receive). Raises queue.Full when the instance holds
        `inbox_messages` unread."""
        self.inbox.put_nowait(message)

    def terminate(self, reason: str) -> None:
        """Stops the instance at its next host call (its pending waits return at once)."""
        self.terminate_reason = reason
        self.state.terminate(reason)
        if self.on_terminate is not None:
            self.on_terminate(self.id, reason)

    def wait(self, timeout: float | None = None) -> InstanceResult:
        if not self.done.wait(timeout):
            raise TimeoutError(f"instance {self.id} did not finish within {timeout} s")
        trace = None
        if self.cold_trace is not None:
            hot, dropped = self.state.trace_events()
            trace = chrome_trace(self.id, self.started_ns, hot, dropped, self.cold_trace)
        return InstanceResult(self.id, self.error, "".join(self.messages), self.return_value, "".join(self.logs),
                              dict(self.timings), trace)

    def _main(self) -> None:
        t0 = self._started
        self.state.bind()
        store = None
        try:
            store = self.sandbox.new_store(self.memory_mb, self.deadline_s)
            instance = self.sandbox.linker.instantiate(store, self.component)
            if self.source is not None:
                func = instance.get_func(store, "exec-source")
                if func is None:
                    raise InstanceError("the Python runtime component does not export exec-source")
                t1 = time.perf_counter()
                self.timings["instantiate"] = t1 - t0
                err = func(store, self.source, self.filename)
            else:
                func = instance.get_func(store, "run")
                if func is None:
                    raise InstanceError("the component does not export `run` (world pie:inferlet/inferlet)")
                t1 = time.perf_counter()
                self.timings["instantiate"] = t1 - t0
                err = func(store)
            self.timings["run"] = time.perf_counter() - t1
            if err is not None:
                self.error = str(err)
        except wasmtime.WasmtimeError as e:
            self.error = explain_wasm_error(e, self.deadline_s, time.perf_counter() - t0)
            if "matching implementation was not found" in str(e):
                self.error = f"not a component of the pie:inferlet world: {self.error}"
        except InstanceError as e:
            self.error = str(e)
        except Exception as e:  # a host-side failure ends this instance only
            self.error = f"{type(e).__name__}: {e}"
        finally:
            reason = "ended" if self.error is None else self.error
            self.state.release(reason)
            for stream in self.streams.values():  # the plane's end_instance ends them; their hooks go now
                stream.cancel()
            self.streams.clear()
            self.state.unbind()
            instance = func = None
            store = None  # drop the store on this thread, before the interpreter may exit
            self.timings["total"] = time.perf_counter() - t0
            if self.on_end is not None:
                try:
                    self.on_end(self, reason)
                except Exception:  # the instance thread's cleanup goes on
                    log.exception("on_end callback of instance %d failed", self.id)
            self.done.set()
            if self.on_done is not None:
                try:
                    self.on_done(self.wait(0))
                except Exception:  # a failing callback must not take the instance thread's cleanup with it
                    log.exception("on_done callback of instance %d failed", self.id)
