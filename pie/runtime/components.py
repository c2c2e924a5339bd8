"""The wasmtime engine and the compiled-component cache.

Compiled components live in `$PIE_HOME/components/<key>.cwasm`, key = sha256 of (component bytes,
wasmtime version, engine settings): a change of any of them compiles afresh. Loading a cached one is a
`Component.deserialize_file` (milliseconds instead of seconds of compilation). A load marks its file as
used (mtime); when the cache grows past CACHE_LIMIT_BYTES the least recently used files go (a Python
runtime compiles to ~40-50 MB, and each SDK or wasmtime change makes a new one).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import wasmtime
from wasmtime.component import Component

WASMTIME_VERSION = "50.0.1"  # pinned: csrc/runtime declares the C API layouts of this version
# Engine settings that change compiled code; part of the cache key.
ENGINE_SETTINGS = "component-model;epoch-interruption;opt=speed"
CACHE_LIMIT_BYTES = 1 << 30


def check_wasmtime_version() -> None:
    from importlib.metadata import version

    found = version("wasmtime")
    if found != WASMTIME_VERSION:
        raise RuntimeError(f"wasmtime {found} is installed; the runtime is built for wasmtime=={WASMTIME_VERSION} "
                           f"(pip install wasmtime=={WASMTIME_VERSION})")


def make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.wasm_component_model = True
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    return wasmtime.Engine(config)


def cache_key(wasm: bytes) -> str:
    h = hashlib.sha256(wasm)
    h.update(f"\0wasmtime={WASMTIME_VERSION}\0{ENGINE_SETTINGS}".encode())
    return h.hexdigest()


def load_component(engine: wasmtime.Engine, wasm: bytes, cache_dir: Path) -> Component:
    """The compiled component of `wasm` (binary or WAT text), from the cache or compiled and cached."""
    key = cache_key(wasm)
    path = cache_dir / f"{key}.cwasm"
    if path.exists():
        try:
            component = Component.deserialize_file(engine, str(path))
            os.utime(path)
            return component
        except wasmtime.WasmtimeError:
            path.unlink(missing_ok=True)  # stale or corrupt: compile again
    try:
        component = Component(engine, wasm)
    except wasmtime.WasmtimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip() and l.strip() != "Caused by:"]
        detail = "; ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines[0] if lines else "invalid")
        raise InvalidComponent(f"not a WebAssembly component: {detail}") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(component.serialize())
    os.replace(tmp, path)  # atomic: concurrent loaders see a whole file or none
    trim_cache(cache_dir, keep=path)
    return component


def trim_cache(cache_dir: Path, keep: Path, limit: int = CACHE_LIMIT_BYTES) -> list[Path]:
    """Removes the least recently used compiled components until the cache fits `limit` (never `keep`)."""
    entries = []
    for f in cache_dir.glob("*.cwasm"):
        try:
            st = f.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if f != keep:
            f.unlink(missing_ok=True)
            total -= size
            removed.append(f)
    return removed


class InvalidComponent(ValueError):
    """The file is not a component (or not one of the inferlet worlds)."""
