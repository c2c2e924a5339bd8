"""The evaluation (issue 6): every application as an inferlet against its baseline on the same engine and
model (SmolLM2-135M, CPU), side by side in one process; one table, ratios, goals.

    python benchmarks/eval/run_eval.py [--quick] [--only SECTION[,SECTION...]] [--out PREFIX]

SECTION: plain | agentic | kv, or one application: react, codeact, swarm, prefix, beam, tot, spec.
Defaults take about 15 minutes on a 2-core CPU; --quick about 3 (1 repeat, 1 and 4 concurrent, short
generations). Writes PREFIX.json and PREFIX.md (default benchmarks/results/eval.*).

1. plain completion: text_completion inferlet vs `pie generate`'s built-in loop (TPOT by slope; the
   programmability tax, goal <= 3%).                                              -> plain.py
2. agentic workflows: ReAct (N tool calls), CodeAct, a swarm of N agents: the inferlet vs the same agent
   orchestrated by a client through the OpenAI endpoint, at 1 / 8 / 32 concurrent (goal >= 2x).
                                                                                  -> agentic.py
3. KV techniques: prefix cache, beam search, tree of thought, speculative decoding vs the same result
   without the inferlet's KV control.                                            -> kv_techniques.py

The embedded path is `pie.runtime.Runtime`; the endpoint path is `pie.server.ServerThread` serving that same
Runtime (so the same engine, scheduler and KV pool). Besides wall time and tokens/s, every measurement
records the tokens the model computed (`engine.runner.num_tokens_processed` deltas) and how much CPU other
processes took meanwhile (the machine is shared: a value well above 0 means the numbers are noisy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CpuWatch, Stack, ToolServer, machine  # noqa: E402

SECTIONS = {"plain": ["plain"], "agentic": ["react", "codeact", "swarm"], "kv": ["prefix", "beam", "tot", "spec"]}
ITEMS = [i for items in SECTIONS.values() for i in items]
BUSY_CORES = 0.25
KV_CACHE_MB = 3072  # other processes using more than this many cores during a measurement: flagged


@dataclass
class Params:
    repeats: int = 3
    seed: int = 1
    # 1. plain completion
    plain_short: int = 8
    plain_long: int = 40
    plain_concurrency: tuple = (1, 32)
    # 2. agentic
    agent_concurrency: tuple = (1, 8, 32)
    react_tool_calls: int = 8
    react_thought_tokens: int = 12
    codeact_steps: int = 2
    codeact_code_tokens: int = 40
    codeact_answer_tokens: int = 12
    swarm_workers: int = 4
    swarm_tokens: int = 12
    swarm_summary_tokens: int = 24
    # 3. KV techniques
    prefix_prompts: int = 8
    prefix_max_tokens: int = 8
    beams: int = 4
    beam_tokens: int = 16
    tot_breadth: int = 3
    tot_depth: int = 2
    tot_beam: int = 1
    tot_step_tokens: int = 16
    tot_answer_tokens: int = 16
    spec_tokens: int = 96


QUICK = dict(repeats=1, plain_short=4, plain_long=24, plain_concurrency=(1, 4), agent_concurrency=(1, 4),
             react_thought_tokens=6, codeact_code_tokens=24, codeact_answer_tokens=6, swarm_workers=2,
             swarm_tokens=6, swarm_summary_tokens=8, prefix_prompts=4, prefix_max_tokens=4, beams=3, beam_tokens=6,
             tot_breadth=2, tot_step_tokens=8, tot_answer_tokens=6, spec_tokens=48)


METHOD = [
    "How it is measured (one process, one engine; the sections' modules say more):",
    "- Plain completion: `bench_programmability_tax.builtin_time` / `inferlet_time`, TPOT as the slope between "
    "a short and a long greedy generation (EOS ignored), best of the repeats, built-in and inferlet "
    "interleaved.",
    "- Agentic (goal >= 2x; Pie reports 1.3-3.4x): c workflows start at once on each side. Inferlet: "
    "`Runtime.launch` of the example (ReAct with --script: the model writes every Thought, the actions are "
    "fixed, the tools are POSTs to a loopback server). Baseline: the same algorithm as a client of the OpenAI "
    "endpoint (`ServerThread` over the same Runtime; official `openai` AsyncOpenAI client), sending the "
    "growing transcript as text to /v1/completions each step (so the prompt is the same tokens; stop strings "
    "stand in for the inferlet's regex grammars), the same tool server, the same max tokens per step, greedy. "
    "Latency is per workflow (launch to end); throughput is workflows per minute of wall time.",
    "- KV techniques: one run each side (speculative: best of the repeats); \"tokens computed\" is the "
    "engine's `num_tokens_processed` delta (prefill + decode inputs).",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def others_max(obj) -> float:
    """The largest `other_processes_cores` recorded anywhere in a row."""
    if isinstance(obj, dict):
        vals = [others_max(v) for v in obj.values()]
        own = obj.get("other_processes_cores")
        return max([v for v in vals if v is not None] + ([own] if isinstance(own, (int, float)) else []), default=None)
    return None


def fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def ratio_text(row: dict) -> str:
    if row["ratio_kind"] == "tax":
        return f"{100 * (row['ratio'] - 1):+.1f}%"
    return f"{row['ratio']:.2f}x"


def table_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["application", "conc", "metric", "baseline", "inferlet", "ratio", "goal", "met", "others' CPU"]
    body = []
    for r in rows:
        busy = r.get("others_cores")
        busy_text = "-" if busy is None else (f"{busy:.2f} BUSY" if busy > BUSY_CORES else f"{busy:.2f}")
        body.append([r["application"], str(r["concurrency"]), r["metric"], fmt(r["baseline"]), fmt(r["inferlet"]),
                     ratio_text(r), r["goal"], "-" if r["met"] is None else "yes" if r["met"] else "no", busy_text])
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), "-" * len(line(head))] + [line(b) for b in body]


def legend(rows: list[dict]) -> list[str]:
    """Each application's baseline, and its output check where it has one (`same_*` in the details of its
    concurrency-1 rows: both sides produced the same text; at higher concurrency batched float32 passes may
    flip a greedy choice, so those are recorded in the JSON only)."""
    seen: dict[str, str] = {}
    checks: dict[str, list[bool]] = {}
    for r in rows:
        seen.setdefault(r["application"], r["baseline_name"])
        if r["concurrency"] != 1:
            continue
        for k, v in r.get("details", {}).items():
            if k.startswith("same_") and isinstance(v, bool):
                checks.setdefault(r["application"], []).append(v)
    out = []
    for app, name in seen.items():
        c = checks.get(app)
        same = "" if not c else f"; same output on both sides (concurrency 1): {'yes' if all(c) else 'NO'}"
        out.append(f"- {app}: baseline = {name}{same}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 3 minutes: 1 repeat, 1 and 4 concurrent, short runs")
    ap.add_argument("--only", action="append", default=[],
                    help=f"a section ({', '.join(SECTIONS)}) or an application ({', '.join(ITEMS)}); repeatable "
                         "or comma-separated")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="agentic concurrency levels")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "eval"),
                    help="output path prefix (.json and .md are added)")
    args = ap.parse_args()

    p = Params(**(QUICK if args.quick else {}))
    if args.concurrency:
        p.agent_concurrency = tuple(args.concurrency)
    only: set[str] = set()
    for spec in args.only:
        for name in filter(None, (s.strip() for s in spec.split(","))):
            if name in SECTIONS:
                only.update(SECTIONS[name])
            elif name in ITEMS:
                only.add(name)
            else:
                ap.error(f"--only {name!r}: expected one of {', '.join(list(SECTIONS) + ITEMS)}")
    only = only or set(ITEMS)

    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    cpu_total = CpuWatch()
    from pie.engine.config import EngineConfig
    from pie.engine.model import Model

    log(f"{'quick' if args.quick else 'default'} run of {', '.join(i for i in ITEMS if i in only)}")
    # KV for 32 concurrent agents whose transcripts carry a ~400-token manual (about 40k tokens at once, with
    # the prefix cache's pages): 3 GiB of float32 K/V, 68k tokens of SmolLM2-135M
    model = Model(config=EngineConfig(kv_cache_mb=KV_CACHE_MB), progress=False)
    rows: list[dict] = []
    errors: list[str] = []

    def attempt(name: str, fn, *a) -> None:
        t = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - report it and measure the others
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        log(f"{name}: {time.perf_counter() - t:.0f} s")

    if "plain" in only:  # before the shared Runtime exists: the built-in loop needs the KV pages to itself
        import plain

        attempt("plain", plain.run, model, p, rows, log)

    if only - {"plain"}:
        import agentic
        import kv_techniques as kv

        tools = ToolServer()
        stack = Stack(model, http_allow=[f"127.0.0.1:{tools.port}"])
        try:
            for item in SECTIONS["agentic"]:
                if item in only:
                    attempt(item, agentic.run, stack, tools, p, rows, log, item)
            for item, fn in (("prefix", kv.run_prefix), ("beam", kv.run_beam), ("tot", kv.run_tot),
                             ("spec", kv.run_spec)):
                if item in only:
                    attempt(item, fn, stack, p, rows, log)
        finally:
            stack.close()
            tools.close()

    for k, r in enumerate(rows):  # a row measured with the one before it (same application) shares its value
        r["others_cores"] = others_max(r.get("details", {}))
        if r["others_cores"] is None and k and rows[k - 1]["application"] == r["application"]:
            r["others_cores"] = rows[k - 1]["others_cores"]
    elapsed = time.perf_counter() - t_start
    mach = machine()
    others_avg = cpu_total.others_cores()
    busy_note = (f"other processes used {others_avg:.2f} cores on average during the run (of {mach['cores']}): "
                 + ("the machine was BUSY, the numbers are noisy" if others_avg > BUSY_CORES
                    else "the machine was quiet"))
    title = (f"Evaluation ({'quick' if args.quick else 'default'} run): inferlets vs baselines, {model.name}, "
             f"float32, CPU")
    meta = (f"{mach['cores']}-core CPU ({mach['cpu']}), {started.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{elapsed / 60:.1f} min; {busy_note}")
    text = table_lines(rows, markdown=False)
    print()
    print(title)
    print(meta)
    print("\n".join(text))
    print("\n".join(legend(rows)))
    if errors:
        print("did not run / failed:\n" + "\n".join(f"- {e}" for e in errors))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "title": title, "date": started.isoformat(timespec="seconds"), "mode": "quick" if args.quick else "default",
        "machine": mach, "elapsed_s": elapsed, "other_processes_cores_avg": others_avg, "params": asdict(p),
        "sections": sorted(only), "rows": rows, "errors": errors}, indent=1, default=str) + "\n")
    md = [f"# {title}", "", meta, "", "Ratios are the inferlet's advantage: baseline / inferlet for times, token "
          "counts and passes, inferlet / baseline for rates; the plain-completion row is the inferlet's TPOT "
          "over the built-in loop's (the tax). \"others' CPU\": cores used by other processes during the "
          f"measurement (BUSY above {BUSY_CORES}).", "", *table_lines(rows, markdown=True), "", *legend(rows),
          "", *METHOD]
    if errors:
        md += ["", "Did not run / failed:", *[f"- {e}" for e in errors]]
    md += ["", f"`python benchmarks/eval/run_eval.py{' --quick' if args.quick else ''}`; details (token counts, p90, "
               "texts, per-side CPU) in the JSON file beside this one."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
