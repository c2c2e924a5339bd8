"""The Runtime: runs inferlets against a model, through the control plane.

>>> from pie.engine.model import Model                                          # doctest: +SKIP
>>> with Runtime(Model()) as rt:                                                # doctest: +SKIP
...     result = rt.run("text_completion", ["--prompt", "Hi", "--temperature", "0"])
...     print(result.output)

Given several models (`Runtime([Model(), Model()])`), it runs them as data-parallel replicas behind one
runtime (pie/runtime/replicas.py): each instance runs on one of them.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import wasmtime
import wasmtime._ffi
from wasmtime.component import Linker

from pie._ext import _runtime
from pie.control import ControlPlane, token_table
from pie.runtime import api, components, python_runtime
from pie.runtime.config import RuntimeConfig
from pie.runtime.grammar import GrammarHost
from pie.runtime.instance import Instance, InstanceResult
from pie.runtime.paths import examples_dir
from pie.runtime.replicas import Replica, check_replicas, least_loaded
from pie.runtime.services import InstanceServices, ModelInfo
from pie.runtime.shared import Broker, KeyValueStore


class InferletNotFound(ValueError):
    pass


def resolve_inferlet(name_or_path: str | Path) -> Path:
    """A path to a .py / .wasm / .wat file, or the name of a bundled example (inferlets/examples/NAME.py).
    For the local user (`pie run`); a server resolves its clients' names with `resolve_bundled` only."""
    p = Path(name_or_path)
    if p.suffix in (".py", ".wasm", ".wat") or p.exists():
        if not p.is_file():
            raise InferletNotFound(f"inferlet file {p} does not exist")
        return p
    return resolve_bundled(str(name_or_path), "; or give a .py/.wasm path")


def resolve_bundled(name: str, hint: str = "") -> Path:
    """The bundled example called `name` (inferlets/examples/NAME.py or .wasm), never a path: a name that
    is not one of theirs is refused, whatever files exist where the process runs."""
    bundled = {f.stem: f for f in sorted(examples_dir().iterdir()) if f.suffix in (".py", ".wasm")}
    if name in bundled:
        return bundled[name]
    names = sorted({f.stem for f in examples_dir().glob("*.py")})
    raise InferletNotFound(f"no inferlet named {name[:80]!r} (bundled: {', '.join(names)}{hint})")


@dataclass(frozen=True)
class Sandbox:
    """How an instance runs its guest: the wasmtime engine, the linker with every WIT function defined,
    the epoch period that deadlines are counted in (a ticker thread advances the epoch), and the limits
    of every Store (RuntimeConfig: memories, tables, table elements, core instances)."""

    wasm_engine: wasmtime.Engine
    linker: Linker
    epoch_tick_s: float
    config: RuntimeConfig

    def deadline_ticks(self, deadline_s: float) -> int:
        if deadline_s == 0:
            return 1 << 62
        return max(1, int(round(deadline_s / self.epoch_tick_s)))

    def new_store(self, memory_mb: int, deadline_s: float) -> wasmtime.Store:
        """A Store with default-deny WASI (no args, env, preopened dirs or sockets; stdio discarded), its
        limits and its deadline."""
        c = self.config
        store = wasmtime.Store(self.wasm_engine)
        store.set_wasi(wasmtime.WasiConfig())
        store.set_limits(memory_size=memory_mb << 20, memories=c.max_memories, tables=c.max_tables,
                         table_elements=c.max_table_elements, instances=c.max_wasm_instances)
        store.set_epoch_deadline(self.deadline_ticks(deadline_s))
        return store


_open: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


@atexit.register
def _close_open_runtimes() -> None:
    """A Runtime nobody closed is closed at interpreter exit, before daemon threads are torn down: an
    instance thread or a batch loop killed inside native code would abort the process."""
    for runtime in list(_open):
        runtime.close()


class Runtime:
    """Owns the wasmtime engine and linker (every WIT function defined once), the control plane over the
    model's runner (pages come from the runner's pools, shared with any other plane over it) and the
    state the instances share. Close it (`with Runtime(...)`, or `close()`); one left open is closed at
    interpreter exit."""

    def __init__(self, model: Any, config: RuntimeConfig = RuntimeConfig()):
        """model: a pie.engine.model.Model, or a sequence of them (data-parallel replicas of one model,
        each with its own runner)."""
        components.check_wasmtime_version()
        _runtime.load(str(wasmtime._ffi.filename))
        self.config = config
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        check_replicas(models)
        model = models[0]
        self.tokenizer = model.tokenizer
        self.model_name = model.name
        self.vocab_size = model.runner.vocab_size
        self.page_size = model.runner.page_size
        wasm_engine = components.make_engine()
        linker = Linker(wasm_engine)
        linker.add_wasip2()
        api.define_all(linker)
        self.sandbox = Sandbox(wasm_engine, linker, config.epoch_tick_s, config)
        # shared by every replica's instances
        grammar = GrammarHost(model.tokenizer, model.runner.vocab_size, frozenset(model.eos_ids))  # compiles at first use
        kv_store, broker = KeyValueStore(config.store), Broker(config.store)
        self.replicas: list[Replica] = []
        for index, replica_model in enumerate(models):
            runner = replica_model.runner
            plane = ControlPlane.serving(runner, config.scheduler, on_terminate=self._on_plane_terminate)
            if len(models) > 1:
                plane.pools.number_instances(index + 1, len(models))  # ids unique across replicas
            plane.start()
            plane.kv_pages.set_export_idle_s(config.export_idle_s)  # pool-wide: the runner's pool
            mc = runner.model_config
            services = InstanceServices(
                model=ModelInfo(replica_model.name, mc.architecture, runner.vocab_size, mc.num_layers,
                                runner.page_size, runner.max_batch_tokens, tuple(runner.adapters.names)),
                tokenizer=replica_model.tokenizer, eos_ids=frozenset(replica_model.eos_ids), plane=plane,
                embeddings=runner.embeddings, embed_tokens=runner.embed_tokens, grammar=grammar,
                token_bytes=lambda m=replica_model: token_table(m), kv_store=kv_store, broker=broker)
            self.replicas.append(Replica(index, replica_model, plane, services))
        # replica 0: what single-replica callers (tests, `pie run`) reach as runtime.plane / runner / services
        self.runner = self.replicas[0].runner
        self.plane = self.replicas[0].plane
        self.services = self.replicas[0].services
        self._replica_of: dict[int, Replica] = {}  # live instance id -> its replica
        self._live_per_replica = [0] * len(self.replicas)  # instances launched on each and not ended
        self._lock = threading.Lock()
        self.live: dict[int, Instance] = {}
        self._components: OrderedDict[str, Any] = OrderedDict()  # key -> compiled component, LRU last
        self._python_runtime: Any = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="pie-epoch", daemon=True)
        self._ticker.start()
        _open.add(self)

    # ---- components ---------------------------------------------------------------------------------
    @property
    def wasm_engine(self) -> wasmtime.Engine:
        return self.sandbox.wasm_engine

    @property
    def linker(self) -> Linker:
        return self.sandbox.linker

    @property
    def grammar(self) -> GrammarHost:
        return self.services.grammar

    @property
    def kv_store(self) -> KeyValueStore:
        return self.services.kv_store

    def _tick(self) -> None:
        while not self._stop.wait(self.config.epoch_tick_s):
            self.sandbox.wasm_engine.increment_epoch()

    def load_component(self, wasm: bytes, key: str | None = None) -> Any:
        """The compiled component of `wasm`: from memory (at most max_cached_components, least recently
        used dropped), else from the on-disk cache, else compiled."""
        key = key or components.cache_key(wasm)
        comp = self._cached_component(key)
        if comp is None:
            comp = components.load_component(self.sandbox.wasm_engine, wasm, self.config.components_dir)
            self._cache_component(key, comp)
        return comp

    def _cached_component(self, key: str) -> Any:
        with self._lock:
            comp = self._components.get(key)
            if comp is not None:
                self._components.move_to_end(key)
            return comp

    def _cache_component(self, key: str, comp: Any) -> None:
        with self._lock:
            self._components[key] = comp
            self._components.move_to_end(key)
            while len(self._components) > self.config.max_cached_components:
                self._components.popitem(last=False)

    def python_runtime(self) -> Any:
        """The compiled Python-runtime component (built at first use, then cached on disk and here: the
        sources are hashed once per Runtime, not per launch)."""
        comp = self._python_runtime
        if comp is not None:
            return comp
        path = python_runtime.ensure_built(self.config.pie_home)
        comp = self.load_component(path.read_bytes(), "python-runtime:" + path.name)
        self._python_runtime = comp  # held here: never dropped by the LRU
        return comp

    # ---- instances ----------------------------------------------------------------------------------
    def launch(self, inferlet: str | Path, arguments: Sequence[str] = (), **kwargs: Any) -> Instance:
        """Starts an inferlet (example name, .py source, .wasm/.wat component) on its own thread."""
        path = resolve_inferlet(inferlet)
        if path.suffix == ".py":
            return self.launch_source(path.read_text(), arguments, filename=path.name, **kwargs)
        return self.launch_component(self.load_component(path.read_bytes()), arguments, **kwargs)

    def launch_source(self, source: str, arguments: Sequence[str] = (), *, filename: str = "inferlet.py",
                      **kwargs: Any) -> Instance:
        return self._start(self.python_runtime(), arguments, source=source, filename=filename, **kwargs)

    def launch_component(self, component: Any, arguments: Sequence[str] = (), **kwargs: Any) -> Instance:
        return self._start(component, arguments, **kwargs)

    def _start(self, component: Any, arguments: Sequence[str], *, deadline_s: float | None = None,
               memory_mb: int | None = None, http_allow: Sequence[str] | None = None,
               http_timeout_s: float | None = None, http_max_body_bytes: int | None = None,
               on_output: Callable[[str], None] | None = None,
               on_log: Callable[[str], None] | None = None,
               on_done: Callable[[InstanceResult], None] | None = None, client: int = 0, keep_output: bool = True,
               cache_scope: int = 0, **kwargs: Any) -> Instance:
        """client: who launched it (0: the local user); its instances share kv_pages_per_client, a kv-store
        and messaging namespace, and their exports. keep_output=False: the result's output and log stay
        empty (on_output / on_log see everything). cache_scope: the prefix cache its kv.cache-lookup and
        kv.cache-store use (0: none; instances of one scope share it, no other sees it)."""
        deadline_s = self.config.deadline_s if deadline_s is None else deadline_s
        c = self.config
        with self._lock:  # chosen and counted at once: concurrent launches see each other
            replica = least_loaded(self.replicas, self._live_per_replica)
            self._live_per_replica[replica.index] += 1
        plane, instance_id = replica.plane, None
        try:
            instance_id = plane.open_instance(kv_quota=c.kv_pages_per_instance, client=client,
                                              kv_client_quota=c.kv_pages_per_client, kv_cache_scope=cache_scope)
            state = self._instance_state(instance_id, deadline_s, replica=replica)
            inst = Instance(instance_id, state, component, arguments, services=replica.services,
                            sandbox=self.sandbox, deadline_s=deadline_s, memory_mb=memory_mb or c.memory_mb,
                            http_allow=c.http_allow if http_allow is None else http_allow,
                            http_timeout_s=c.http_timeout_s if http_timeout_s is None else http_timeout_s,
                            http_max_body_bytes=c.http_max_body_bytes if http_max_body_bytes is None
                            else http_max_body_bytes,
                            on_output=on_output, on_log=on_log, on_done=on_done,
                            on_terminate=plane.terminate_instance, on_end=self._instance_ended, client=client,
                            keep_output=keep_output, max_kept_output_bytes=c.max_kept_output_bytes,
                            inbox_messages=c.inbox_messages, replica=replica.index, **kwargs)
        except BaseException:
            if instance_id is not None:
                plane.end_instance(instance_id, "could not start")
            with self._lock:
                self._live_per_replica[replica.index] -= 1
            raise
        state.set_owner(inst)
        with self._lock:
            self.live[inst.id] = inst
            self._replica_of[inst.id] = replica
        return inst.start()

    def run(self, inferlet: str | Path, arguments: Sequence[str] = (), **kwargs: Any) -> InstanceResult:
        return self.launch(inferlet, arguments, **kwargs).wait()

    def run_source(self, source: str, arguments: Sequence[str] = (), **kwargs: Any) -> InstanceResult:
        return self.launch_source(source, arguments, **kwargs).wait()

    def _instance_state(self, instance_id: int, deadline_s: float, owner: Any = None,
                        replica: Replica | None = None) -> Any:
        """The instance's C++ state: its default queue, and the pools of its replica's plane (default:
        replica 0) that its handles live in."""
        plane = (replica or self.replicas[0]).plane
        queue = plane.create_queue(instance_id)
        return _runtime.InstanceState(instance_id, deadline_s, owner, queue, plane.kv_pages,
                                      plane.embed_slots, plane.limits)

    def _on_plane_terminate(self, instance_id: int, message: str) -> None:
        """The control plane terminated an instance (KV pool exhausted): stop it at its next host call."""
        with self._lock:
            inst = self.live.get(instance_id)
        if inst is not None:
            inst.state.terminate(message)

    def _instance_ended(self, inst: Instance, reason: str) -> None:
        """An instance's thread is done with it (on_end): release it everywhere."""
        with self._lock:
            replica = self._replica_of.get(inst.id, self.replicas[0])
        replica.plane.end_instance(inst.id, reason)
        self.services.broker.end_instance(inst.id)
        self.services.grammar.end_instance(inst.id)
        with self._lock:
            self.live.pop(inst.id, None)
            if self._replica_of.pop(inst.id, None) is not None:
                self._live_per_replica[replica.index] -= 1

    def end_client(self, client: int) -> None:
        """A client (a server's connection or HTTP request) is gone and launches nothing more: what it kept
        in the kv-store goes, and its exports lose their owner (pie.control: private ones are dropped,
        shared persistent ones become evictable). Its instances must have been stopped already."""
        if client == 0:
            raise ValueError("client 0 is the local user: it never ends")
        self.services.kv_store.end_client(client)
        for replica in self.replicas:
            replica.plane.end_client(client)

    def clear_cache_scope(self, scope: int) -> None:
        """Drops the prefix cache of `scope` on every replica."""
        for replica in self.replicas:
            replica.plane.kv_pages.cache_clear(scope)

    def replica_of(self, instance_id: int) -> Replica | None:
        """The replica a live instance runs on."""
        with self._lock:
            return self._replica_of.get(instance_id)

    def bind_test_instance(self) -> Any:
        """C++ state bound to the calling thread, for driving components directly (tests, benchmarks).
        Cold calls see `services`. Release it with `release_test_instance`."""
        instance_id = self.plane.open_instance()
        state = self._instance_state(instance_id, 0.0, _TestOwner(instance_id, self.services))
        state.bind()
        return state

    def release_test_instance(self, state: Any) -> None:
        state.release()
        state.unbind()
        self.plane.end_instance(state.id, "ended")

    @property
    def num_pages(self) -> int:
        """KV pages of every replica together."""
        return sum(r.num_pages for r in self.replicas)

    @property
    def num_free_pages(self) -> int:
        return sum(r.num_free_pages for r in self.replicas)

    # ---- shutdown ------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        _open.discard(self)
        with self._lock:
            live = list(self.live.values())
        for inst in live:
            inst.terminate("the runtime is shutting down")
        for inst in live:
            inst.done.wait(timeout)
        self._stop.set()
        self._ticker.join(1)
        for replica in self.replicas:
            replica.plane.stop()
        self._components.clear()
        self._python_runtime = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_batches(self) -> int:
        return sum(r.plane.loop.num_batches for r in self.replicas)

    @property
    def num_commands(self) -> int:
        return sum(r.plane.loop.num_commands for r in self.replicas)


@dataclass
class _TestOwner:
    """What cold calls see of a test instance (bind_test_instance): its id and the services."""

    id: int
    services: InstanceServices
    client: int = 0
