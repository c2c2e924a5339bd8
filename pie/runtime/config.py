"""Configuration of the application layer (one frozen dataclass; the CLI only builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pie.control.config import SchedulerConfig


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
    epoch_tick_s: float = 0.01  # epoch period: deadline granularity
    http_allow: tuple[str, ...] = ()  # hosts http.fetch may reach, "host" (any port) or "host:port";
    # none by default
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batching policy of the control plane
    home: Path | None = None  # $PIE_HOME (None: the environment's, or ~/.cache/pie)

    def __post_init__(self) -> None:
        if self.deadline_s < 0:
            raise ValueError(f"deadline_s must be >= 0, got {self.deadline_s}")
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {self.memory_mb}")
        for name in ("max_memories", "max_tables", "max_table_elements", "max_wasm_instances"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("kv_pages_per_instance", "kv_pages_per_client"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unlimited), got {getattr(self, name)}")
        if self.epoch_tick_s <= 0:
            raise ValueError(f"epoch_tick_s must be positive, got {self.epoch_tick_s}")

    @property
    def pie_home(self) -> Path:
        from pie.engine.model_store import pie_home

        return Path(self.home) if self.home is not None else pie_home()

    @property
    def components_dir(self) -> Path:
        return self.pie_home / "components"
