"""Helpers of the benchmark suite (benchmarks/suite): the reported clock, the regression-demonstration
sleep, the machine's name, and the results writer (benchmarks/results/bench_suite_<cpu>.{json,md}).

The reported clock. Most benchmarks are timed by pytest-benchmark's own wall clock around the measured
function. Some quantities are not the duration of one Python call: the time a guest measures inside
itself (a loop of host calls, forward round trips), a slope between two generation lengths (TPOT), or a
per-request latency among 16 concurrent clients. Those tests carry `@REPORTED` (a pytest-benchmark
`timer=`) and measure with `measure_reported(benchmark, sample, rounds)`: `sample()` returns the seconds of
one measurement, and the clock advances by exactly that much, so pytest-benchmark's statistics (min,
median, IQR, rounds) are those of the measurements themselves.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from pie.engine.machine import cpu_name, cpu_slug  # noqa: F401  (the suite names its machine with these)

ROOT = Path(__file__).resolve().parents[2]  # the checkout
RESULTS_DIR = ROOT / "benchmarks" / "results"

_reported = [0.0]


def reported_clock() -> float:
    """The suite's reported clock: moves only by what `report` adds (see the module doc)."""
    return _reported[0]


def report(seconds: float) -> None:
    _reported[0] += seconds


REPORTED = pytest.mark.benchmark(timer=reported_clock)


def measure_reported(benchmark: Any, sample: Callable[[], float], rounds: int, warmup_rounds: int = 1) -> None:
    """Runs `sample` (-> seconds of one measurement) `rounds` times (after `warmup_rounds` unrecorded ones)
    as the test's benchmark on the reported clock. The test must carry @REPORTED."""
    timer = getattr(benchmark, "_timer", reported_clock)
    if timer is not reported_clock:
        raise RuntimeError("measure_reported needs the test marked @REPORTED (pytest-benchmark timer=reported_clock)")
    benchmark.pedantic(lambda: report(sample()), rounds=rounds, warmup_rounds=warmup_rounds)


def ops(benchmark: Any, n: int, unit: str) -> None:
    """The measured function does `n` operations of `unit`: the results table shows the time per one."""
    benchmark.extra_info["ops"] = n
    benchmark.extra_info["op"] = unit


# ---- the regression demonstration -----------------------------------------------------------------
INJECT_ENV = "PIE_BENCH_INJECT_SLEEP_US"


def injected_sleep_s() -> float:
    """Seconds of sleep to add inside one benchmark's measured function (only to demonstrate that the
    compare step catches a slowed hot path; never set it otherwise)."""
    try:
        return max(0.0, float(os.environ.get(INJECT_ENV, "0") or 0)) / 1e6
    except ValueError:
        return 0.0


# ---- the machine: pie.engine.machine (cpu_name, cpu_slug) ------------------------------------------------
def slug(text: str) -> str:
    """'Intel(R) Xeon(R) Processor @ 2.80GHz' -> 'intel_r_xeon_r_processor_2_80ghz'
    (as benchmarks/cuda/results.py names devices)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


# ---- results ---------------------------------------------------------------------------------------------
LAYERS = [("control", "Control layer"), ("runtime", "Runtime"), ("engine", "Engine"), ("e2e", "End to end"),
          ("cuda", "CUDA")]


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def summarize(run: dict) -> dict:
    """The results document of one pytest-benchmark JSON run (its `benchmarks`, machine and commit)."""
    pie = run.get("pie", {})
    commit = run.get("commit_info", {})
    rows = []
    for b in run["benchmarks"]:
        s = b["stats"]
        info = dict(b.get("extra_info", {}))
        n = info.get("ops")
        rows.append({
            "name": b["name"], "fullname": b["fullname"], "group": b.get("group"),
            "median_s": s["median"], "iqr_s": s["iqr"], "min_s": s["min"], "mean_s": s["mean"],
            "stddev_s": s["stddev"], "rounds": s["rounds"], "iterations": s.get("iterations", 1),
            "timer": b.get("options", {}).get("timer"),
            "per_op_s": s["median"] / n if n else None, "op": info.get("op"), "extra_info": info,
        })
    return {
        "cpu": pie.get("cpu", run.get("machine_info", {}).get("cpu", {}).get("brand_raw")),
        "cores": pie.get("cores"),
        "commit": commit.get("id"), "dirty": commit.get("dirty"), "branch": commit.get("branch"),
        "datetime": run.get("datetime"), "python": run.get("machine_info", {}).get("python_version"),
        "torch": pie.get("torch"), "load_average": pie.get("load_average"),
        "suite_seconds": pie.get("suite_seconds"), "command": pie.get("command"),
        "benchmarks": rows,
    }


def markdown(doc: dict) -> str:
    commit = (doc["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if doc.get("dirty") else "")
    took = f"; the suite took {doc['suite_seconds']:.0f} s" if doc.get("suite_seconds") is not None else ""
    lines = [
        f"# pie benchmark suite on {doc['cpu']} ({doc['cores']} cores)",
        "",
        f"Generated by `{doc.get('command') or 'pytest benchmarks/suite'}` (benchmarks/suite; not "
        f"edited by hand). Commit {commit}, {doc['datetime']}, Python {doc['python']}, torch {doc['torch']}; "
        f"load average at the start {doc.get('load_average')}{took}.",
        "",
        "Median and interquartile range (IQR) of each benchmark's rounds; 'per op' is the median divided by "
        "the operations one round does. Rows marked * are timed by the reported clock: measurements the "
        "benchmark takes itself (inside a guest, a slope between two lengths, a latency per request); see "
        "benchmarks/suite/README.md.",
    ]
    by_layer: dict[str, list[dict]] = {}
    for row in doc["benchmarks"]:
        layer = row["fullname"].split("::")[0].split("/")[-1].removeprefix("bench_").removesuffix(".py")
        by_layer.setdefault(layer, []).append(row)
    known = [key for key, _ in LAYERS]
    for key, title in LAYERS + [(k, k) for k in by_layer if k not in known]:
        rows = by_layer.get(key)
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| benchmark | median | IQR | per op | rounds |", "| --- | ---: | ---: | ---: | ---: |"]
        for row in rows:
            star = " *" if row["timer"] and "reported_clock" in row["timer"] else ""
            per = f"{_fmt_s(row['per_op_s'])} / {row['op']}" if row["per_op_s"] is not None else ""
            lines.append(f"| {row['name']}{star} | {_fmt_s(row['median_s'])} | {_fmt_s(row['iqr_s'])} | {per} | "
                         f"{row['rounds']} |")
    return "\n".join(lines) + "\n"


def write_results(run: dict, out_dir: Path = RESULTS_DIR) -> list[Path]:
    import json

    doc = summarize(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_suite_{slug(doc['cpu'] or 'unknown')}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown(doc))
    return paths
