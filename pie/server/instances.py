"""The server's instances: launched for a websocket connection or an HTTP request (their owner), their
output and log bridged into the owner's Outbox, a `done` event when they end, terminated with their owner.

Launches run on a small thread pool (compiling a component or reading the Python runtime must not hold
up the event loop). The instance's on_done callback (on its own thread, as it ends) turns into the owner's `done` event,
after every output event of that instance.

Each owner is one client of the runtime (its instances share a page quota, a kv-store and messaging
namespace, their KV exports). When the owner is gone (`end_owner`) its instances are stopped and, once the
last has ended and no launch of it is under way, the runtime forgets the client (Runtime.end_client): its
kv-store goes, its private exports are dropped and its shared ones become ownerless. The server keeps no
copy of what an instance printed: everything goes to the owner's outbox as it comes (keep_output=False).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pie.runtime import resolve_bundled
from pie.server.config import LimitsSection
from pie.server.outbox import Outbox
from pie.server.programs import Program


class LaunchError(ValueError):
    """A launch the server refuses (limits, shutting down, a bad program): the message says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Running:
    instance: Any  # pie.runtime.Instance
    owner: Any
    program: str  # bundled name or program hash
    client: int = 0  # the owner's client id in the runtime
    started: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"instance_id": self.instance.id, "program": self.program, "started": self.started,
                "arguments": list(self.instance.arguments)}


# Events of a traced instance's trace, sent back in its done event (about 15 MB); its recording is bounded
# by it too (each kind of event), the rest counted as dropped.
MAX_TRACE_EVENTS = 100_000
# Prefix cache scopes (docs/prefix_caching.md): launch(cache_scope=CLIENT_CACHE) gives an instance its
# client's own scope, CLIENT_CACHE_SCOPES + the client id (above the server's fixed scopes, 1 for /v1).
CLIENT_CACHE = -1
CLIENT_CACHE_SCOPES = 1 << 32


def stop_instance(inst: Any, reason: str) -> None:
    """Terminates `inst` (at its next host call). Also wakes a pending runtime.receive with the end of
    input: Instance.terminate does not interrupt that wait, and the guest's next call then traps."""
    inst.terminate(reason)
    try:
        inst.send("")
    except queue.Full:  # a full inbox: the pending receive returns at once anyway
        pass


class InstanceManager:
    def __init__(self, runtime: Any, limits: LimitsSection, loop: asyncio.AbstractEventLoop,
                 on_ended: Callable[[str | None, str | None], None] | None = None):
        """on_ended(error, terminate_reason): told on the instance's thread when an instance has ended
        (the server's metrics)."""
        self.runtime = runtime
        self.limits = limits
        self.loop = loop
        self.on_ended = on_ended
        self._lock = threading.Lock()
        self.live: dict[int, Running] = {}
        self.accepting = True
        self.num_launched = 0
        self.num_finished = 0
        self.num_failed = 0
        self.num_slow_client = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pie-launch")
        self._client_ids: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # owner -> client
        self._next_client_id = itertools.count(1)
        self._launching: dict[int, int] = {}  # client -> launches under way (on the executor)
        self._ending: set[int] = set()  # clients whose owner is gone, forgotten once nothing of theirs runs
        self._gone: "weakref.WeakSet[Any]" = weakref.WeakSet()  # owners that ended: they launch nothing more
        self.num_clients_ended = 0

    # ---- launching ------------------------------------------------------------------------------
    async def launch(self, owner: Any, outbox: Outbox, arguments: Sequence[str], *, program: Program | None = None,
                     inferlet: str | Path | None = None, deadline_s: float | None = None, memory_mb: int | None = None,
                     forward_log: bool = True, on_started: Callable[[Any], None] | None = None,
                     trace: bool = False, cache_scope: int = 0) -> Any:
        """Starts an instance of an uploaded program, a bundled inferlet (by name: only those) or the
        configured one (a Path, from the operator's configuration).
        `on_started(instance)` runs on the launching thread before any event of the instance is queued.
        trace: the instance records its Chrome trace (its result's `trace`), within MAX_TRACE_EVENTS.
        cache_scope: the prefix cache it uses (0: none; OPENAI_CACHE_SCOPE for the /v1 routes' instances;
        CLIENT_CACHE: one of its client's own, which no other client sees)."""
        if not self.accepting:
            raise LaunchError("shutting_down", "the server is shutting down and takes no new instances")
        if len(self.live) >= self.limits.max_instances:
            raise LaunchError("busy", f"the server runs its limit of {self.limits.max_instances} instances")
        kwargs: dict[str, Any] = {}
        if deadline_s is not None:
            cap = self.limits.deadline_s
            if deadline_s < 0 or (cap > 0 and (deadline_s == 0 or deadline_s > cap)):
                raise LaunchError("bad_request", f"deadline_s must be in (0, {cap:g}] on this server, got {deadline_s}")
            kwargs["deadline_s"] = float(deadline_s)
        if memory_mb is not None:
            if not 0 < memory_mb <= self.limits.memory_mb:
                raise LaunchError("bad_request", f"memory_mb must be in 1..{self.limits.memory_mb} on this server, "
                                                 f"got {memory_mb}")
            kwargs["memory_mb"] = int(memory_mb)
        if trace:
            kwargs.update(trace=True, trace_max_events=MAX_TRACE_EVENTS)
        if cache_scope:
            kwargs["cache_scope"] = int(cache_scope)
        if not all(isinstance(a, str) for a in arguments):
            raise LaunchError("bad_request", "arguments must be a list of strings")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._launch_sync, owner, outbox, list(arguments), program, inferlet, forward_log, on_started,
            kwargs)

    def _launch_sync(self, owner: Any, outbox: Outbox, arguments: list[str], program: Program | None,
                     inferlet: str | None, forward_log: bool, on_started: Callable[[Any], None] | None,
                     kwargs: dict[str, Any]) -> Any:
        cell: dict[str, Any] = {}
        ready = threading.Event()

        def on_output(message: str) -> None:
            ready.wait()
            inst = cell["inst"]
            if not outbox.put_from_thread(("output", inst.id, message)):
                self._stalled(inst, outbox)

        def on_log(message: str) -> None:
            ready.wait()
            inst = cell["inst"]
            if not outbox.put_from_thread(("log", inst.id, message)):
                self._stalled(inst, outbox)

        def on_done(result: Any) -> None:  # on the instance thread, once it has ended
            ready.wait()
            self._finished(cell["running"], outbox, result)

        with self._lock:
            if owner in self._gone:
                raise LaunchError("gone", "the client that asked for this launch has gone")
            client = self._client_id_locked(owner)
            self._launching[client] = self._launching.get(client, 0) + 1
        try:
            inst, name = self._start(owner, arguments, program, inferlet, kwargs, client,
                                     {"on_output": on_output, "on_log": on_log if forward_log else None,
                                      "on_done": on_done})
            running = Running(inst, owner, name, client)
            with self._lock:
                self.live[inst.id] = running
                self.num_launched += 1
                gone = owner in self._gone  # it went while this launch was under way
            if gone:
                stop_instance(inst, "the client went away")
        finally:
            with self._lock:
                self._launching[client] -= 1
                if not self._launching[client]:
                    del self._launching[client]
            self._end_client_if_done(client)
        self.loop.call_soon_threadsafe(self._empty.clear)
        cell["inst"] = inst
        cell["running"] = running
        if on_started is not None:
            on_started(inst)
        ready.set()
        return inst

    def _start(self, owner: Any, arguments: list[str], program: Program | None, inferlet: str | Path | None,
               kwargs: dict[str, Any], client: int, callbacks: dict[str, Any]) -> tuple[Any, str]:
        """(the started instance, the program's name for listings)."""
        rt = self.runtime
        kwargs = {**kwargs, **callbacks, "client": client, "keep_output": False}
        if kwargs.get("cache_scope") == CLIENT_CACHE:
            kwargs["cache_scope"] = CLIENT_CACHE_SCOPES + client
        try:
            if program is None:  # a client's name is a bundled inferlet; a Path comes from the configuration
                path = inferlet if isinstance(inferlet, Path) else resolve_bundled(inferlet)
                return rt.launch(path, arguments, **kwargs), str(inferlet)
            if program.kind == "python":
                return rt.launch_source(program.source, arguments, filename=program.name, **kwargs), program.hash
            component = rt.load_component(program.data, "program:" + program.hash)
            return rt.launch_component(component, arguments, **kwargs), program.hash
        except ValueError as e:  # InferletNotFound, InvalidComponent, ...
            raise LaunchError("bad_program", str(e)) from None

    def _client_id_locked(self, owner: Any) -> int:
        """The client an owner (a connection, an HTTP request) is to the runtime: its instances share
        limits.kv_pages_per_client, a kv-store and messaging namespace, and their exports."""
        client = self._client_ids.get(owner)
        if client is None:
            client = self._client_ids[owner] = next(self._next_client_id)
        return client

    def _stalled(self, inst: Any, outbox: Outbox) -> None:
        if outbox.closed:
            stop_instance(inst, "the client went away")
            return
        with self._lock:
            self.num_slow_client += 1
        stop_instance(inst, f"slow client: it did not read its messages for {outbox.stall_s:g} s "
                       f"({outbox.capacity} messages queued)")

    def _finished(self, running: Running, outbox: Outbox, result: Any) -> None:
        inst = running.instance
        with self._lock:
            self.live.pop(inst.id, None)
            self.num_finished += 1
            self.num_failed += result.error is not None
            empty = not self.live
        if self.on_ended is not None:
            self.on_ended(result.error, inst.terminate_reason)
        outbox.post_from_thread(("done", inst.id, result))
        self._end_client_if_done(running.client)
        if empty:
            try:
                self.loop.call_soon_threadsafe(self._set_empty_if_empty)
            except RuntimeError:
                pass

    def _set_empty_if_empty(self) -> None:
        if not self.live:
            self._empty.set()

    # ---- queries and control ---------------------------------------------------------------------
    def get(self, instance_id: int, owner: Any) -> Running | None:
        with self._lock:
            running = self.live.get(instance_id)
        return running if running is not None and running.owner is owner else None

    def owned_by(self, owner: Any) -> list[Running]:
        with self._lock:
            return [r for r in self.live.values() if r.owner is owner]

    def end_owner(self, owner: Any, reason: str) -> int:
        """The owner is gone: its instances are stopped (returns how many), it launches nothing more, and
        its client is forgotten by the runtime once the last of them has ended."""
        with self._lock:
            self._gone.add(owner)
            client = self._client_ids.get(owner)
            if client is not None:
                self._ending.add(client)
            running = [r for r in self.live.values() if r.owner is owner]
        for r in running:
            stop_instance(r.instance, reason)
        if client is not None:
            self._end_client_if_done(client)
        return len(running)

    def _end_client_if_done(self, client: int) -> None:
        """Forgets an ending client in the runtime once none of its instances runs or is being launched."""
        with self._lock:
            if client not in self._ending or client in self._launching or \
                    any(r.client == client for r in self.live.values()):
                return
            self._ending.discard(client)
            self.num_clients_ended += 1
        self.runtime.end_client(client)
        self.runtime.clear_cache_scope(CLIENT_CACHE_SCOPES + client)  # its own prefix cache goes too

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"num_live": len(self.live), "num_launched": self.num_launched, "num_finished": self.num_finished,
                    "num_failed": self.num_failed, "num_slow_client": self.num_slow_client,
                    "num_clients_ending": len(self._ending), "num_clients_ended": self.num_clients_ended}

    async def drain(self, grace_s: float, terminate_wait_s: float = 10.0) -> int:
        """Stops taking instances; lets the running ones finish for grace_s seconds, then terminates the
        rest and waits for them. Returns how many were terminated."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._empty.wait(), grace_s)
            return 0
        except asyncio.TimeoutError:
            pass
        with self._lock:
            left = list(self.live.values())
        for r in left:
            stop_instance(r.instance, f"the server is shutting down (grace period of {grace_s:g} s over)")
        try:
            await asyncio.wait_for(self._empty.wait(), terminate_wait_s)
        except asyncio.TimeoutError:
            pass
        return len(left)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
