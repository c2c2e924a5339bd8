"""The benchmark suite (benchmarks/suite, run on demand) cannot rot: every benchmark runs once, untimed."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_once(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("bench_suite_*")}
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/suite", "--benchmark-disable", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONSAFEPATH": "1"})  # the installed pie, not the checkout's
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("bench_suite_*")}
    assert after == before, "an untimed run must not overwrite the suite's results"
