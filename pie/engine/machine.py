"""The machine a figure was measured on: every benchmark names its CPU with this."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor @ 2.80GHz"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_slug() -> str:
    """cpu_name() as a file-name part: lowercase, runs of other characters as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", cpu_name().lower()).strip("_")
