"""Runtime (wasmtime host, csrc/runtime + pie/_ext/_runtime.pyx): guest -> host calls, launch -> first host
call, and a forward pass's round trip from a Python guest over a no-op model.

- WAT guest -> hot call (kv.page-size, C++) and -> cold call (kv.num-free-pages, Python through the shim):
  the hand-written component of tests/runtime/wat_guests.py loops n calls; timed around the export call.
- Python guest -> hot call (runtime.instance-id) and -> cold call (runtime.version): a long-lived guest
  (componentize-py) times n calls itself, less its empty loop (reported clock).
- launch -> first host call: a Python inferlet whose first statement is runtime.log; from `launch_source`
  to the log reaching the host (warm: the runtime component is compiled and cached).
- forward round trip over a no-op model: the long-lived guest submits one-token passes and waits on
  each, timed inside the guest, with the model's forward replaced by zero logits (the runtime, the
  control layer, the runner's batch building and sampling remain; as benchmarks/runtime/bench_forward_path.py).
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import torch
import wasmtime

from pie_bench import REPORTED, measure_reported, ops
from wat_guests import HOT_CALLS  # tests/runtime/wat_guests.py

# The same loop over a cold call with the same signature (func() -> u32): kv.num-free-pages.
COLD_CALLS = HOT_CALLS.replace('"page-size"', '"num-free-pages"')

GUEST = """
import json, time
from wit_world.imports import forward as F, kv, runtime

pages = kv.allocate(1)
def forward():
    F.wait(F.submit(0, F.ForwardPass([1], [], [0], pages, 1, [], [0], [F.Sampler_Greedy()], [])))

while True:
    what, n = runtime.receive().split()
    n = int(n)
    if what == "stop":
        break
    t = time.perf_counter_ns()
    for _ in range(n): pass
    base = time.perf_counter_ns() - t
    t = time.perf_counter_ns()
    if what == "hot":
        for _ in range(n): runtime.instance_id()
    elif what == "cold":
        for _ in range(n): runtime.version()
    elif what == "forward":
        base = 0
        for _ in range(n): forward()
    runtime.send(json.dumps({"ns": time.perf_counter_ns() - t - base}))
kv.free(pages)
"""


class Guest:
    """The long-lived Python guest above: `ask(what, n)` -> seconds it measured for n of `what`."""

    def __init__(self, runtime):
        self.replies: queue.Queue[str] = queue.Queue()
        self.inst = runtime.launch_source(GUEST, deadline_s=0, on_output=self.replies.put, keep_output=False)

    def ask(self, what: str, n: int) -> float:
        self.inst.send(f"{what} {n}")
        while True:
            try:
                return json.loads(self.replies.get(timeout=0.5))["ns"] / 1e9
            except queue.Empty:
                if self.inst.done.is_set():
                    raise RuntimeError(f"the guest ended: {self.inst.wait().error}") from None

    def close(self) -> None:
        self.inst.send("stop 0")
        result = self.inst.wait(60)
        assert result.error is None, result.error


@pytest.fixture(scope="module")
def guest(runtime):
    g = Guest(runtime)
    g.ask("hot", 100)  # imported, warm
    yield g
    g.close()


# ---- WAT guest -> host -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, calls", [("hot", 20000), ("cold", 2000)])
def test_wat_guest_call(benchmark, runtime, kind, calls):
    state = runtime.bind_test_instance()
    try:
        store = wasmtime.Store(runtime.wasm_engine)
        store.set_epoch_deadline(1 << 40)
        component = runtime.load_component((HOT_CALLS if kind == "hot" else COLD_CALLS).encode())
        func = runtime.linker.instantiate(store, component).get_func(store, "calls")
        func(store, 10)
        ops(benchmark, calls, "call")
        benchmark(func, store, calls)
    finally:
        runtime.release_test_instance(state)


# ---- Python guest -> host ---------------------------------------------------------------------------------
@REPORTED
@pytest.mark.parametrize("kind, calls", [("hot", 20000), ("cold", 5000)])
def test_python_guest_call(benchmark, guest, kind, calls):
    ops(benchmark, calls, "call")
    measure_reported(benchmark, lambda: guest.ask(kind, calls), rounds=15, warmup_rounds=2)


# ---- launch -> first host call ------------------------------------------------------------------------------
FIRST_CALL = "from wit_world.imports import runtime\nruntime.log('x')\n"


@REPORTED
def test_launch_to_first_host_call(benchmark, runtime):
    def sample() -> float:
        logged = threading.Event()
        first: list[float] = []

        def on_log(message: str) -> None:
            if not first:
                first.append(time.perf_counter())
                logged.set()

        t0 = time.perf_counter()
        inst = runtime.launch_source(FIRST_CALL, on_log=on_log)
        assert logged.wait(60)
        result = inst.wait(60)
        assert result.error is None, result.error
        return first[0] - t0

    measure_reported(benchmark, sample, rounds=25, warmup_rounds=3)


# ---- forward round trip over a no-op model ----------------------------------------------------------------
@pytest.fixture
def noop_model(model):
    """The model's forward replaced by zero logits of its output rows (pages, batch building and sampling
    remain); undone after the test."""
    runner = model.runner
    vocab = runner.model_config.vocab_size
    runner.forward = lambda batch: torch.zeros(len(batch.output_rows), vocab)
    try:
        yield
    finally:
        del runner.forward  # the class's method again


@REPORTED
def test_forward_round_trip_noop_model(benchmark, guest, noop_model):
    n = 200
    ops(benchmark, n, "round trip")
    measure_reported(benchmark, lambda: guest.ask("forward", n), rounds=25, warmup_rounds=2)
