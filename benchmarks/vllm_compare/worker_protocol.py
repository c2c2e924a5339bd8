"""What both sides' workers share (each runs in its own venv: this file imports neither pie nor vLLM)."""

from __future__ import annotations

import os
import sys


def protocol_stdout():
    """The real stdout for the JSON a worker answers with; file descriptor 1 becomes stderr, so that
    whatever the libraries (or the guests) print goes there."""
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def default_steps(n: int) -> int:
    """Decode steps measured at N running sequences: fewer as N grows (about 12,800 request-steps)."""
    return {1: 2000, 32: 300, 128: 100}.get(n, max(20, 12800 // max(n, 1)))
