"""The adapter cache: `$PIE_HOME/adapters/NAME/`, LoRA adapters registered for a base model.

Each entry is a copy of a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) plus
`pie-adapter.json` ({"name", "base", "source"}). An adapter is checked against its base model's
config when it is added (ranks, shapes, files: pie.engine.lora.read_adapter), so a server that loads
it (`[model] adapters = [...]`) does not meet a bad one. Entries are written to a temporary folder and
renamed into place, so a failed add leaves nothing.

>>> AdapterStore().add("./sql-lora", name="sql", base="smollm2-135m")   # doctest: +SKIP
AdapterEntry(name='sql', base='smollm2-135m', ...)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pie.engine.config import ModelConfig, UnsupportedModelError
from pie.engine.lora import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_adapter
from pie.engine.model_store import DEFAULT_MODEL, ModelStore, ModelStoreError, _valid_name, pie_home

MANIFEST = "pie-adapter.json"


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    base: str  # the model name it was checked against
    source: str  # where it was added from
    path: Path  # the folder holding its files
    rank: int


class AdapterStore:
    def __init__(self, home: Path | None = None):
        self.home = home or pie_home()
        self.root = self.home / "adapters"

    def get(self, name: str) -> AdapterEntry | None:
        folder = self.root / _valid_name(name)
        try:
            data = json.loads((folder / MANIFEST).read_text())
            rank = json.loads((folder / CONFIG_FILE).read_text())["r"]
            return AdapterEntry(name=data["name"], base=data["base"], source=data["source"], path=folder, rank=rank)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as e:
            raise ModelStoreError(f"adapter {name!r}: broken cache entry {folder} ({e}); "
                                  f"remove {folder} and add it again") from None

    def list(self) -> list[AdapterEntry]:
        if not self.root.is_dir():
            return []
        return [e for d in sorted(self.root.iterdir()) if not d.name.startswith(".") and (e := self.get(d.name))]

    def add(self, path: str | Path, name: str, base: str = DEFAULT_MODEL) -> AdapterEntry:
        """Checks the PEFT LoRA folder `path` against the base model and copies it in as `name`. Raises
        ModelStoreError (one line) for a bad adapter, an unknown base or a name already taken."""
        _valid_name(name)
        models = ModelStore(self.home)
        if models.get(name) is not None or name == base:
            raise ModelStoreError(f"cannot add adapter {name!r}: a model has that name (/v1 selects both by name)")
        existing = self.get(name)
        if existing is not None:
            raise ModelStoreError(f"cannot add adapter {name!r}: an adapter of that name exists (of {existing.base}, "
                                  f"from {existing.source})")
        base_entry = models.resolve(base, progress=False)
        try:
            config = ModelConfig.from_file(base_entry.path / "config.json")
            read_adapter(path, config)
        except (AdapterError, UnsupportedModelError, OSError) as e:
            raise ModelStoreError(f"cannot add adapter {name!r} for {base_entry.name}: {e}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(Path(path) / f, tmp / f)
            (tmp / MANIFEST).write_text(json.dumps({"name": name, "base": base_entry.name,
                                                    "source": str(Path(path).resolve())}))
            tmp.chmod(0o755)
            tmp.rename(self.root / name)
        except OSError as e:
            raise ModelStoreError(f"cannot add adapter {name!r}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)  # type: ignore[return-value]

    def resolve(self, name: str, base: str) -> AdapterEntry:
        """The adapter `name`, checked to be registered for the model `base`. Raises ModelStoreError."""
        entry = self.get(name)
        if entry is None:
            raise ModelStoreError(f"unknown adapter {name!r}; add it with `pie model add-adapter PATH --name {name}` "
                                  f"(added: {', '.join(e.name for e in self.list()) or 'none'})")
        if entry.base != base:
            raise ModelStoreError(f"adapter {name!r} is registered for {entry.base}, not {base}")
        return entry

    def remove(self, name: str) -> None:
        if self.get(name) is None:
            raise ModelStoreError(f"unknown adapter {name!r}")
        shutil.rmtree(self.root / name)
