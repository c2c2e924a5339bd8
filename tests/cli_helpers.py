"""Running the `pie` command in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def run_pie(*args: str, env: dict[str, str] | None = None, timeout: int = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m pie.cli ARGS`, run from a neutral folder so that the installed package is imported,
    not the checkout's source tree (which has no compiled modules). `env` adds to the environment."""
    return subprocess.run([sys.executable, "-m", "pie.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=tempfile.gettempdir(),
                          input=stdin)
