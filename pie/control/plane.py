"""The control plane: a scheduler and its batch loop over a model runner, and the runner's page pools.

Pages are accounted once per runner. Every plane over one runner (a Runtime's, the built-in generate
loop's, a test's) shares the runner's `RunnerPools`: one KV page pool, one embedding-slot pool, one
sequence of instance ids, and one lock under which the runner runs a batch. Each plane has its own
scheduler (its batching policy) and batch loop.

Instances are opened and ended here, so that however one ends (normally, by a trap, by pool
exhaustion, by its client going away) everything it holds is released in every part at once: its
queues close and its futures are cancelled, its pages and embedding slots return to the pools
(exports it marked persistent stay).

>>> plane = ControlPlane.serving(runner).start()                   # doctest: +SKIP
>>> instance = plane.open_instance()                               # doctest: +SKIP
>>> queue = plane.create_queue(instance)                           # doctest: +SKIP
>>> pages = plane.kv_pages.resolve(instance, plane.kv_pages.allocate(instance, 1))  # doctest: +SKIP
>>> command = ForwardCommand([1, 2], [0, 1], pages, 2, outputs=[ForwardOutput(1, Sampler(SamplerKind.GREEDY))])
>>> queue.submit_forward(command, plane.limits).result()           # doctest: +SKIP
>>> command.results[0].ids                                         # doctest: +SKIP
[1234]
>>> plane.end_instance(instance)                                   # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

from pie.control._control import (
    CommandKind,
    CommandQueue,
    ForwardLimits,
    GenerationStream,
    InstanceTerminated,
    PagePool,
    Priority,
    Sampler,
    Scheduler,
    TokenBytes,
)
from pie.control.batch_loop import BatchLoop, Handler
from pie.control.config import SchedulerConfig


_token_tables: "weakref.WeakKeyDictionary[Any, TokenBytes]" = weakref.WeakKeyDictionary()
_token_tables_lock = threading.Lock()


def token_table(model: Any) -> TokenBytes:
    """The model's token byte table (pie.engine.Model.token_bytes) in the control layer's form, made once
    per model: what generation streams search for stop strings."""
    with _token_tables_lock:
        table = _token_tables.get(model)
        if table is None:
            table = _token_tables[model] = TokenBytes(model.token_bytes)
        return table


class RunnerPools:
    """The page pools of one model runner, shared by every control plane over it (see the module doc).

    A pool's termination of an instance (pool exhaustion) is passed to the plane that opened it."""

    _of_runner: "weakref.WeakKeyDictionary[Any, RunnerPools]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, num_pages: int, page_size: int, num_embed_slots: int = 0):
        self.kv_pages = PagePool(num_pages, page_size, "KV page", self._on_termination)
        self.embed_slots = PagePool(num_embed_slots, 1, "embedding slot", self._on_termination) \
            if num_embed_slots > 0 else None
        self.execute_lock = threading.Lock()  # held while the runner runs a batch or copies pages
        self._lock = threading.Lock()
        self._next_instance_id = itertools.count(1)
        self._numbered = False  # an instance id was given out
        self._plane_of: dict[int, ControlPlane] = {}  # open instance -> the plane that opened it

    def number_instances(self, first: int, step: int) -> None:
        """Instance ids from now on: first, first + step, first + 2 step, ... (data-parallel replicas
        number theirs apart, pie/runtime/replicas.py). Only before any instance was opened."""
        if first < 1 or step < 1:
            raise ValueError(f"instance ids start at >= 1 with a step >= 1, got {first}, {step}")
        with self._lock:
            if self._plane_of or self._numbered:
                raise ValueError("the pools have numbered instances already")
            self._next_instance_id = itertools.count(first, step)

    @classmethod
    def of(cls, runner: Any, num_embed_slots: int | None = None) -> "RunnerPools":
        """The runner's pools, made at the first call (sized by its num_pages, page_size and, unless
        given, its embedding table)."""
        with cls._registry_lock:
            pools = cls._of_runner.get(runner)
            if pools is None:
                if num_embed_slots is None:
                    table = getattr(runner, "embeddings", None)
                    num_embed_slots = table.num_slots if table is not None else 0
                pools = cls(runner.num_pages, runner.page_size, num_embed_slots)
                cls._of_runner[runner] = pools
            return pools

    @property
    def all(self) -> list[PagePool]:
        return [self.kv_pages] + ([self.embed_slots] if self.embed_slots is not None else [])

    def open_instance(self, plane: "ControlPlane", kv_quota: int, embed_quota: int, client: int = 0,
                      kv_client_quota: int = 0, kv_cache_scope: int = 0) -> int:
        with self._lock:
            instance_id = next(self._next_instance_id)
            self._numbered = True
            self._plane_of[instance_id] = plane
        self.kv_pages.add_instance(instance_id, kv_quota, client, kv_client_quota, kv_cache_scope)
        if self.embed_slots is not None:
            self.embed_slots.add_instance(instance_id, embed_quota)
        return instance_id

    def end_instance(self, instance_id: int) -> None:
        for pool in self.all:
            if pool.has_instance(instance_id):
                pool.end_instance(instance_id)
        with self._lock:
            self._plane_of.pop(instance_id, None)

    def terminate(self, instance_id: int, message: str) -> None:
        for pool in self.all:
            if pool.has_instance(instance_id):
                try:
                    pool.terminate(instance_id, message)
                except InstanceTerminated:  # the pool that reported the termination
                    pass

    def _on_termination(self, instance_id: int, message: str) -> None:
        with self._lock:
            plane = self._plane_of.get(instance_id)
        if plane is not None:
            plane._terminate_everywhere(instance_id, message)


_running: "weakref.WeakSet[ControlPlane]" = weakref.WeakSet()


@atexit.register
def _stop_running_planes() -> None:
    """At interpreter exit, before daemon threads are torn down: a batch loop blocked in the scheduler
    (native code) must not be killed there (the C++ runtime would abort the process)."""
    for plane in list(_running):
        plane.stop("the interpreter is exiting")


class ControlPlane:
    def __init__(self, handlers: Mapping[int, Handler], *, pools: RunnerPools, max_batch_requests: int,
                 max_batch_tokens: int, scheduler_config: SchedulerConfig = SchedulerConfig(),
                 limits: ForwardLimits | None = None, on_terminate: Callable[[int, str], None] | None = None):
        """`on_terminate(instance_id, message)` is told when a pool terminates an instance of this plane
        (after the plane has already released it everywhere), so the runtime can stop it and tell its
        client. `limits`: what ForwardCommands submitted to this plane are checked against."""
        self.pools = pools
        self.limits = limits
        self.scheduler: Scheduler = scheduler_config.build(max_batch_requests, max_batch_tokens)
        self.loop = BatchLoop(self.scheduler, handlers)
        self._on_terminate = on_terminate
        self._lock = threading.Lock()
        self._live: set[int] = set()
        self.terminations: dict[int, str] = {}  # instance id -> why it was terminated (until it ends)

    @classmethod
    def for_runner(cls, runner: Any, scheduler_config: SchedulerConfig = SchedulerConfig(),
                   handlers: Mapping[int, Handler] | None = None, *, num_embed_slots: int | None = None,
                   limits: ForwardLimits | None = None,
                   on_terminate: Callable[[int, str], None] | None = None) -> "ControlPlane":
        """A plane over `runner`'s pools and within its batch limits (max_batch_requests,
        max_batch_tokens). The runner's own `execute` handles FORWARD payloads unless `handlers` says
        otherwise (a model runner is served with `serving`, whose handlers take ForwardCommands)."""
        pools = RunnerPools.of(runner, num_embed_slots)
        return cls(handlers if handlers is not None else {CommandKind.FORWARD: runner}, pools=pools,
                   max_batch_requests=runner.max_batch_requests, max_batch_tokens=runner.max_batch_tokens,
                   scheduler_config=scheduler_config, limits=limits, on_terminate=on_terminate)

    @classmethod
    def serving(cls, runner: Any, scheduler_config: SchedulerConfig = SchedulerConfig(),
                on_terminate: Callable[[int, str], None] | None = None) -> "ControlPlane":
        """A plane whose batch loop runs ForwardCommands and page copies on the model runner."""
        from pie.control.handlers import forward_handlers

        pools = RunnerPools.of(runner)
        limits = ForwardLimits(vocab_size=runner.vocab_size, page_size=runner.page_size, num_pages=runner.num_pages,
                               max_tokens=runner.max_batch_tokens, max_position=getattr(runner, "max_position", 0),
                               num_embed_slots=pools.embed_slots.num_pages if pools.embed_slots is not None else 0,
                               num_adapters=len(runner.adapters) if hasattr(runner, "adapters") else 1)
        return cls.for_runner(runner, scheduler_config, forward_handlers(runner, pools.execute_lock), limits=limits,
                              on_terminate=on_terminate)

    @property
    def kv_pages(self) -> PagePool:
        return self.pools.kv_pages

    @property
    def embed_slots(self) -> PagePool | None:
        return self.pools.embed_slots

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ControlPlane":
        self.loop.start()
        _running.add(self)
        return self

    def stop(self, reason: str = "the control plane stopped") -> None:
        _running.discard(self)
        self.loop.stop()
        self.scheduler.stop(reason)
        with self._lock:
            live = list(self._live)
        for instance_id in live:  # the pages of instances nobody ended go back to the shared pools
            self.end_instance(instance_id, reason)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- instances --------------------------------------------------------------------------
    def open_instance(self, kv_quota: int = 0, embed_quota: int = 0, client: int = 0, kv_client_quota: int = 0,
                      kv_cache_scope: int = 0) -> int:
        """A new instance id, registered with the pools. Quotas (0 = unlimited) count the KV pages and
        embedding slots it holds; kv_client_quota the KV pages all instances of its client (0: none) hold;
        kv_cache_scope the prefix cache it looks up and fills (0: none; docs/prefix_caching.md)."""
        instance_id = self.pools.open_instance(self, kv_quota, embed_quota, client, kv_client_quota, kv_cache_scope)
        with self._lock:
            self._live.add(instance_id)
        return instance_id

    def create_queue(self, instance_id: int, priority: Priority = Priority.NORMAL) -> CommandQueue:
        with self._lock:
            if instance_id not in self._live:
                why = self.terminations.get(instance_id)
                raise ValueError(why or f"instance {instance_id} is not open")
        return self.scheduler.create_queue(instance_id, priority)

    def start_stream(self, instance_id: int, queue: CommandQueue, *, pending: Sequence[int], num_cached: int,
                     handles: Sequence[int], sampler: Sampler, max_tokens: int, eos_ids: Iterable[int] = (),
                     stop_tokens: Sequence[Sequence[int]] = (), stop_strings: Sequence[str] = (),
                     top_logprobs: int = 0, token_bytes: TokenBytes | None = None,
                     grammar: Callable[[int], tuple[bool, bool, list[int]]] | None = None,
                     first_mask: Sequence[int] = (),
                     page_masks: Callable[[list[int], int, int], Any] | None = None,
                     adapter: int = 0) -> GenerationStream:
        """A generation stream of the instance on `queue` (csrc/control/generation_stream.h): the
        control layer runs its decode loop, pass after pass, allocating its pages from the instance's
        handles. The context is `handles` (its pages), `num_cached` tokens already in them and `pending`
        tokens to run first; every pass runs on the runner's LoRA adapter `adapter` (0: none). Raises ValueError for a bad argument or first pass, QuotaExceeded /
        InstanceTerminated when its pages cannot be had; later failures end the stream ("failed")."""
        return GenerationStream.start(queue, self.kv_pages, instance_id, self.limits, list(pending), num_cached,
                                      list(handles), sampler, max_tokens, sorted(set(eos_ids)),
                                      [list(s) for s in stop_tokens], list(stop_strings), top_logprobs, token_bytes,
                                      grammar, list(first_mask), page_masks, adapter)

    def end_instance(self, instance_id: int, reason: str = "ended") -> None:
        """Ends the instance however it ended; releases everything it holds. Idempotent."""
        with self._lock:
            self._live.discard(instance_id)
            self.terminations.pop(instance_id, None)
        self.scheduler.end_instance(instance_id, reason)
        self.pools.end_instance(instance_id)

    def end_client(self, client: int) -> None:
        """The client (a connection, an HTTP request: the id its instances were opened with) is gone and
        will open no more instances: its private KV exports are dropped, its shared ones become ownerless
        (evictable under pressure, still importable). Call it once its instances have ended."""
        self.kv_pages.end_client(client)

    def terminate_instance(self, instance_id: int, reason: str) -> None:
        """Stops the instance now (a trap, its client went away): everything is released, and its
        later pool calls raise InstanceTerminated until end_instance."""
        self._terminate_everywhere(instance_id, f"instance {instance_id} terminated: {reason}")

    def _terminate_everywhere(self, instance_id: int, message: str) -> None:
        with self._lock:
            if instance_id in self.terminations or instance_id not in self._live:
                return
            self._live.discard(instance_id)
            self.terminations[instance_id] = message
        self.scheduler.end_instance(instance_id, message)
        self.pools.terminate(instance_id, message)
        if self._on_terminate is not None:
            self._on_terminate(instance_id, message)

    # ---- counters ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for tests and the server's status: scheduler, KV pages, embedding slots."""
        with self._lock:
            live = sorted(self._live)
        return {
            "scheduler": self.scheduler.stats(),
            "kv_pages": self.kv_pages.stats(),
            "embed_slots": self.embed_slots.stats() if self.embed_slots is not None else None,
            "live_instances": live,
        }
