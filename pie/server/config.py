"""Configuration of `pie serve`: one frozen dataclass per TOML section, validated on construction.

The file (`pie serve --config pie.toml`) may set any subset of the keys below; unknown sections and keys
are errors that name the key. CLI flags override the file. `pie config` prints the effective TOML.

>>> cfg = load_config(text='[server]\\nport = 9000\\n[model]\\nkv_cache_mb = 256\\n')
>>> cfg.server.port, cfg.model.kv_cache_mb, cfg.scheduler.policy
(9000, 256, 'adaptive')
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pie.runtime.config import RuntimeConfig
from pie.runtime.shared import StoreLimits

DEFAULT_MODEL = "smollm2-135m"


class ConfigError(ValueError):
    """The configuration file or a flag has an unknown key or a bad value."""


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 8080
    max_frame_bytes: int = 1 << 20  # websocket frames larger than this get an error (4x: the connection closes, 1009)
    max_body_bytes: int = 4 << 20  # HTTP request bodies larger than this get 413
    max_program_bytes: int = 64 << 20  # an uploaded program
    programs_memory_bytes: int = 256 << 20  # uploaded programs kept in memory (least recently used go)
    programs_disk_bytes: int = 4 << 30  # uploaded programs kept in $PIE_HOME/programs (least recently used go)
    max_connections: int = 1024  # websocket connections at once
    outbox_messages: int = 1024  # messages queued for one connection (or one HTTP request) before its
    # instances wait for the client to read
    slow_client_s: float = 30.0  # an instance that waited this long for room is terminated (slow client)
    reply_backlog: int = 256  # replies queued for one connection before it stops reading requests; after
    # slow_client_s more without room, it is closed (1008)
    auth_timeout_s: float = 10.0  # with a token: a connection that has not authenticated by then is closed
    idle_timeout_s: float = 600.0  # a connection with no request and no instance this long is closed; 0 = never
    grace_s: float = 30.0  # SIGINT / SIGTERM: how long running instances may finish before they are terminated

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in 0..65535, got {self.port}")
        for name in ("max_frame_bytes", "max_body_bytes", "max_program_bytes", "max_connections", "outbox_messages",
                     "reply_backlog", "programs_memory_bytes", "programs_disk_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"server.{name} must be positive, got {getattr(self, name)}")
        if not self.auth_timeout_s > 0 or not self.idle_timeout_s >= 0:
            raise ConfigError("server.auth_timeout_s must be positive and server.idle_timeout_s >= 0 (0 = never)")
        if not self.slow_client_s > 0:
            raise ConfigError(f"server.slow_client_s must be positive, got {self.slow_client_s}")
        if not self.grace_s >= 0:
            raise ConfigError(f"server.grace_s must be >= 0, got {self.grace_s}")


@dataclass(frozen=True)
class AuthSection:
    token: str = ""  # empty: no authentication; else websocket clients send it first and HTTP clients
    # as "Authorization: Bearer TOKEN". The environment variable PIE_TOKEN, when set, overrides it.

    @property
    def enabled(self) -> bool:
        return bool(self.token)


_RUNTIME = RuntimeConfig()  # the runtime's defaults, so that both places agree
_STORE = StoreLimits()


@dataclass(frozen=True)
class LimitsSection:
    """Runtime limits and capabilities of every instance the server launches. Every key but the two
    max_instances ones is a RuntimeConfig (or StoreLimits) field of the same name; docs/security.md lists
    what each bounds and what happens at the bound."""

    deadline_s: float = 600.0  # wall-clock limit per instance; 0 = none
    memory_mb: int = 256  # linear-memory cap per instance
    http_allow: tuple[str, ...] = ()  # hosts ("host" or "host:port") inferlets may reach with http.fetch
    http_timeout_s: float = _RUNTIME.http_timeout_s  # wall-clock limit of one http.fetch, connect to last body
    # byte (the instance's remaining deadline bounds it too)
    http_max_body_bytes: int = _RUNTIME.http_max_body_bytes  # largest response body http.fetch hands an inferlet
    max_instances: int = 4096  # live instances, server-wide
    max_instances_per_connection: int = 256
    kv_pages_per_instance: int = 0  # KV pages one instance may hold; 0 = unlimited
    kv_pages_per_client: int = 0  # KV pages the instances of one client (a connection, an HTTP request) hold together
    export_idle_s: float = _RUNTIME.export_idle_s  # a KV export not imported this long may be evicted under
    # pool pressure (0: only ownerless ones)
    max_memories: int = _RUNTIME.max_memories  # linear memories one instance's Store may create
    max_tables: int = _RUNTIME.max_tables  # tables one instance's Store may create
    max_table_elements: int = _RUNTIME.max_table_elements  # elements of one table
    max_wasm_instances: int = _RUNTIME.max_wasm_instances  # core instances one Store may create
    inbox_messages: int = _RUNTIME.inbox_messages  # client messages one instance holds unread
    max_cached_components: int = _RUNTIME.max_cached_components  # compiled components kept in memory
    kv_store_keys: int = _STORE.kv_store_keys  # kv-store keys one client may hold
    kv_store_bytes: int = _STORE.kv_store_bytes  # kv-store bytes (keys + values) one client may hold
    kv_store_total_bytes: int = _STORE.kv_store_total_bytes  # kv-store bytes, all clients together
    messaging_queue_messages: int = _STORE.messaging_queue_messages  # unread messages of one subscription
    messaging_queue_bytes: int = _STORE.messaging_queue_bytes  # unread bytes of one subscription
    messaging_subscriptions: int = _STORE.messaging_subscriptions  # subscriptions one instance holds

    def __post_init__(self) -> None:
        for name in ("max_instances", "max_instances_per_connection"):  # the server's own keys
            if getattr(self, name) <= 0:
                raise ConfigError(f"limits.{name} must be positive, got {getattr(self, name)}")
        try:  # every other key: the runtime's own checks, with the section's names
            self.runtime_config()
        except ValueError as e:
            raise ConfigError(f"limits.{e}") from None

    def runtime_config(self, **more: Any) -> RuntimeConfig:
        """The RuntimeConfig of these limits (`more`: its other fields, e.g. the scheduler)."""
        store = {f.name: getattr(self, f.name) for f in fields(StoreLimits)}
        runtime = {f.name: getattr(self, f.name) for f in fields(RuntimeConfig) if hasattr(self, f.name)}
        return RuntimeConfig(**runtime, store=StoreLimits(**store), **more)


@dataclass(frozen=True)
class ModelSection:
    name: str = DEFAULT_MODEL  # a model of the cache ($PIE_HOME/models), a known model or a folder
    dtype: str = "float32"
    device: str = "cpu"
    page_size: int = 16  # tokens per KV page
    num_pages: int = 0  # KV pages; 0 = from memory_fraction or kv_cache_mb
    memory_fraction: float = 0.0  # > 0: the KV cache takes this fraction of the memory free at start
    # (device memory on cuda, RAM on cpu)
    kv_cache_mb: int = 1024  # used when num_pages and memory_fraction are 0
    max_batch_tokens: int = 8192
    threads: int = 0  # torch threads; 0 = torch's choice
    data_parallel: int = 1  # engine replicas behind the one endpoint (pie/runtime/replicas.py)
    tensor_parallel: int = 1  # processes each replica's model is split over (pie/engine/tensor_parallel.py)
    adapters: tuple[str, ...] = ()  # LoRA adapters registered for the model (`pie model add-adapter`) to load

    def __post_init__(self) -> None:
        if not 1 <= self.data_parallel <= 64:
            raise ConfigError(f"model.data_parallel must be in [1, 64], got {self.data_parallel}")
        if not 1 <= self.tensor_parallel <= 64:
            raise ConfigError(f"model.tensor_parallel must be in [1, 64], got {self.tensor_parallel}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.page_size <= 0 or self.num_pages < 0 or self.kv_cache_mb <= 0 or self.max_batch_tokens <= 0 \
                or self.threads < 0:
            raise ConfigError("model.page_size, kv_cache_mb and max_batch_tokens must be positive; "
                              "num_pages and threads >= 0")
        if not 0 <= self.memory_fraction < 1:
            raise ConfigError(f"model.memory_fraction must be in [0, 1), got {self.memory_fraction}")

    def kv_cache_megabytes(self) -> int:
        """The KV cache size in MiB: memory_fraction of the free memory now, else kv_cache_mb."""
        if self.memory_fraction == 0:
            return self.kv_cache_mb
        return max(1, int(self.memory_fraction * free_memory_bytes(self.device)) >> 20)

    def engine_config(self) -> Any:
        from pie.engine.config import EngineConfig

        return EngineConfig(dtype=self.dtype, device=self.device, page_size=self.page_size,
                            num_pages=self.num_pages or None, kv_cache_mb=self.kv_cache_megabytes(),
                            max_batch_tokens=self.max_batch_tokens, threads=self.threads or None)


@dataclass(frozen=True)
class SchedulerSection:
    """The control layer's batch policy (pie.control.SchedulerConfig): adaptive | eager | fixed_size |
    fixed_wait | size_or_wait. The first release's names (policies k, t, k_or_t; keys k, t) are read with
    a DeprecationWarning."""

    policy: str = "adaptive"
    batch_size: int = 0
    max_wait: float = 0.0
    deadline: float = 0.002
    high_water_window: int = 8

    def __post_init__(self) -> None:
        from pie.control.config import policy_name

        object.__setattr__(self, "policy", policy_name(self.policy))
        try:
            self.scheduler_config()
        except ValueError as e:
            raise ConfigError(f"scheduler: {e}") from None

    @staticmethod
    def renamed_keys() -> dict[str, str]:
        from pie.control.config import DEPRECATED_PARAMETER_NAMES

        return DEPRECATED_PARAMETER_NAMES

    def scheduler_config(self) -> Any:
        from pie.control.config import SchedulerConfig

        return SchedulerConfig(policy=self.policy, batch_size=self.batch_size, max_wait=self.max_wait,
                               deadline=self.deadline, high_water_window=self.high_water_window)


@dataclass(frozen=True)
class OpenAISection:
    enabled: bool = True
    inferlet: str = "openai_chat"  # the inferlet that serves the routes (bundled name or .py path)
    default_max_tokens: int = 256  # chat and responses, when the request gives none (completions: 16)
    max_n: int = 16
    prefix_caching: bool = True  # the routes' instances share a prefix cache (docs/prefix_caching.md)

    def __post_init__(self) -> None:
        if self.default_max_tokens <= 0 or self.max_n <= 0:
            raise ConfigError("openai.default_max_tokens and openai.max_n must be positive")


@dataclass(frozen=True)
class PieConfig:
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    model: ModelSection = field(default_factory=ModelSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    openai: OpenAISection = field(default_factory=OpenAISection)

    def replace(self, **sections: dict[str, Any]) -> "PieConfig":
        """A copy with some keys of some sections changed: replace(server={"port": 0})."""
        changed = {}
        for name, values in sections.items():
            changed[name] = _build(name, type(getattr(self, name)), values, base=getattr(self, name))
        return dataclasses.replace(self, **changed)

    def to_toml(self) -> str:
        lines: list[str] = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            obj = getattr(self, section.name)
            for f in fields(obj):
                lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
            lines.append("")
        return "\n".join(lines)


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        want = "a list of strings" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(f"{key} must be {want}, got {value!r}")
    return value


def _build(section: str, cls: type, values: dict[str, Any], base: Any = None) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    base = base if base is not None else cls()
    known = {f.name: getattr(base, f.name) for f in fields(cls)}
    kwargs = dict(known)
    renamed = cls.renamed_keys() if hasattr(cls, "renamed_keys") else {}
    for k, v in values.items():
        if k in renamed:
            warnings.warn(f"{section}.{k} is now called {section}.{renamed[k]}; the old name goes in the next release",
                          DeprecationWarning, stacklevel=3)
            if renamed[k] in values:
                raise ConfigError(f"give {section}.{renamed[k]} or its old name {section}.{k}, not both")
            k = renamed[k]
        if k not in known:
            raise ConfigError(f"unknown key {section}.{k} (known in [{section}]: {', '.join(known)})")
        kwargs[k] = _check_type(f"{section}.{k}", v, known[k])
    return cls(**kwargs)


def load_config(path: str | Path | None = None, text: str | None = None) -> PieConfig:
    """The configuration of a TOML file (or text); defaults for what it leaves out. PIE_TOKEN overrides
    auth.token."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        text = p.read_text()
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path or 'config'}: not valid TOML ({e})") from None
    sections = {f.name: f.type for f in fields(PieConfig)}
    classes = {"server": ServerSection, "auth": AuthSection, "limits": LimitsSection, "model": ModelSection,
               "scheduler": SchedulerSection, "openai": OpenAISection}
    built = {}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sections)})")
        built[name] = _build(name, classes[name], values)
    cfg = PieConfig(**built)
    token = os.environ.get("PIE_TOKEN")
    if token:
        cfg = cfg.replace(auth={"token": token})
    return cfg
