"""1. Plain completion: the programmability tax.

`text_completion` run as an inferlet vs the engine's built-in loop (`pie generate`), same engine, greedy, EOS
ignored. The timing functions and the TPOT-by-slope method are those of
benchmarks/runtime/bench_programmability_tax.py (imported, not copied): TPOT = (t(long) - t(short)) /
(long - short), so launch, prefill and teardown cancel out. Each repeat runs built-in short / long, then
opens a Runtime (the built-in loop must not run while a Runtime holds the KV pages) and runs the inferlet
short / long, so both sides see the same machine load; the best of the repeats is kept.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

import bench_programmability_tax as tax  # noqa: E402

from harness import CpuWatch  # noqa: E402


def run(model, p, rows: list, log) -> None:
    from pie.runtime import Runtime, RuntimeConfig

    prompt_ids = model.prompt_ids(tax.PROMPT)
    span = p.plain_long - p.plain_short
    for conc in p.plain_concurrency:
        best = {"b_short": math.inf, "b_long": math.inf, "i_short": math.inf, "i_long": math.inf}
        cpu = CpuWatch()
        for _ in range(p.repeats):
            best["b_short"] = min(best["b_short"], tax.builtin_time(model, prompt_ids, p.plain_short, conc))
            best["b_long"] = min(best["b_long"], tax.builtin_time(model, prompt_ids, p.plain_long, conc))
            with Runtime(model, RuntimeConfig(deadline_s=0)) as rt:
                rt.python_runtime()
                tax.inferlet_time(rt, 2, 1)  # the component instantiated once
                best["i_short"] = min(best["i_short"], tax.inferlet_time(rt, p.plain_short, conc)[0])
                best["i_long"] = min(best["i_long"], tax.inferlet_time(rt, p.plain_long, conc)[0])
        b_tpot = (best["b_long"] - best["b_short"]) / span
        i_tpot = (best["i_long"] - best["i_short"]) / span
        rows.append({
            "section": "plain", "application": "plain completion (text_completion)", "concurrency": conc,
            "metric": "TPOT ms (slope)", "baseline_name": "built-in loop (pie generate)",
            "baseline": b_tpot * 1e3, "inferlet": i_tpot * 1e3, "ratio": i_tpot / b_tpot, "ratio_kind": "tax",
            "goal": "<= 1.03x (+3%)", "met": i_tpot / b_tpot <= 1.03,
            "details": {"tokens_short": p.plain_short, "tokens_long": p.plain_long, "repeats": p.repeats,
                        "builtin_tok_per_s": conc / b_tpot, "inferlet_tok_per_s": conc / i_tpot,
                        "best_times_s": best,
                        "other_processes_cores": round(cpu.others_cores(), 2)}})
        log(f"plain c={conc}: built-in {b_tpot * 1e3:.1f} ms/token, inferlet {i_tpot * 1e3:.1f} ms/token "
            f"({100 * (i_tpot / b_tpot - 1):+.1f}%)")
