"""The regression decision of scripts/bench_regress.sh: one run of the suite against a baseline run, both
pytest-benchmark JSON files, median against median, with a threshold that accounts for measured noise.

    python benchmarks/suite/compare.py BASELINE.json NEW.json [--repeat REPEAT.json ...]
                                       [--threshold 0.25] [--z 3] [--suspects-out FILE] [--final]

For each benchmark in both runs:
  change   = new median / baseline median - 1, where the new median is the smallest of the medians of
             NEW and of every --repeat run of that benchmark (a regression must show in every run; a
             busy machine only ever makes a run slower);
  noise    = the standard error of the difference of the two medians, relative to the baseline median,
             from each run's interquartile range and rounds: SE(median) ~ 0.93 * IQR / sqrt(rounds)
             (normal approximation: sigma ~ IQR / 1.35, SE(median) ~ 1.25 sigma / sqrt(n));
  allowed  = max(threshold, z * noise): the floor covers the drift between runs on a shared machine
             that no within-run statistic sees, z * noise the benchmarks with few or scattered rounds.
A benchmark with change > allowed is SUSPECT; after the repeats (or with --final) it is REGRESSED.
Exit status: 0 none, 1 REGRESSED (with --final), 3 SUSPECT ones (their node ids in --suspects-out, to be
run again); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(path: Path) -> dict[str, dict]:
    run = json.loads(path.read_text())
    return {b["fullname"]: b["stats"] for b in run["benchmarks"]}


def describe(path: Path) -> str:
    run = json.loads(path.read_text())
    pie = run.get("pie", {})
    commit = run.get("commit_info", {})
    cpu = pie.get("cpu") or run.get("machine_info", {}).get("cpu_model", "?")
    dirty = "+dirty" if commit.get("dirty") else ""
    inject = f", injected sleep {pie['injected_sleep_us']:.0f} us" if pie.get("injected_sleep_us") else ""
    load = f", load average {pie['load_average']}" if pie.get("load_average") else ""
    return f"{path.name}: {cpu}, commit {str(commit.get('id'))[:12]}{dirty}, {run.get('datetime', '?')}{load}{inject}"


def fmt(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def se_median(stats: dict) -> float:
    return 0.93 * stats["iqr"] / math.sqrt(max(stats["rounds"], 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--repeat", type=Path, action="append", default=[], help="a re-run of (some) benchmarks")
    ap.add_argument("--threshold", type=float, default=0.25, help="the smallest change that counts (0.25 = +25%%)")
    ap.add_argument("--z", type=float, default=3.0, help="how many standard errors of the difference count")
    ap.add_argument("--suspects-out", type=Path, help="write the node ids of the suspects here, one a line")
    ap.add_argument("--final", action="store_true", help="suspects are regressions (no more repeats)")
    args = ap.parse_args()
    try:
        base, new = load(args.baseline), load(args.new)
        repeats = [load(p) for p in args.repeat]
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: cannot read a run: {e}", file=sys.stderr)
        return 2
    print(f"baseline  {describe(args.baseline)}")
    print(f"new       {describe(args.new)}")
    for p in args.repeat:
        print(f"repeat    {describe(p)}")
    print(f"rule: REGRESSED when min(new medians) / baseline median - 1 > max({args.threshold:.0%}, "
          f"{args.z:g} x SE of the difference), in every run\n")
    rows, suspects, regressed, not_run = [], [], [], []
    for name in sorted(set(base) | set(new)):
        if name not in base:
            rows.append((name, "", fmt(new[name]["median"]), "", "", "new (no baseline)"))
            continue
        if name not in new:
            not_run.append(name)
            continue
        b = base[name]
        runs = [new[name]] + [r[name] for r in repeats if name in r]
        best = min(runs, key=lambda s: s["median"])
        change = best["median"] / b["median"] - 1
        noise = math.hypot(se_median(b), se_median(best)) / b["median"]
        allowed = max(args.threshold, args.z * noise)
        medians = " / ".join(fmt(s["median"]) for s in runs)
        if change > allowed:
            verdict = "REGRESSED" if args.final else "SUSPECT"
            (regressed if args.final else suspects).append(name)
        elif change < -allowed:
            verdict = "faster"
        else:
            verdict = "ok"
        rows.append((name, fmt(b["median"]), medians, f"{change:+.1%}", f"+-{allowed:.0%}", verdict))
    header = ("benchmark", "baseline median", "new median(s)", "change", "allowed", "verdict")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print(line(r))
    if not_run:
        print(f"({len(not_run)} benchmark(s) of the baseline not in this run)")
    if args.suspects_out is not None:
        args.suspects_out.write_text("".join(s + "\n" for s in suspects))
    if regressed:
        print(f"\n{len(regressed)} benchmark(s) REGRESSED beyond their allowed change in every run:")
        for name in regressed:
            print(f"  {name}")
        return 1
    if suspects:
        print(f"\n{len(suspects)} suspect(s), to be run again: " + ", ".join(suspects))
        return 3
    print("\nno regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
