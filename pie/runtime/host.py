"""The application layer's host: runs inferlets against an embedded engine.

>>> from pie.engine.generate import Engine                                    # doctest: +SKIP
>>> with Runtime(Engine()) as rt:                                              # doctest: +SKIP
...     result = rt.run("text_completion", ["--prompt", "Hi", "--temperature", "0"])
...     print(result.output)
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import wasmtime
import wasmtime._ffi
from wasmtime.component import Linker

from pie._ext import _runtime
from pie.runtime import api, components, python_runtime
from pie.runtime.config import RuntimeConfig
from pie.runtime.instance import Instance, InstanceResult
from pie.runtime.paths import examples_dir
from pie.runtime.embeddings import EmbeddingTable
from pie.runtime.grammar import GrammarHost
from pie.runtime.service import CopyHandler, EngineService, ForwardHandler
from pie.runtime.shared import Broker, KeyValueStore


class InferletNotFound(ValueError):
    pass


def resolve_inferlet(name_or_path: str | Path) -> Path:
    """A path to a .py / .wasm / .wat file, or the name of a bundled example (inferlets/examples/NAME.py)."""
    p = Path(name_or_path)
    if p.suffix in (".py", ".wasm", ".wat") or p.exists():
        if not p.is_file():
            raise InferletNotFound(f"inferlet file {p} does not exist")
        return p
    for ext in (".py", ".wasm"):
        candidate = examples_dir() / f"{name_or_path}{ext}"
        if candidate.is_file():
            return candidate
    bundled = sorted(f.stem for f in examples_dir().glob("*.py"))
    raise InferletNotFound(f"no inferlet named {name_or_path!r} (bundled: {', '.join(bundled)}; or give a .py/.wasm path)")


class Runtime:
    """Owns the wasmtime engine and linker (every WIT function defined once), the C++ host state and the
    engine service over the model runner. Takes all of the runner's KV pages: do not run the engine's
    own generate loop while instances run."""

    def __init__(self, engine: Any, config: RuntimeConfig = RuntimeConfig()):
        components.check_wasmtime_version()
        _runtime.load(str(wasmtime._ffi.filename))
        self.config = config
        runner = engine.runner
        self.runner = runner
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.architecture = runner.model_config.architecture
        self.num_layers = runner.model_config.num_layers
        self.vocab_size = runner.vocab_size
        self.page_size = runner.page_size
        self.max_batch_tokens = runner.max_batch_tokens
        self.eos_ids = frozenset(engine.eos_ids)
        self.wasm_engine = components.make_engine()
        self.linker = Linker(self.wasm_engine)
        self.linker.add_wasip2()
        api.define_all(self.linker)
        self._lock = threading.Lock()
        self.live: dict[int, Instance] = {}
        self.host = _runtime.Host(runner.num_pages, runner.page_size, runner.vocab_size, runner.max_batch_tokens)
        self.plane = None
        self.service = None
        mc = runner.model_config
        self.embeddings = EmbeddingTable(config.embedding_slots, mc.hidden_size, runner.engine_config.torch_dtype)
        if config.control:
            from pie.control import CommandKind, ControlPlane

            self.forward_kind = int(CommandKind.FORWARD)
            self.copy_kind = int(CommandKind.COPY_PAGES)
            handlers = {CommandKind.FORWARD: ForwardHandler(runner, self.embeddings),
                        CommandKind.COPY_PAGES: CopyHandler(runner)}
            self.plane = ControlPlane.for_runner(runner, config.scheduler, handlers=handlers,
                                                 num_embed_slots=config.embedding_slots,
                                                 on_terminate=self._on_plane_terminate).start()
        else:
            self.service = EngineService(runner, self.host).start()
        self._ids = itertools.count(1)
        self._components: dict[str, Any] = {}
        self._python_runtime: Any = None
        self.grammar = GrammarHost(self.tokenizer, self.vocab_size, self.eos_ids)  # compiles at first use
        self.kv_store = KeyValueStore()
        self.broker = Broker()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="pie-epoch", daemon=True)
        self._ticker.start()

    # ---- components ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(self.config.epoch_tick_s):
            self.wasm_engine.increment_epoch()

    def deadline_ticks(self, deadline_s: float) -> int:
        if deadline_s == 0:
            return 1 << 62
        return max(1, int(round(deadline_s / self.config.epoch_tick_s)))

    def load_component(self, wasm: bytes, key: str | None = None) -> Any:
        key = key or components.cache_key(wasm)
        with self._lock:
            comp = self._components.get(key)
        if comp is None:
            comp = components.load_component(self.wasm_engine, wasm, self.config.components_dir)
            with self._lock:
                self._components[key] = comp
        return comp

    def python_runtime(self) -> Any:
        """The compiled Python-runtime component (built at first use, then cached on disk and here: the
        sources are hashed once per Runtime, not per launch)."""
        comp = self._python_runtime
        if comp is not None:
            return comp
        path = python_runtime.ensure_built(self.config.pie_home)
        key = "python-runtime:" + path.name
        with self._lock:
            comp = self._components.get(key)
        if comp is None:
            comp = self.load_component(path.read_bytes())
            with self._lock:
                self._components[key] = comp
        self._python_runtime = comp
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
               on_output: Callable[[str], None] | None = None,
               on_log: Callable[[str], None] | None = None,
               on_done: Callable[[InstanceResult], None] | None = None, **kwargs: Any) -> Instance:
        inst = Instance(self, self.open_instance(), component, arguments,
                        deadline_s=self.config.deadline_s if deadline_s is None else deadline_s,
                        memory_mb=memory_mb or self.config.memory_mb,
                        http_allow=self.config.http_allow if http_allow is None else http_allow,
                        on_output=on_output, on_log=on_log, on_done=on_done, **kwargs)
        with self._lock:
            self.live[inst.id] = inst
        return inst.start()

    def run(self, inferlet: str | Path, arguments: Sequence[str] = (), **kwargs: Any) -> InstanceResult:
        return self.launch(inferlet, arguments, **kwargs).wait()

    def run_source(self, source: str, arguments: Sequence[str] = (), **kwargs: Any) -> InstanceResult:
        return self.launch_source(source, arguments, **kwargs).wait()

    # ---- the instance's C++ state, on the control layer or the fallback -----------------------------
    def open_instance(self) -> int:
        return self.plane.open_instance() if self.plane is not None else next(self._ids)

    def instance_state(self, instance_id: int, deadline_s: float, owner: Any) -> Any:
        if self.plane is None:
            return _runtime.InstanceState(self.host, instance_id, deadline_s, owner)
        queue = self.plane.create_queue(instance_id)
        return _runtime.InstanceState(self.host, instance_id, deadline_s, owner, queue, self.plane.kv_pages,
                                      self.forward_kind, self.copy_kind, self.plane.embed_slots)

    def end_instance(self, instance_id: int, reason: str) -> None:
        if self.plane is not None:
            self.plane.end_instance(instance_id, reason)

    def terminate_instance(self, instance_id: int, reason: str) -> None:
        if self.plane is not None:
            self.plane.terminate_instance(instance_id, reason)

    def _on_plane_terminate(self, instance_id: int, message: str) -> None:
        """The control plane terminated an instance (KV pool exhausted): stop it at its next host call."""
        with self._lock:
            inst = self.live.get(instance_id)
        if inst is not None:
            inst.state.terminate(message)

    def _instance_ended(self, inst: Instance) -> None:
        self.broker.end_instance(inst.id)
        self.grammar.end_instance(inst.id)
        with self._lock:
            self.live.pop(inst.id, None)

    def bind_test_instance(self) -> Any:
        """C++ state bound to the calling thread, for driving components directly (tests, benchmarks).
        Release it with `release_test_instance`."""
        state = self.instance_state(self.open_instance(), 0.0, self)
        state.bind()
        return state

    def release_test_instance(self, state: Any) -> None:
        state.release()
        state.unbind()
        self.end_instance(state.id, "ended")

    @property
    def num_pages(self) -> int:
        return self.plane.kv_pages.num_pages if self.plane is not None else self.host.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.plane.kv_pages.stats()["num_free"] if self.plane is not None else self.host.num_free_pages

    # ---- shutdown ------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            live = list(self.live.values())
        for inst in live:
            inst.terminate("the runtime is shutting down")
        for inst in live:
            inst.done.wait(timeout)
        self._stop.set()
        self._ticker.join(1)
        if self.plane is not None:
            self.plane.stop()
        else:
            self.service.stop()
        self._components.clear()
        self._python_runtime = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_batches(self) -> int:
        return self.plane.loop.num_batches if self.plane is not None else self.service.num_batches

    @property
    def num_commands(self) -> int:
        return self.plane.loop.num_commands if self.plane is not None else self.service.num_commands
