"""The programmability tax: decoding through an inferlet vs the engine's built-in loop, same engine.

Reported (SmolLM2-135M on this machine, greedy, EOS ignored so every run makes exactly N tokens):
  - TPOT (time per output token) of three paths, at 1 and at C concurrent sequences (C = --concurrency,
    default 16 and 32), measured side by side: each round runs every path at every concurrency, short
    and long, the order rotating round by round, so that all see the same noise. TPOT is the slope
    between a short and a long generation, (t(N_long) - t(N_short)) / (N_long - N_short), so launch,
    prefill and teardown cancel out; the table gives the median of the per-round slopes (and the best).
      built-in:   `pie generate` (pie.control.generate: generate_batch for 1, generate_concurrently
                  for C, one instance per prompt), a generation stream per sequence;
      stream:     `pie run text_completion`, Context.generate handing its loop to the host (a stream);
      per-token:  `pie run text_completion --per-token`, the guest's own loop, one pass per token.
    The tax is each inferlet path's TPOT over the built-in's.
  - the same runs' steady state, from stamps the model runner takes at every pass: the host's gap
    before a pass (batch loop, handlers, scheduling, the streams' or the guests' steps: the critical
    path's host work) and the pass itself, medians over the passes of C one-token requests. The host
    tax, (gap - built-in's gap) / built-in's (gap + pass), is what the slope measures without the noise
    of the model's own time on a shared machine.
  - runtime overhead per forward request: a Python guest submitting 1-token passes and waiting on
    each, minus the time the runner spent running them (measured inside the FORWARD handler):
    guest -> C++ hot call -> control queue -> scheduler -> batch loop -> handler -> back.

    python benchmarks/runtime/bench_programmability_tax.py [--short 8 --long 40 --concurrency 16 32 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pie  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from pie.control import CommandKind
from pie.control.generate import GenerationParams, generate, generate_batch, generate_concurrently
from pie.engine.model import Model
from pie.runtime import Runtime, RuntimeConfig

PROMPT = "Write a long story about a lighthouse keeper."

OVERHEAD_GUEST = """
import json, sys, time
from wit_world.imports import forward as F, kv
n = int(sys.argv[1])
pages = kv.allocate(1)
F.wait(F.submit(0, F.ForwardPass([1], [], [0], pages, 1, [], [0], [F.Sampler_Greedy()], [])))
t = time.perf_counter_ns()
for i in range(n):
    F.wait(F.submit(0, F.ForwardPass([1], [], [0], pages, 1, [], [0], [F.Sampler_Greedy()], [])))
print(json.dumps({"ns": time.perf_counter_ns() - t}))
"""


def batch_shape(batch) -> tuple[int, bool]:
    """(requests, all one token) of what the handler hands the runner: a RaggedBatch (run_batch), or a
    list of requests (run, in checkouts before the packed batch)."""
    if isinstance(batch, list):
        return len(batch), all(len(r.token_ids) == 1 for r in batch)
    return batch.num_requests, all(n == 1 for n in batch.qo_lens)


class TimedRunner:
    """Wraps the runner in the FORWARD handler: accumulates the time spent in run_batch() (run() in
    checkouts before the packed batch)."""

    def __init__(self, runner):
        self.runner = runner
        self.seconds = 0.0
        self.requests = 0

    def run_batch(self, batch):
        return self._timed(self.runner.run_batch, batch)

    def run(self, requests):
        return self._timed(self.runner.run, requests)

    def _timed(self, run, batch):
        t = time.perf_counter()
        try:
            return run(batch)
        finally:
            self.seconds += time.perf_counter() - t
            self.requests += batch_shape(batch)[0]

    def __getattr__(self, name):
        return getattr(self.runner, name)


class NoopRunner:
    """The runner's limits without the model: every output is token 0."""

    def __init__(self, runner):
        self.runner = runner

    def run_batch(self, batch):
        return [0] * len(batch.output_rows)

    def run(self, requests):  # checkouts before the packed batch
        from pie.engine.batch import ForwardResult

        return [ForwardResult(outputs=[0] * len(r.outputs)) for r in requests]

    def __getattr__(self, name):
        return getattr(self.runner, name)


def builtin_time(model: Model, prompt_ids: list[int], n: int, concurrency: int) -> float:
    params = GenerationParams(max_tokens=n, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    if concurrency == 1:
        out = generate_batch(model, [prompt_ids], params)
    else:
        out = generate_concurrently(model, [prompt_ids] * concurrency, params)
    dt = time.perf_counter() - t
    assert all(len(g.token_ids) == n for g in out), [len(g.token_ids) for g in out]
    return dt


def inferlet_time(rt: Runtime, n: int, concurrency: int, per_token: bool) -> tuple[float, str]:
    args = ["--prompt", PROMPT, "--max-tokens", str(n), "--temperature", "0", "--ignore-eos"]
    args += ["--per-token"] if per_token else []
    t = time.perf_counter()
    insts = [rt.launch("text_completion", args) for _ in range(concurrency)]
    results = [i.wait(600) for i in insts]
    dt = time.perf_counter() - t
    for r in results:
        assert r.error is None, r.error
    return dt, results[0].output


PATHS = ("built-in", "stream", "per-token")


class StepStamps:
    """Wraps the model runner's run_batch (run before the packed batch; every plane over it calls it): records (start, end, requests, all
    decode) of every pass while `stamps` is a list. The steady state of C sequences is the passes of C
    one-token requests; in it, a step is one pass plus the host's gap before it (the critical path's
    host work: the batch loop, handlers, scheduling, the streams' or guests' steps)."""

    def __init__(self, runner):
        name = "run_batch" if hasattr(runner, "run_batch") else "run"
        self.run = getattr(runner, name)
        self.stamps: list | None = None
        setattr(runner, name, self)  # an instance attribute: the handlers' runner.run_batch(...) comes here

    def __call__(self, batch):
        t0 = time.perf_counter()
        try:
            return self.run(batch)
        finally:
            if self.stamps is not None:
                self.stamps.append((t0, time.perf_counter(), *batch_shape(batch)))

    def steady(self, concurrency: int) -> tuple[float, float]:
        """(median host gap before a pass, median pass time) over the steady state's passes."""
        gaps, passes = [], []
        s = self.stamps
        for k in range(1, len(s)):
            if s[k][2] == s[k - 1][2] == concurrency and s[k][3] and s[k - 1][3]:
                gaps.append(s[k][0] - s[k - 1][1])
                passes.append(s[k][1] - s[k][0])
        return statistics.median(gaps), statistics.median(passes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                   help="built-in first; against a checkout before streams: built-in stream (its text_completion "
                        "has no --per-token)")
    p.add_argument("--overhead-requests", type=int, default=300)
    p.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the tax on the GPU path)")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "programmability_tax.json"))
    a = p.parse_args()

    from pie.engine.config import EngineConfig
    from pie.engine.machine import cpu_name
    from pie.engine.model_store import DEFAULT_MODEL

    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    model = Model(a.model or DEFAULT_MODEL, EngineConfig(dtype=dtype, device=a.device), progress=False)
    prompt_ids = model.prompt_ids(PROMPT)
    concurrencies = [1] + [c for c in a.concurrency if c != 1]
    span = a.long - a.short
    paths = tuple(a.paths)
    slopes: dict[tuple[str, int], list[float]] = {(path, c): [] for path in paths for c in concurrencies}
    steady: dict[tuple[str, int], list[tuple[float, float]]] = {(path, c): [] for path in paths for c in concurrencies}
    stamps = StepStamps(model.runner)
    with Runtime(model, RuntimeConfig(deadline_s=0)) as rt:
        rt.python_runtime()
        texts = {path: inferlet_time(rt, a.short, 1, path == "per-token")[1].rstrip("\n") for path in paths
                 if path != "built-in"}
        builtin_text = generate(model, PROMPT, GenerationParams(max_tokens=a.short, temperature=0,
                                                                ignore_eos=True)).text
        assert all(text == builtin_text for text in texts.values()), (texts, builtin_text)

        def timed(path: str, n: int, c: int) -> float:
            if path == "built-in":
                return builtin_time(model, prompt_ids, n, c)
            return inferlet_time(rt, n, c, per_token=path == "per-token")[0]

        for r in range(a.rounds):
            for c in concurrencies:
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                for path in order:
                    stamps.stamps = []
                    long = timed(path, a.long, c)
                    steady[(path, c)].append(stamps.steady(c))
                    stamps.stamps = None
                    slopes[(path, c)].append((long - timed(path, a.short, c)) / span)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    rows = [{"path": path, "concurrency": c, "tpot_ms": statistics.median(slopes[(path, c)]) * 1e3,
             "tpot_ms_best": min(slopes[(path, c)]) * 1e3, "tpot_ms_rounds": [x * 1e3 for x in slopes[(path, c)]],
             "host_gap_us": statistics.median(g for g, _ in steady[(path, c)]) * 1e6,
             "pass_ms": statistics.median(p for _, p in steady[(path, c)]) * 1e3,
             "host_gap_us_rounds": [g * 1e6 for g, _ in steady[(path, c)]]}
            for c in concurrencies for path in paths]

    with Runtime(model, RuntimeConfig(deadline_s=0)) as rt:
        handler = rt.plane.loop._execute[int(CommandKind.FORWARD)].__self__  # the ForwardHandler
        timed = TimedRunner(handler.runner)
        handler.runner = timed
        r = rt.run_source(OVERHEAD_GUEST, [str(a.overhead_requests)])
        assert r.error is None, r.error
        total_ns = json.loads(r.output)["ns"]
        per_request_us = total_ns / a.overhead_requests / 1e3
        runner_us = timed.seconds / timed.requests * 1e6

    # the same loop over a no-op model: what the runtime and control layer cost alone
    with Runtime(model, RuntimeConfig(deadline_s=0)) as rt:
        handler = rt.plane.loop._execute[int(CommandKind.FORWARD)].__self__
        handler.runner = NoopRunner(handler.runner)
        r = rt.run_source(OVERHEAD_GUEST, [str(a.overhead_requests * 5)])
        assert r.error is None, r.error
        noop_us = json.loads(r.output)["ns"] / (a.overhead_requests * 5) / 1e3

    table = {"model": model.name, "device": a.device, "dtype": dtype, "cpu": cpu_name(), "rounds": a.rounds,
             "short": a.short, "long": a.long, "rows": rows,
             "overhead": {"round_trip_us": per_request_us, "runner_execute_us": runner_us,
                          "runtime_overhead_us": per_request_us - runner_us, "noop_model_round_trip_us": noop_us}}
    print(f"{model.name} on {a.device} ({cpu_name() if a.device == 'cpu' else a.device}), {a.rounds} rounds")
    print(f"{'path':<10} {'concurrent':>10} {'TPOT ms':>9} {'(best)':>8} {'tax':>8} {'per-round taxes':>20}")
    for c in concurrencies:
        base = next(r for r in rows if r["path"] == "built-in" and r["concurrency"] == c)
        for row in (r for r in rows if r["concurrency"] == c):
            line = f"{row['path']:<10} {c:>10} {row['tpot_ms']:>9.2f} {row['tpot_ms_best']:>8.2f}"
            if row is not base:
                tax = row["tpot_ms"] / base["tpot_ms"] - 1
                per_round = [x / y - 1 for x, y in zip(row["tpot_ms_rounds"], base["tpot_ms_rounds"])]
                row["tax"], row["tax_rounds"] = tax, per_round
                line += f" {100 * tax:>+7.1f}%  " + " ".join(f"{100 * t:+.1f}" for t in per_round)
            print(line)
    print("steady state (passes of C one-token requests): host gap before a pass, the pass; tax = the extra gap "
          "over the built-in's step (gap + pass)")
    print(f"{'path':<10} {'concurrent':>10} {'gap us':>9} {'pass ms':>9} {'tax':>8}")
    for c in concurrencies:
        base = next(r for r in rows if r["path"] == "built-in" and r["concurrency"] == c)
        step_us = base["host_gap_us"] + base["pass_ms"] * 1e3
        for row in (r for r in rows if r["concurrency"] == c):
            line = f"{row['path']:<10} {c:>10} {row['host_gap_us']:>9.1f} {row['pass_ms']:>9.2f}"
            if row is not base:
                row["host_tax"] = (row["host_gap_us"] - base["host_gap_us"]) / step_us
                line += f" {100 * row['host_tax']:>+7.2f}%"
            print(line)
    o = table["overhead"]
    print(f"forward request round trip {o['round_trip_us']:.1f} us = runner {o['runner_execute_us']:.1f} us "
          f"+ runtime {o['runtime_overhead_us']:.1f} us")
    print(f"forward request round trip over a no-op model: {o['noop_model_round_trip_us']:.1f} us")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
