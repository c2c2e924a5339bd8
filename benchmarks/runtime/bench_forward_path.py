"""The cost of one forward pass's path through the layers, this tree against another, side by side.

    python benchmarks/runtime/bench_forward_path.py [--against /path/to/other/checkout --against-python PY]
                                                    [--rounds 7] [--quick] [--out PREFIX]

On the CPU, SmolLM2-135M, greedy. Each tree runs in a worker process of its own (model and runtime
loaded once); the parent asks the workers for one measurement at a time, alternating between the trees,
round after round, so that both see the same noise (the machine is shared). The table shows the best
(smallest) value of each measurement, its median, and the ratio; decode rows are the median over the
rounds of each round's slope (wall time, and CPU time of the whole process):
  - round trip over a no-op runner: a Python guest submitting one-token passes and waiting on each, the
    runner replaced by one that answers at once (runtime + control layer alone);
  - round trip over a no-op model: the same, with only the model's forward replaced by zero logits (the
    runner's batch building and sampling included);
  - host work per decode step at batch 1 and 32: that many guests decoding one-token passes together
    over the no-op model, time per step (the scheduler puts the 32 in one batch);
  - decode TPOT of `pie generate`'s loop and of `pie run text_completion` with the real model: the slope
    between a short and a long generation, (t(long) - t(short)) / (long - short), so that launch and
    prefill cancel out.

With --against, the other checkout runs the same measurements through its own API (this file adapts to
the names of the tree it runs in: before the redesign the model was `pie.engine.generate.Engine`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GUEST = """
import json, sys, time
from wit_world.imports import forward as F, kv
n = int(sys.argv[1])
pages = kv.allocate(1)
def step():
    F.wait(F.submit(0, F.ForwardPass([1], [], [0], pages, 1, [], [0], [F.Sampler_Greedy()], [])))
for _ in range(20):
    step()
t = time.perf_counter_ns()
for i in range(n):
    step()
print(json.dumps({"ns": time.perf_counter_ns() - t}))
"""

PROMPT = "Write a long story about a lighthouse keeper."


# ---- what differs between the trees ----------------------------------------------------------------
def load_model():
    try:
        from pie.engine.model import Model  # after the redesign
        return Model(progress=False)
    except ImportError:
        from pie.engine.generate import Engine  # before
        return Engine(progress=False)


def builtin_generate(model, prompts, params):
    try:
        from pie.control.generate import generate_batch
    except ImportError:
        return model.generate_batch(prompts, params)
    return generate_batch(model, prompts, params)


def generation_params(**kwargs):
    try:
        from pie.control.generate import GenerationParams
    except ImportError:
        from pie.engine.generate import GenerationParams
    return GenerationParams(**kwargs)


def forward_handler(rt):
    """The runtime's FORWARD handler object (it holds the runner as `.runner`)."""
    return rt.plane.loop._execute[0].__self__


class NoopRunner:
    """Answers every output at once with token 0 (the packed batch's `run_batch`; for older checkouts the
    `run` of the redesign and the `execute` before it)."""

    def __init__(self, runner):
        self.runner = runner

    def run_batch(self, batch):
        return [0] * len(batch.output_rows)

    def run(self, requests):
        from pie.engine.batch import ForwardResult

        return [ForwardResult(outputs=[0] * len(r.outputs)) for r in requests]

    execute = run

    def __getattr__(self, name):
        return getattr(self.runner, name)


def stub_model_forward(runner):
    """Replaces the model's forward by zero logits (M, vocab) of the output rows; returns an undo."""
    import torch

    vocab = runner.model_config.vocab_size
    for name in ("_forward_torch", "forward"):  # the runner's seam that computes logits (before, after)
        if hasattr(runner, name):
            original = getattr(runner, name)

            def zeros(*args, **kwargs):
                return torch.zeros(_output_rows(args), vocab)

            setattr(runner, name, zeros)
            return lambda: setattr(runner, name, original)
    raise RuntimeError("no model-forward seam found on this runner")


def _output_rows(args) -> int:
    rows = getattr(args[0], "output_rows", None)  # the redesign: forward(RaggedBatch)
    if rows is None:  # before: _forward_torch(layouts, token_ids, positions, write_slots, output_rows, ...)
        rows = args[4]
    return len(rows)


# ---- the worker: one tree's measurements, on request ------------------------------------------------
class Worker:
    def __init__(self):
        import pie  # noqa: F401  (before torch: OMP_WAIT_POLICY)
        from pie.runtime import Runtime, RuntimeConfig

        self.model = load_model()
        self.rt = Runtime(self.model, RuntimeConfig(deadline_s=0))
        self.rt.python_runtime()
        self.handler = forward_handler(self.rt)
        self.runner = self.handler.runner
        self.prompt_ids = self.model.prompt_ids(PROMPT)
        self.inferlet(2), self.builtin(2)  # warm

    def round_trip_us(self, n: int) -> float:
        r = self.rt.run_source(GUEST, [str(n)])
        assert r.error is None, r.error
        return json.loads(r.output)["ns"] / n / 1e3

    def noop_runner_round_trip_us(self, n: int) -> float:
        self.handler.runner = NoopRunner(self.runner)
        try:
            return self.round_trip_us(n)
        finally:
            self.handler.runner = self.runner

    def noop_model_round_trip_us(self, n: int) -> float:
        undo = stub_model_forward(self.runner)
        try:
            return self.round_trip_us(n)
        finally:
            undo()

    def decode_step_ms(self, batch: int, steps: int) -> float:
        undo = stub_model_forward(self.runner)
        try:
            insts = [self.rt.launch_source(GUEST, [str(steps)]) for _ in range(batch)]
            results = [i.wait(600) for i in insts]
        finally:
            undo()
        for r in results:
            assert r.error is None, r.error
        # each guest times its own steps, all running together: the slowest is the wall time
        return max(json.loads(r.output)["ns"] for r in results) / steps / 1e6

    def inferlet(self, tokens: int) -> list[float]:
        """[wall seconds, CPU seconds of the process] of one text_completion run."""
        args = ["--prompt", PROMPT, "--temperature", "0", "--ignore-eos", "--max-tokens", str(tokens)]
        t, c = time.perf_counter(), time.process_time()
        r = self.rt.run("text_completion", args)
        assert r.error is None, r.error
        return [time.perf_counter() - t, time.process_time() - c]

    def builtin(self, tokens: int) -> list[float]:
        """[wall seconds, CPU seconds of the process] of one generation by the built-in loop."""
        params = generation_params(max_tokens=tokens, temperature=0, ignore_eos=True)
        t, c = time.perf_counter(), time.process_time()
        [g] = builtin_generate(self.model, [self.prompt_ids], params)
        assert len(g.token_ids) == tokens
        return [time.perf_counter() - t, time.process_time() - c]

    def serve(self) -> None:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            value = getattr(self, request["measure"])(*request["args"])
            print(json.dumps({"value": value}), flush=True)
        self.rt.close()


class WorkerProcess:
    def __init__(self, tree: Path, python: str):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"], env=env, cwd=str(tree),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, measure: str, *args) -> float:
        self.proc.stdin.write(json.dumps({"measure": measure, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return self._read()["value"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def plan(quick: bool) -> tuple[list[tuple[str, str, tuple]], tuple[int, int]]:
    """The steps of one round, (row key, worker measure, its arguments), and the TPOT lengths."""
    n = 500 if quick else 2000
    short, long = (4, 16) if quick else (8, 40)
    return [
        ("noop_runner_round_trip_us", "noop_runner_round_trip_us", (n,)),
        ("noop_model_round_trip_us", "noop_model_round_trip_us", (n,)),
        ("decode_step_ms_b1", "decode_step_ms", (1, 100 if quick else 200)),
        ("decode_step_ms_b32", "decode_step_ms", (32, 30 if quick else 60)),
        ("builtin_short_s", "builtin", (short,)),
        ("builtin_long_s", "builtin", (long,)),
        ("inferlet_short_s", "inferlet", (short,)),
        ("inferlet_long_s", "inferlet", (long,)),
    ], (short, long)


ROWS = [
    ("noop_runner_round_trip_us", "guest round trip, no-op runner (us)"),
    ("noop_model_round_trip_us", "guest round trip, no-op model (us)"),
    ("decode_step_ms_b1", "host work per decode step, batch 1 (ms)"),
    ("decode_step_ms_b32", "host work per decode step, batch 32 (ms)"),
    ("tpot_ms_builtin", "TPOT, pie generate's loop (ms)"),
    ("tpot_ms_inferlet", "TPOT, pie run text_completion (ms)"),
    ("cpu_ms_per_token_builtin", "CPU time per token, pie generate's loop (ms)"),
    ("cpu_ms_per_token_inferlet", "CPU time per token, pie run text_completion (ms)"),
]


def main() -> int:
    from pie.engine.machine import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", type=Path, help="another checkout to measure alternately (e.g. before a change)")
    ap.add_argument("--against-python", default=sys.executable, help="the Python (venv) of that checkout")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated row keys to measure (default: all)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="write the table (PREFIX.md) and every value (PREFIX.json) here")
    args = ap.parse_args()
    if args.worker:
        Worker().serve()
        return 0
    here = Path(__file__).resolve().parents[2]
    trees = [("this tree", here, sys.executable)]
    if args.against is not None:
        trees.insert(0, ("other tree", args.against.resolve(), args.against_python))
    workers = {name: WorkerProcess(tree, python) for name, tree, python in trees}
    steps, (short, long) = plan(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        steps = [step for step in steps if step[0] in wanted or step[0].split("_")[0] in wanted]
    values: dict[str, dict[str, list[float]]] = {name: {key: [] for key, _, _ in steps} for name in workers}
    try:
        for r in range(args.rounds):
            for key, measure, margs in steps:
                order = list(workers) if r % 2 == 0 else list(reversed(workers))
                for name in order:
                    values[name][key].append(workers[name].ask(measure, *margs))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    if args.out is not None:  # every value first: whatever happens below, the run is kept
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(str(args.out) + ".json").write_text(json.dumps({"cpu": cpu_name(), "values": values}, indent=2) + "\n")
    best = {}
    for name, v in values.items():
        b = {key: min(xs) for key, xs in v.items() if xs and not isinstance(xs[0], list)}
        for path in ("builtin", "inferlet"):
            if not v.get(f"{path}_long_s"):
                continue
            # slopes paired within each round (both lengths measured back to back), then their median:
            # steadier than the difference of two minima on a noisy machine
            pairs = list(zip(v[f"{path}_short_s"], v[f"{path}_long_s"]))
            b[f"tpot_ms_{path}"] = statistics.median((t[0] - s[0]) / (long - short) * 1e3 for s, t in pairs)
            b[f"cpu_ms_per_token_{path}"] = statistics.median((t[1] - s[1]) / (long - short) * 1e3 for s, t in pairs)
        best[name] = b
    names = list(workers)
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; SmolLM2-135M float32; {args.rounds} rounds, trees "
             "alternating measurement by measurement; best (and median) per measurement, decode: median slope",
             "",
             "| what | " + " | ".join(names) + (" | this / other |" if len(names) == 2 else " |"),
             "| --- | " + " | ".join("---" for _ in names) + (" | --- |" if len(names) == 2 else " |")]
    for key, label in ROWS:
        if key not in best[names[0]]:
            continue
        row = [best[name][key] for name in names]
        ratio = f" | {row[1] / row[0]:.2f}x |" if len(row) == 2 else " |"
        if key in values[names[0]]:  # a measurement of its own: the medians too
            medians = [statistics.median(values[name][key]) for name in names]
            label += f" [medians {' / '.join(f'{m:.3g}' for m in medians)}]"
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in row) + ratio)
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        Path(str(args.out) + ".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
