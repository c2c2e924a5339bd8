#!/usr/bin/env bash
# Benchmark regression run: runs the benchmark suite (benchmarks/suite), saves the run under
# benchmarks/.runs/ (named by time, commit and CPU model; the JSON holds both too), shows it next to a
# baseline run with pytest-benchmark's compare, and fails when a median regressed beyond a threshold that
# accounts for measured noise (benchmarks/suite/compare.py); suspects are run again before failing.
#
#   scripts/bench_regress.sh [options] [-- PYTEST_ARGS...]
#
#   --baseline FILE     the run to compare against (default: benchmarks/baselines/<cpu>.json, else the
#                       latest earlier run of this CPU model in benchmarks/.runs/)
#   --threshold F       smallest relative change of a median that counts (default 0.25 = +25%)
#   --z Z               ... or Z standard errors of the difference of the medians, if larger (default 3)
#   --repeats N         times the suspects are run again before they count as regressions (default 2)
#   --quiet-wait S      before the run and before each repeat, wait up to S seconds (default 120) for the
#                       machine to be quiet: other processes using under half of its CPU time over 5 s
#   --compare-only FILE compare this earlier run instead of running the suite (its suspects are still run
#                       again with the tree as it is now, unless --repeats 0)
#   --save-baseline     make this run the baseline of its CPU model: benchmarks/baselines/<cpu>.json
#                       (per-round data left out), and write benchmarks/results/; no comparison
#   --results           also write benchmarks/results/bench_suite_<cpu>.{json,md} (complete runs only)
#   PYTEST_ARGS         passed to pytest, e.g. -k "control or runtime" to run part of the suite
#
# Exit status: 0 no regression, 1 a regression (in every run), 2 the suite failed or bad usage.
# PYTHON picks the interpreter (default: the checkout's .venv). To see the check work, slow one hot path
# on purpose: PIE_BENCH_INJECT_SLEEP_US=50 scripts/bench_regress.sh -- -k page_pool
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi

baseline="" threshold=0.25 z=3 repeats=2 quiet_wait=120 compare_only="" save_baseline=0 results=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline=$2; shift 2 ;;
    --threshold) threshold=$2; shift 2 ;;
    --z) z=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --quiet-wait) quiet_wait=$2; shift 2 ;;
    --compare-only) compare_only=$2; shift 2 ;;
    --save-baseline) save_baseline=1; results=1; shift ;;
    --results) results=1; shift ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_regress: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$save_baseline" = 1 ] && [ ${#pytest_args[@]} -gt 0 ]; then
  echo "bench_regress: a baseline is a run of the whole suite (no pytest arguments with --save-baseline)" >&2
  exit 2
fi

busy_percent() {  # CPU time used by all processes over the next 5 s, in % of the machine's (this script idles)
  local a b
  a=$(head -n 1 /proc/stat); sleep 5; b=$(head -n 1 /proc/stat)
  echo "$a" "$b" | awk '{ for (i = 2; i <= 11; i++) { t1 += $i; t2 += $(i + 11) }
                          idle = ($(16) + $(17)) - ($5 + $6); printf "%d", 100 * (1 - idle / (t2 - t1)) }'
}
wait_quiet() {  # until other processes use under half of the CPU time, at most $quiet_wait seconds
  local waited=0 busy
  while :; do
    busy=$(busy_percent)
    if [ "$busy" -lt 50 ]; then
      [ $waited -gt 0 ] && echo "bench_regress: quiet now ($busy% busy) after ${waited}s"
      return 0
    fi
    if [ $waited -ge "$quiet_wait" ]; then
      echo "bench_regress: the machine is still busy ($busy% of its CPU time in use by others); going on anyway"
      return 0
    fi
    [ $waited -eq 0 ] && echo "bench_regress: waiting for a quieter machine ($busy% busy; up to ${quiet_wait}s)"
    sleep 5
    waited=$((waited + 10))
  done
}

runs=benchmarks/.runs
mkdir -p "$runs"
cpu=$("$py" -c 'import sys; sys.path.insert(0, "benchmarks/suite"); import pie_bench; print(pie_bench.cpu_name())')
slug=$("$py" -c 'import sys; sys.path.insert(0, "benchmarks/suite"); import pie_bench; print(pie_bench.cpu_slug())')
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo nocommit)
dirty=""
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && dirty=_dirty
echo "bench_regress: $cpu ($slug), commit $commit${dirty:+ (uncommitted changes)}"

results_opt=--bench-results=off
[ "$results" = 1 ] && results_opt=--bench-results=auto

if [ -n "$compare_only" ]; then
  run=$compare_only
else
  wait_quiet
  run="$runs/$(date -u +%Y%m%dT%H%M%SZ)_${commit}${dirty}_${slug}.json"
  start=$(date +%s)
  PYTHONSAFEPATH=1 "$py" -m pytest benchmarks/suite --benchmark-json="$run" "$results_opt" "${pytest_args[@]}"
  rc=$?
  echo "bench_regress: the suite took $(( $(date +%s) - start )) s; run saved as $run"
  if [ $rc -ne 0 ] || [ ! -f "$run" ]; then
    echo "bench_regress: the suite failed (pytest exit $rc)" >&2
    exit 2
  fi
fi

if [ "$save_baseline" = 1 ]; then
  mkdir -p benchmarks/baselines
  "$py" - "$run" "benchmarks/baselines/$slug.json" <<'EOF'
import json, sys
run = json.load(open(sys.argv[1]))
for b in run["benchmarks"]:
    b["stats"].pop("data", None)  # per-round values: not needed to compare, and large
open(sys.argv[2], "w").write(json.dumps(run, indent=1) + "\n")
EOF
  echo "bench_regress: baseline saved as benchmarks/baselines/$slug.json"
  exit 0
fi

if [ -z "$baseline" ]; then
  if [ -f "benchmarks/baselines/$slug.json" ]; then
    baseline="benchmarks/baselines/$slug.json"
  else
    baseline=$(ls -1 "$runs"/*_"$slug".json 2>/dev/null | grep -v -F "$run" | sort | tail -n 1)
  fi
fi
if [ -z "$baseline" ] || [ ! -f "$baseline" ]; then
  echo "bench_regress: no baseline for $cpu (benchmarks/baselines/$slug.json); nothing to compare." \
       "Make this run the baseline with: scripts/bench_regress.sh --compare-only $run --save-baseline" >&2
  exit 0
fi

echo
echo "== pytest-benchmark compare: $baseline vs $run (medians; the second column is the new run's)"
# the baseline's benchmarks that are in this run (pytest-benchmark's table wants the same set in both)
common=$(mktemp -p "$runs" --suffix=.json 0_baseline.XXXX)  # sorts first: the reference column
"$py" - "$baseline" "$run" "$common" <<'EOF'
import json, sys
base, run = (json.load(open(p)) for p in sys.argv[1:3])
names = {b["fullname"] for b in run["benchmarks"]}
base["benchmarks"] = [b for b in base["benchmarks"] if b["fullname"] in names]
open(sys.argv[3], "w").write(json.dumps(base))
EOF
"$py" -m pytest_benchmark compare "$(realpath "$common")" "$(realpath "$run")" --between=median --sort=fullname 2>&1 \
  | sed 's/^/  /'
rm -f "$common"

echo
echo "== regression check (threshold $threshold, z $z, repeats $repeats)"
suspects="${run%.json}.suspects"
repeat_opts=()
attempt=0
while :; do
  final=()
  [ "$attempt" -ge "$repeats" ] && final=(--final)
  "$py" benchmarks/suite/compare.py "$baseline" "$run" "${repeat_opts[@]}" --threshold "$threshold" --z "$z" \
    --suspects-out "$suspects" "${final[@]}"
  rc=$?
  [ $rc -ne 3 ] && break
  attempt=$((attempt + 1))
  rerun="${run%.json}.repeat$attempt.json"
  ids=()
  while IFS= read -r id; do [ -n "$id" ] && ids+=("benchmarks/suite/$id"); done < "$suspects"
  echo
  echo "== repeat $attempt of $repeats: running the ${#ids[@]} suspect(s) again"
  wait_quiet
  PYTHONSAFEPATH=1 "$py" -m pytest "${ids[@]}" --benchmark-json="$rerun" --bench-results=off -q
  if [ ! -f "$rerun" ]; then
    echo "bench_regress: the repeat run failed" >&2
    exit 2
  fi
  repeat_opts+=(--repeat "$rerun")
  echo
done
rm -f "$suspects"
case $rc in
  0) echo "bench_regress: no regression against $baseline"; exit 0 ;;
  1) echo "bench_regress: REGRESSION against $baseline" >&2; exit 1 ;;
  *) exit 2 ;;
esac
