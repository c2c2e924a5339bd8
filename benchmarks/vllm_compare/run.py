"""vLLM's V1 scheduler against our control layer, side by side, in one run on this machine.

    bash scripts/install_vllm_peer.sh                      # once: vLLM in a venv of its own
    .venv/bin/python benchmarks/vllm_compare/run.py        # a few minutes on 2 cores

N running sequences (1, 32, 128, 512); each decode step = schedule + one sampled token per sequence
+ bookkeeping, with no model. Five columns, from two worker processes (vLLM's, pie's) kept alive for
the whole run and asked for one measurement at a time, alternating (the order rotates every round),
so that all see the same noise on a shared machine:
  - vLLM: its V1 Scheduler driven as EngineCore.step drives it, over a fake ModelRunnerOutput
    (vllm_side.py, under the vLLM venv's Python);
  - pie control layer: one instance, queue and set of KV pages per sequence, a Python client
    submitting one ForwardCommand per sequence per step, the adaptive scheduler batching them, the
    real ForwardHandler over a runner with no model (pie_side.py, mode control);
  - pie with guests: the same with N Python inferlets (wasm guests) decoding through the WIT API
    (pie_side.py, mode guests);
  - pie streams: N generation streams, the decode loop the control layer runs itself (what
    `pie generate` and Context.generate use; pie_side.py, mode streams);
  - pie + guests on streams: N Python inferlets each handing its decode loop to the host
    (generation.start, one generation.finish; pie_side.py, mode guest_streams).
Per step and per request-step (per step / N): CPU time of the worker process (all its threads), and
wall time. The tables give the median over the rounds (and the best); every value is in the JSON.

Writes benchmarks/results/vllm_scheduler_side_by_side.{json,md} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pie.engine.machine import cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VLLM_PYTHON = str(Path(os.environ.get("VLLM_VENV", "/work/.vllm_venv")) / "bin" / "python")
COLUMNS = [("vllm", "vLLM V1 Scheduler"), ("control", "pie control layer"), ("guests", "pie + inferlet guests"),
           ("streams", "pie streams"), ("guest_streams", "pie + guests on streams")]
GOAL = 10.0  # the goal: our per-request-step CPU at least 10x below vLLM's at N >= 32


def default_steps(n: int, quick: bool) -> int:
    steps = {1: 2000, 32: 300, 128: 100}.get(n, max(20, 12800 // max(n, 1)))
    return max(10, steps // 4) if quick else steps


class Worker:
    """One side's worker process (--serve): one JSON request line in, one JSON line out."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.header = {k: v for k, v in self._read().items() if k != "ready"}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.wait()}); its stderr says why")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                    help="the vLLM venv's Python (default $VLLM_VENV/bin/python, /work/.vllm_venv)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 32, 128, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a quarter of the steps, for a smoke run")
    ap.add_argument("--no-guests", action="store_true", help="leave out the column with the inferlet guests")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_scheduler_side_by_side",
                    help="PREFIX: writes PREFIX.json and PREFIX.md")
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        print(f"no vLLM Python at {args.vllm_python}: run scripts/install_vllm_peer.sh first", file=sys.stderr)
        return 2

    steps = {n: default_steps(n, args.quick) for n in args.n}
    rounds = args.rounds
    # each side measures one block of `steps` decode steps per request; requests are long enough for that
    max_decode = max(steps.values()) + 16
    kv_tokens = max(n * (args.prompt_len + s + 32) for n, s in steps.items())
    columns = [c for c in COLUMNS if not (args.no_guests and c[0] in ("guests", "guest_streams"))]
    ns = [str(n) for n in args.n]
    started = datetime.now(timezone.utc)
    load_before = load_average()
    t0 = time.perf_counter()
    print(f"starting the workers (vLLM: {args.vllm_python})", file=sys.stderr, flush=True)
    vllm = Worker("vllm", [args.vllm_python, str(HERE / "vllm_side.py"), "--serve", "--n", *ns,
                           "--prompt-len", str(args.prompt_len), "--max-decode", str(max_decode),
                           "--kv-tokens", str(kv_tokens), "--blocks", "1"],
                  env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    modes = [c for c, _ in columns if c != "vllm"]
    pie = Worker("pie", [sys.executable, str(HERE / "pie_side.py"), "--serve", "--n", *ns, "--modes", *modes,
                         "--prompt-len", str(args.prompt_len), "--kv-tokens", str(kv_tokens), "--blocks", "1"])
    workers = {"vllm": vllm, **{mode: pie for mode in modes}}
    values: dict[str, dict[str, list[dict]]] = {c: {str(n): [] for n in args.n} for c, _ in columns}
    breakdowns: list[dict] = []
    try:
        for r in range(rounds):
            for n in args.n:
                order = columns[r % len(columns):] + columns[:r % len(columns)]
                for column, _ in order:
                    request = {"n": n, "steps": steps[n], "blocks": 1}
                    if column != "vllm":
                        request["mode"] = column
                    result = workers[column].ask(**request)
                    values[column][str(n)].append({
                        "cpu_s_per_step": result["cpu_s_per_step"][0],
                        "wall_s_per_step": result["wall_s_per_step"][0],
                        "mean_batch": result.get("mean_batch", n)})
            breakdowns.append(pie.ask(mode="breakdown", n=0, steps=0))  # in every round: under the same noise
            print(f"round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        vllm.close()
        pie.close()
    elapsed = time.perf_counter() - t0
    breakdown = {key: statistics.median(b[key] for b in breakdowns) for key in breakdowns[0]} if breakdowns else None
    load_after = load_average()

    summary: dict[str, dict[str, dict]] = {}
    for column, _ in columns:
        summary[column] = {}
        for n in args.n:
            vs = values[column][str(n)]
            cpu = [v["cpu_s_per_step"] * 1e6 for v in vs]
            wall = [v["wall_s_per_step"] * 1e6 for v in vs]
            summary[column][str(n)] = {
                "cpu_us_per_step": statistics.median(cpu), "cpu_us_per_step_best": min(cpu),
                "cpu_us_per_request_step": statistics.median(cpu) / n,
                "wall_us_per_step": statistics.median(wall), "wall_us_per_step_best": min(wall),
                "wall_us_per_request_step": statistics.median(wall) / n,
                "mean_batch": statistics.median(v["mean_batch"] for v in vs)}
    ratios = {}
    for column in ("control", "guests", "streams", "guest_streams"):
        if column in summary:
            ratios[column] = {str(n): summary["vllm"][str(n)]["cpu_us_per_request_step"]
                              / summary[column][str(n)]["cpu_us_per_request_step"] for n in args.n}
    report = {
        "what": "vLLM V1 Scheduler vs pie's control layer, no model: CPU and wall time per decode step",
        "started_utc": started.isoformat(timespec="seconds"), "elapsed_s": elapsed,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": load_after, "platform": platform.platform()},
        "vllm": vllm.header, "pie": pie.header,
        "config": {"n": args.n, "steps_per_measurement": steps, "rounds": rounds, "prompt_len": args.prompt_len,
                   "block_or_page_size": 16, "quick": args.quick},
        "summary": summary, "vllm_over_pie_cpu_per_request_step": ratios, "goal_ratio": GOAL,
        "pie_control_breakdown_us_per_command": breakdown, "pie_control_breakdown_rounds": breakdowns,
        "values": values,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=1) + "\n")
    table = render(report, columns)
    Path(str(args.out) + ".md").write_text(table)
    print(table)
    print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)
    return 0


def render(report: dict, columns: list[tuple[str, str]]) -> str:
    """The markdown report, from the JSON report alone."""
    m, cfg, s = report["machine"], report["config"], report["summary"]
    vh, ph = report["vllm"], report["pie"]
    names = dict(columns)
    keys = [c for c, _ in columns]
    lines = [
        "# vLLM's V1 scheduler and pie's control layer, side by side",
        "",
        "Generated by `benchmarks/vllm_compare/run.py`; do not edit (see benchmarks/vllm_compare/README.md).",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; load average (1/5/15 min) {fmt_load(m['load_average_before'])} "
        f"before the run, {fmt_load(m['load_average_after'])} after it (a shared machine: other jobs ran beside "
        "this one; the figure after counts this run's own threads too, up to 512 guest threads)",
        f"- vLLM {vh['versions']['vllm']} (`{vh['scheduler_cls']}`), torch {vh['versions']['torch']}, "
        f"Python {vh['versions']['python']}; block size {vh['block_size']}, {vh['num_blocks']} KV blocks, "
        "prefix caching on",
        f"- pie {ph['versions']['pie']}, torch {ph['versions']['torch']}, wasmtime {ph['versions']['wasmtime']}, "
        f"Python {ph['versions']['python']}; scheduler {ph['scheduler']}; page size {ph['page_size']}, "
        f"{ph['num_pages']} KV pages",
        f"- {cfg['rounds']} rounds, the columns alternating measurement by measurement (the order rotates "
        f"each round); prompts of {cfg['prompt_len']} tokens, prefilled before the timed steps; steps per "
        "measurement: " + ", ".join(f"{k} at N={n}" for n, k in cfg["steps_per_measurement"].items())
        + f"; run took {report['elapsed_s']:.0f} s, started {report['started_utc']}",
        "- CPU time: of the whole worker process (every thread) over the timed steps; median over the rounds "
        "(best in brackets). One step = every one of the N sequences gets one token.",
        "",
        "## CPU time per decode step (us)",
        "",
        "| N | " + " | ".join(names[k] for k in keys) + " |",
        "| ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for n in cfg["n"]:
        lines.append(f"| {n} | " + " | ".join(
            f"{s[k][str(n)]['cpu_us_per_step']:,.0f} ({s[k][str(n)]['cpu_us_per_step_best']:,.0f})" for k in keys)
            + " |")
    ratio_keys = [k for k in keys if k != "vllm"]
    lines += ["", "## CPU time per request-step (us; per step / N) and vLLM's over ours", "",
              "| N | " + " | ".join(names[k] for k in keys) + " | "
              + " | ".join(f"vLLM / {names[k]}" for k in ratio_keys) + " |",
              "| ---: | " + " | ".join("---:" for _ in keys + ratio_keys) + " |"]
    ratios = report["vllm_over_pie_cpu_per_request_step"]
    for n in cfg["n"]:
        lines.append(f"| {n} | " + " | ".join(f"{s[k][str(n)]['cpu_us_per_request_step']:.2f}" for k in keys)
                     + " | " + " | ".join(f"{ratios[k][str(n)]:.2f}x" for k in ratio_keys) + " |")
    lines += ["", "## Wall time per decode step (us), and the mean batch the scheduler formed", "",
              "| N | " + " | ".join(names[k] for k in keys) + " | "
              + " | ".join(f"mean batch, {names[k]}" for k in ratio_keys) + " |",
              "| ---: | " + " | ".join("---:" for _ in keys + ratio_keys) + " |"]
    for n in cfg["n"]:
        lines.append(f"| {n} | " + " | ".join(f"{s[k][str(n)]['wall_us_per_step']:,.0f}" for k in keys) + " | "
                     + " | ".join(f"{s[k][str(n)]['mean_batch']:.1f}" for k in ratio_keys) + " |")
    goal = report["goal_ratio"]
    lines += ["", f"## The goal: ours at least {goal:.0f}x below vLLM per request-step at N >= 32", ""]
    big = [n for n in cfg["n"] if n >= 32]
    for k in ratio_keys:
        got = [ratios[k][str(n)] for n in big]
        best = [s["vllm"][str(n)]["cpu_us_per_step_best"] / s[k][str(n)]["cpu_us_per_step_best"] for n in big]
        met = all(r >= goal for r in got)
        lines.append(f"- {names[k]}: {'met' if met else 'not met'}: vLLM / ours "
                     + ", ".join(f"{r:.2f}x at N={n}" for n, r in zip(big, got))
                     + " (medians); " + ", ".join(f"{r:.2f}x" for r in best) + " (bests)")
    b = report.get("pie_control_breakdown_us_per_command")
    if b:
        total = {n: s["control"][str(n)]["cpu_us_per_request_step"] for n in cfg["n"]}
        parts = b["build_command_us"] + b["handler_execute_us"] + b["read_result_us"]
        lines += ["", "## Where the control layer's per-request-step time goes (CPU us per command, each part "
                  "timed alone in every round; median over the rounds)", "",
                  "| part | us |", "| --- | ---: |",
                  f"| client: build a one-token ForwardCommand (Python) | {b['build_command_us']:.2f} |",
                  f"| batch loop: ForwardHandler.execute per command (pack_forward, model-less run, write_batch_outputs) "
                  f"| {b['handler_execute_us']:.2f} |",
                  f"| client: read the sampled token | {b['read_result_us']:.2f} |",
                  f"| sum of the three | {parts:.2f} |",
                  "| the rest (submit, scheduling, batch hand-off, futures, waking the client, the client's loop): "
                  "per request-step above minus the sum (by difference: as noisy as both) | "
                  + ", ".join(f"{total[n] - parts:.2f} at N={n}" for n in cfg["n"]) + " |"]
    lines.append("")
    return "\n".join(lines)


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


if __name__ == "__main__":
    sys.exit(main())
