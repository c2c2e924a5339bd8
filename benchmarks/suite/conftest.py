"""Fixtures and hooks of the benchmark suite (see README.md here).

    pytest benchmarks/suite                                 # the whole suite; writes benchmarks/results/
    pytest benchmarks/suite --benchmark-disable             # each benchmark once, untimed (CI-safe smoke)
    scripts/bench_regress.sh                                # run, save under benchmarks/.runs/, compare

Session fixtures: `model` (SmolLM2-135M on the CPU, float32, as `pie generate` loads it), `runtime` (a
Runtime over it, no deadline), `server` (`pie serve` on a free port, serving that runtime). At the end of
a complete, clean run (every benchmark selected, none failed, no injected sleep, not --benchmark-disable)
the results are written to benchmarks/results/bench_suite_<cpu>.{json,md}.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

import pie  # noqa: F401  (before torch: pie sets OMP_WAIT_POLICY, read when torch loads OpenMP)
import torch  # noqa: E402

import pie_bench  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SUITE = Path(__file__).resolve().parent
_started = {"t": time.time(), "load": None}


def pytest_addoption(parser):
    parser.addoption("--bench-results", choices=["auto", "off"], default="auto",
                     help="auto (default): write benchmarks/results/bench_suite_<cpu>.{json,md} at the end of a "
                          "complete, clean run; off: never")


def pytest_sessionstart(session):
    _started["t"] = time.time()
    try:
        _started["load"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass


# ---- metadata in every saved run ---------------------------------------------------------------------
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model"] = pie_bench.cpu_name()
    machine_info["cpu_slug"] = pie_bench.cpu_slug()
    machine_info["cpu_count"] = os.cpu_count()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["pie"] = {
        "cpu": pie_bench.cpu_name(),
        "cpu_slug": pie_bench.cpu_slug(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": _started["load"],
        "suite_seconds": round(time.time() - _started["t"], 1),
        "command": "pytest " + " ".join(_display_args(config)),
        "injected_sleep_us": pie_bench.injected_sleep_s() * 1e6,
    }


def _display_args(config) -> list[str]:
    root = pie_bench.ROOT
    out = []
    for arg in config.invocation_params.args:
        p = Path(config.invocation_params.dir, arg.split("::")[0])
        out.append(os.path.relpath(p, root) + arg[len(arg.split("::")[0]):] if p.exists() else arg)
    return out or [os.path.relpath(SUITE, root)]


# ---- the results files ------------------------------------------------------------------------------
def _complete_run(session, exitstatus) -> str | None:
    """Why this run must not write the results files (None: it may)."""
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    if config.getoption("bench_results") == "off":
        return "--bench-results=off"
    if bs is None or bs.disabled or not bs.benchmarks:
        return "no benchmark was timed"
    if exitstatus != 0:
        return "the run failed"
    if pie_bench.injected_sleep_s():
        return f"{pie_bench.INJECT_ENV} is set"
    if config.getoption("keyword") or config.getoption("markexpr") or config.getoption("deselect"):
        return "a selection (-k / -m / --deselect) ran part of the suite"
    for arg in config.invocation_params.args:
        if arg.startswith("-"):
            continue
        p = Path(config.invocation_params.dir, arg).resolve()
        if "::" in arg or (p.exists() and p != SUITE):
            return "only part of the suite was given"
    return None


_summary: list[str] = []


def pytest_sessionfinish(session, exitstatus):
    why_not = _complete_run(session, exitstatus)
    if why_not is not None:
        if session.config.getoption("bench_results") != "off":
            _summary.append(f"benchmarks/results/ not written: {why_not}")
        return
    config = session.config
    bs = config._benchmarksession
    commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
    config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    run = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=bs.benchmarks, include_data=False,
                                                     machine_info=bs.get_machine_info(), commit_info=commit_info)
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=bs.benchmarks, output_json=run)
    paths = pie_bench.write_results(run)
    _summary.append("results written: " + ", ".join(os.path.relpath(p, pie_bench.ROOT) for p in paths))


def pytest_terminal_summary(terminalreporter):
    for line in _summary:
        terminalreporter.write_line(line)


# ---- every benchmark in its layer's group ----------------------------------------------------------------
@pytest.fixture(autouse=True)
def _layer_group(request):
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        if bm.group is None:
            bm.group = request.module.__name__.removeprefix("bench_")
    yield


# ---- shared state ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model():
    """The default model (SmolLM2-135M), float32 on the CPU, as `pie generate` and `pie serve` load it."""
    from pie.engine.model import Model

    return Model(progress=False)


@pytest.fixture(scope="session")
def runtime(model):
    """A Runtime over the model, no deadline (long-lived guests); the Python runtime built or loaded once."""
    from pie.runtime import Runtime, RuntimeConfig

    rt = Runtime(model, RuntimeConfig(deadline_s=0))
    rt.python_runtime()
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def server(runtime, tmp_path_factory):
    """`pie serve` (the OpenAI routes) on a free local port, serving the session's runtime."""
    from pie.server import ServerThread, load_config

    cfg = load_config().replace(server={"port": 0})
    srv = ServerThread(cfg, runtime=runtime, programs_dir=tmp_path_factory.mktemp("programs")).start()
    yield srv
    srv.stop()


def pytest_report_header(config):
    return [f"pie benchmark suite: {pie_bench.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}"]
