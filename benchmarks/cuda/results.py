"""Where the GPU benchmarks put their results: benchmarks/results/<name>_<device slug>.{json,md}, and a
copy in an output folder (the device tool's $OUT) when one is given."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()


def write_results(name: str, device: str, result: dict, table: list[str], out: str | None) -> list[Path]:
    """Writes the JSON and the markdown table; copies both into `out` if given. Returns the paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{device_slug(device)}"
    paths = [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text("\n".join(table) + "\n")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(out) / p.name)
    return paths
