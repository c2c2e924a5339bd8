"""The control plane of one model: scheduler, KV page pool, embedding slot pool and engine loop.

Instances are opened and ended here, so that however one ends (normally, by a trap, by pool
exhaustion, by its client going away) everything it holds is released in every part at once:
its queues close and its futures are cancelled, its pages and embedding slots return to the pools
(exports it marked persistent stay).

>>> plane = ControlPlane.for_runner(runner)                        # doctest: +SKIP
>>> with plane:                                                    # doctest: +SKIP
...     instance = plane.open_instance()
...     queue = plane.create_queue(instance)
...     handles = plane.kv_pages.allocate(instance, 2)
...     pages = plane.kv_pages.resolve(instance, handles)       # physical ids for ForwardRequest
...     result = queue.submit(CommandKind.FORWARD, request, num_tokens=len(request.token_ids)).result()
...     plane.end_instance(instance)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Mapping

from pie.control._control import CommandQueue, InstanceTerminated, PagePool, Priority, Scheduler
from pie.control.config import SchedulerConfig
from pie.control.engine_loop import EngineLoop, Handler
from pie.control.kinds import CommandKind


class ControlPlane:
    def __init__(self, handlers: Mapping[int, Handler], *, num_pages: int, page_size: int, max_batch_requests: int,
                 max_batch_tokens: int, scheduler_config: SchedulerConfig = SchedulerConfig(),
                 num_embed_slots: int = 0, on_terminate: Callable[[int, str], None] | None = None):
        """`on_terminate(instance_id, message)` is told when a pool terminates an instance (after the
        plane has already released it everywhere), so the runtime can stop it and tell its client."""
        self.scheduler: Scheduler = scheduler_config.build(max_batch_requests, max_batch_tokens)
        self.kv_pages = PagePool(num_pages, page_size, "KV page", self._on_pool_termination)
        self.embed_slots = PagePool(num_embed_slots, 1, "embedding slot", self._on_pool_termination) \
            if num_embed_slots > 0 else None
        self.loop = EngineLoop(self.scheduler, handlers)
        self._on_terminate = on_terminate
        self._next_instance_id = itertools.count(1)
        self._lock = threading.Lock()
        self._live: set[int] = set()
        self.terminations: dict[int, str] = {}  # instance id -> why it was terminated (until it ends)

    @classmethod
    def for_runner(cls, runner: Any, scheduler_config: SchedulerConfig = SchedulerConfig(),
                   handlers: Mapping[int, Handler] | None = None, **kwargs: Any) -> "ControlPlane":
        """A plane sized by a model runner (page_size, num_pages, max_batch_requests, max_batch_tokens);
        the runner handles FORWARD unless `handlers` says otherwise."""
        all_handlers: dict[int, Handler] = {CommandKind.FORWARD: runner}
        all_handlers.update(handlers or {})
        return cls(all_handlers, num_pages=runner.num_pages, page_size=runner.page_size,
                   max_batch_requests=runner.max_batch_requests, max_batch_tokens=runner.max_batch_tokens,
                   scheduler_config=scheduler_config, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ControlPlane":
        self.loop.start()
        return self

    def stop(self, reason: str = "the control plane stopped") -> None:
        self.loop.stop()
        self.scheduler.stop(reason)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- instances --------------------------------------------------------------------------
    def open_instance(self, kv_quota: int = 0, embed_quota: int = 0) -> int:
        """A new instance id, registered with the pools (quotas: 0 = unlimited)."""
        with self._lock:
            instance_id = next(self._next_instance_id)
            self._live.add(instance_id)
        self.kv_pages.add_instance(instance_id, kv_quota)
        if self.embed_slots is not None:
            self.embed_slots.add_instance(instance_id, embed_quota)
        return instance_id

    def create_queue(self, instance_id: int, priority: Priority = Priority.NORMAL) -> CommandQueue:
        with self._lock:
            if instance_id not in self._live:
                why = self.terminations.get(instance_id)
                raise ValueError(why or f"instance {instance_id} is not open")
        return self.scheduler.create_queue(instance_id, priority)

    def end_instance(self, instance_id: int, reason: str = "ended") -> None:
        """Ends the instance however it ended; releases everything it holds. Idempotent."""
        with self._lock:
            self._live.discard(instance_id)
            self.terminations.pop(instance_id, None)
        self.scheduler.end_instance(instance_id, reason)
        for pool in self._pools():
            if pool.has_instance(instance_id):
                pool.end_instance(instance_id)

    def terminate_instance(self, instance_id: int, reason: str) -> None:
        """Stops the instance now (a trap, its client went away): everything is released, and its
        later pool calls raise InstanceTerminated until end_instance."""
        self._terminate_everywhere(instance_id, f"instance {instance_id} terminated: {reason}")

    def _pools(self) -> list[PagePool]:
        return [self.kv_pages] + ([self.embed_slots] if self.embed_slots is not None else [])

    def _terminate_everywhere(self, instance_id: int, message: str) -> None:
        with self._lock:
            if instance_id in self.terminations or instance_id not in self._live:
                return
            self._live.discard(instance_id)
            self.terminations[instance_id] = message
        self.scheduler.end_instance(instance_id, message)
        for pool in self._pools():
            if pool.has_instance(instance_id):
                try:
                    pool.terminate(instance_id, message)
                except InstanceTerminated:  # the pool that reported the termination
                    pass
        if self._on_terminate is not None:
            self._on_terminate(instance_id, message)

    def _on_pool_termination(self, instance_id: int, message: str) -> None:
        self._terminate_everywhere(instance_id, message)

    # ---- counters ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for tests and the server's status: scheduler, KV pages, embedding slots."""
        return {
            "scheduler": self.scheduler.stats(),
            "kv_pages": self.kv_pages.stats(),
            "embed_slots": self.embed_slots.stats() if self.embed_slots is not None else None,
            "live_instances": sorted(self._live),
        }
