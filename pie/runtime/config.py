"""Configuration of the application layer (one frozen dataclass; the CLI only builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pie.control.config import SchedulerConfig
from pie.runtime.shared import StoreLimits


@dataclass(frozen=True)
class RuntimeConfig:
    deadline_s: float = 600.0  # wall-clock limit per instance (epoch interruption + host waits); 0 = none
    memory_mb: int = 256  # linear-memory cap per instance (Store limits; with max_memories 1, the whole Store's)
    max_memories: int = 1  # linear memories a Store may create (the Python runtime component needs 1)
    max_tables: int = 4  # tables a Store may create (it needs 2)
    max_table_elements: int = 100_000  # elements of one table (8 bytes each; it needs about 5,700)
    max_wasm_instances: int = 32  # core instances a Store may create (it needs 11 to 20)
    kv_pages_per_instance: int = 0  # KV pages one instance may hold (0 = unlimited)
    kv_pages_per_client: int = 0  # KV pages the instances of one client may hold together (0 = unlimited)
    export_idle_s: float = 600.0  # a KV export not imported for this long may be evicted under pool pressure
    # (0: only ownerless ones are)
    max_kept_output_bytes: int = 64 << 20  # what one instance sent and logged, kept for its result; past
    # it runtime.send / runtime.log fail (a launch with keep_output=False keeps nothing)
    inbox_messages: int = 1024  # client messages one instance holds unread; Instance.send raises queue.Full
    max_cached_components: int = 32  # compiled components kept in memory (least recently used go; the
    # on-disk cache keeps them)
    store: StoreLimits = field(default_factory=StoreLimits)  # kv-store and messaging bounds
    epoch_tick_s: float = 0.01  # epoch period: deadline granularity
    http_allow: tuple[str, ...] = ()  # hosts http.fetch may reach, "host" (any port) or "host:port";
    # none by default
    http_timeout_s: float = 30.0  # wall-clock limit of one http.fetch, all of it (the instance's remaining
    # deadline bounds it too)
    http_max_body_bytes: int = 16 << 20  # largest response body http.fetch hands an inferlet
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batching policy of the control plane
    home: Path | None = None  # $PIE_HOME (None: the environment's, or ~/.cache/pie)

    def __post_init__(self) -> None:
        if not self.deadline_s >= 0:  # NaN too
            raise ValueError(f"deadline_s must be >= 0, got {self.deadline_s}")
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {self.memory_mb}")
        for name in ("max_memories", "max_tables", "max_table_elements", "max_wasm_instances"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_kept_output_bytes", "inbox_messages", "max_cached_components"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("kv_pages_per_instance", "kv_pages_per_client"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unlimited), got {getattr(self, name)}")
        if not self.export_idle_s >= 0:
            raise ValueError(f"export_idle_s must be >= 0 (0: never idle), got {self.export_idle_s}")
        if not self.http_timeout_s > 0:
            raise ValueError(f"http_timeout_s must be positive, got {self.http_timeout_s}")
        if self.http_max_body_bytes <= 0:
            raise ValueError(f"http_max_body_bytes must be positive, got {self.http_max_body_bytes}")
        if self.epoch_tick_s <= 0:
            raise ValueError(f"epoch_tick_s must be positive, got {self.epoch_tick_s}")

    @property
    def pie_home(self) -> Path:
        from pie.engine.model_store import pie_home

        return Path(self.home) if self.home is not None else pie_home()

    @property
    def components_dir(self) -> Path:
        return self.pie_home / "components"
