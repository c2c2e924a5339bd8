"""The shared Python-runtime component: built with componentize-py at first use, cached.

`$PIE_HOME/python-runtime/<key>.wasm`, key = sha256 of the WIT package, the runtime's app module, the
SDK and the componentize-py version: editing any of them rebuilds it (about 10-15 s, 400 MB peak).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from pie.runtime.paths import inferlets_dir

COMPONENTIZE_PY_VERSION = "0.25.1"
APP_MODULE = "pie_python_runtime"
WORLD = "python-runtime"


def _sources() -> list[Path]:
    root = inferlets_dir()
    files = sorted((root / "wit").rglob("*.wit")) + sorted((root / "runtime" / "python").rglob("*.py")) + \
        sorted((root / "sdk" / "python").rglob("*.py"))
    return files


def check_componentize_py() -> str:
    """The installed componentize-py version; RuntimeError unless it is the pinned one."""
    from importlib.metadata import version

    found = version("componentize-py")
    if found != COMPONENTIZE_PY_VERSION:
        raise RuntimeError(f"componentize-py {found} is installed; pie needs componentize-py=={COMPONENTIZE_PY_VERSION}")
    return found


def componentize(world: str, app_module: str, paths: list[Path], out: Path) -> subprocess.CompletedProcess:
    """Runs componentize-py on `app_module` (found on `paths`) for `world` of inferlets/wit, writing `out`.
    A child process: its memory (about 400 MB) goes when it ends. The caller checks the result."""
    cmd = [sys.executable, "-c", "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; script()",
           "-d", str(inferlets_dir() / "wit"), "-w", world, "componentize", app_module]
    for p in paths:
        cmd += ["-p", str(p)]
    return subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True)


def source_key() -> str:
    found = check_componentize_py()
    h = hashlib.sha256(f"componentize-py={found}\0python={sys.version_info[:2]}\0".encode())
    root = inferlets_dir()
    for f in _sources():
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def build(out: Path) -> None:
    """Runs componentize-py (a child process: its memory goes when it ends)."""
    root = inferlets_dir()
    proc = componentize(WORLD, APP_MODULE, [root / "runtime" / "python", root / "sdk" / "python"], out)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        raise RuntimeError("building the Python runtime with componentize-py failed:\n" + "\n".join(tail))


def ensure_built(home: Path) -> Path:
    """Path of the runtime component for the current sources, building it if needed (one builder at a
    time across processes: a lock file)."""
    folder = home / "python-runtime"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source_key()}.wasm"
    if path.exists():
        return path
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in folder.glob("*.wasm"):  # builds of older sources (20 MB each)
            if stale != path:
                stale.unlink(missing_ok=True)
    return path
