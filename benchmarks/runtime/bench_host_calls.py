"""Guest -> host call cost through our C++/Cython shim vs stock wasmtime-py callbacks, and
launch-to-first-host-call latency.

Reported:
  - WAT guest, kv.page-size: ns per call, shim (C++ callback) vs stock (Python callback via wasmtime-py)
  - Python guest: runtime.instance-id (hot, C++), runtime.version (cold: Python through the shim) vs the
    same calls on a linker of stock wasmtime-py callbacks; the guest's empty-loop time is subtracted
  - list<u32> of 1024 page handles: kv.allocate(1024) + kv.free(list) through the shim (both directions),
    next to a cold call carrying the same bytes as one 4 KiB string (runtime.log)
  - launch -> first host call of a Python inferlet (cold: first launch in the process; warm: later ones)

    python benchmarks/runtime/bench_host_calls.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import wasmtime
from wasmtime.component import Linker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "runtime"))
from wat_guests import HOT_CALLS, STOCK_CALLS  # noqa: E402

from pie.engine.generate import Model  # noqa: E402
from pie.runtime import Runtime, api  # noqa: E402

PY_GUEST = """
import json, sys, time
from wit_world.imports import runtime, kv
n = int(sys.argv[1])
t = time.perf_counter_ns()
for _ in range(n): pass
base = time.perf_counter_ns() - t
t = time.perf_counter_ns()
for _ in range(n): runtime.instance_id()
hot = time.perf_counter_ns() - t
t = time.perf_counter_ns()
for _ in range(n): runtime.version()
cold = time.perf_counter_ns() - t
lists = string4k = None
if len(sys.argv) > 2:
    t = time.perf_counter_ns()
    for _ in range(100):
        kv.free(kv.allocate(1024))
    lists = (time.perf_counter_ns() - t) / 100
    s = "x" * 4096  # the bytes of 1024 u32 token ids, as a string argument
    t = time.perf_counter_ns()
    for _ in range(1000):
        runtime.log(s)
    string4k = (time.perf_counter_ns() - t) / 1000
print(json.dumps({"hot": (hot - base) / n, "cold": (cold - base) / n, "list1024_roundtrip": lists,
                  "string4k_cold_call": string4k}))
"""


def wat_ns_per_call(rt: Runtime, linker: Linker, wat: str, n: int, bind: bool) -> float:
    state = rt.bind_test_instance() if bind else None
    store = wasmtime.Store(rt.wasm_engine)
    store.set_epoch_deadline(1 << 40)
    calls = linker.instantiate(store, rt.load_component(wat.encode())).get_func(store, "calls")
    calls(store, 10)
    t = time.perf_counter()
    calls(store, n)
    dt = time.perf_counter() - t
    if state is not None:
        rt.release_test_instance(state)
    return dt / n * 1e9


def stock_linker(rt: Runtime, args: list[str], out: list[str]) -> Linker:
    """Every WIT function as a stock wasmtime-py Python callback (what our shim replaces)."""
    linker = Linker(rt.wasm_engine)
    linker.add_wasip2()
    impl = {
        ("runtime", "instance-id"): lambda store: 1,
        ("runtime", "version"): lambda store: "0.1.0",
        ("runtime", "arguments"): lambda store: list(args),
        ("runtime", "send"): lambda store, m: out.append(m),
        ("runtime", "log"): lambda store, m: None,
    }

    def missing(call):
        def f(store, *a):
            raise RuntimeError(f"not in the benchmark: {call}")
        return f

    with linker.root() as root:
        with root.add_instance("bench:host/noop") as li:
            li.add_func("page-size", lambda store: 16)
        for iface, names in api.wit_functions().items():
            with root.add_instance(f"{api.PACKAGE}/{iface}@{api.VERSION}") as li:
                for name in names:
                    li.add_func(name, impl.get((iface, name), missing(f"{iface}.{name}")))
    return linker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--launches", type=int, default=20)
    a = p.parse_args()
    rt = Runtime(Model(progress=False))
    results: dict[str, float] = {}

    # launch -> first host call (runtime.log from the user's script, after the runtime's own calls)
    def launch_latency() -> float:
        first: list[float] = []
        t0 = time.perf_counter()
        rt.launch_source("from wit_world.imports import runtime\nruntime.log('x')\n",
                         on_log=lambda m: first.append(time.perf_counter())).wait(60)
        return (first[0] - t0) * 1e3

    rt.python_runtime()  # built / compiled before timing (disk cache); the first launch instantiates cold
    results["launch_to_first_call_ms_cold"] = launch_latency()
    results["launch_to_first_call_ms_warm_median"] = statistics.median(launch_latency() for _ in range(a.launches))

    stock_out: list[str] = []
    stock = stock_linker(rt, [str(a.calls // 10)], stock_out)
    results["wat_shim_ns_per_call"] = wat_ns_per_call(rt, rt.linker, HOT_CALLS, a.calls, bind=True)
    results["wat_stock_ns_per_call"] = wat_ns_per_call(rt, stock, STOCK_CALLS, a.calls // 10, bind=False)

    r = rt.run_source(PY_GUEST, [str(a.calls), "lists"])
    assert r.error is None, r.error
    shim = json.loads(r.output)
    results["py_shim_hot_ns_per_call"] = shim["hot"]
    results["py_shim_cold_ns_per_call"] = shim["cold"]
    results["py_shim_list1024_alloc_free_us"] = shim["list1024_roundtrip"] / 1e3
    results["py_shim_cold_call_4KiB_string_us"] = shim["string4k_cold_call"] / 1e3

    store = wasmtime.Store(rt.wasm_engine)
    store.set_wasi(wasmtime.WasiConfig())
    store.set_epoch_deadline(1 << 40)
    inst = stock.instantiate(store, rt.python_runtime())
    err = inst.get_func(store, "exec-source")(store, PY_GUEST, "bench.py")
    assert err is None, err
    st = json.loads("".join(stock_out))
    results["py_stock_hot_ns_per_call"] = st["hot"]
    results["py_stock_cold_ns_per_call"] = st["cold"]
    del inst, store
    rt.close()
    for k, v in results.items():
        print(f"{k:40s} {v:10.1f}")


if __name__ == "__main__":
    main()
