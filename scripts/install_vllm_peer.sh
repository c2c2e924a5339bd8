#!/usr/bin/env bash
# Installs vLLM as a measured peer (benchmarks/vllm_compare), in a venv of its own, never the project's:
# vLLM is no dependency of pie. CPU only, no GPU needed: only vLLM's V1 scheduler is run.
#
#     bash scripts/install_vllm_peer.sh            # venv at $VLLM_VENV, default /work/.vllm_venv
#
# What it takes (vLLM 0.34.0's wheel asks for CUDA torch and dozens of serving packages; its scheduler
# needs none of them):
#   1. torch==2.13.0 first (a CPU build where the machine has one on disk; never an open range, which
#      would pull a multi-GB CUDA build);
#   2. the pinned vllm wheel with --no-deps;
#   3. only the pure-Python (or small binary) packages its imports ask for on the scheduler's path,
#      pinned to the versions it was measured with; xgrammar (imported at module level) with --no-deps
#      plus apache-tvm-ffi.
# Idempotent: a step whose result is already there is skipped; it prints what it did.
set -euo pipefail

VENV="${VLLM_VENV:-/work/.vllm_venv}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.34.0"
TORCH_VERSION="2.13.0"
# what vllm_side.py's imports ask for (found in a fresh venv by running it and adding one missing module
# at a time; einops is imported by the model inspection that ModelConfig runs in a subprocess, whose
# result vLLM caches in ~/.cache/vllm/modelinfos), at the versions measured
EXTRAS=(
  "packaging==26.4" "regex==2026.12.2" "psutil==7.2.2" "msgspec==0.23.0" "numpy==2.4.6" "pydantic==2.14.4"
  "pyzmq==27.3.0" "transformers==5.22.2" "aiohttp==3.14.5" "requests==2.34.2" "cloudpickle==3.1.3"
  "pillow==13.0.0" "pybase64==1.5.1" "cachetools==8.0.3" "uvloop==0.23.0" "py-cpuinfo==9.0.0" "cbor2==6.3.0"
  "prometheus_client==0.26.0" "einops==0.8.2" "llguidance==1.7.6" "apache-tvm-ffi==0.1.11"
)
NO_DEPS=("xgrammar==0.2.8")

REPO="$(cd "$(dirname "$0")/.." && pwd)"
case "$VENV/" in
  "$REPO"/*)
    rel="${VENV#"$REPO"/}"
    if ! git -C "$REPO" check-ignore -q "$rel" 2>/dev/null; then
      echo "install_vllm_peer: $VENV is inside the checkout and not ignored by git; choose another VLLM_VENV" >&2
      exit 2
    fi ;;
esac

say() { echo "install_vllm_peer: $*"; }

if [ -x "$VENV/bin/python" ]; then
  say "venv $VENV exists"
else
  say "creating venv $VENV ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

installed() {  # installed NAME VERSION-PREFIX: is NAME installed at a version starting with VERSION-PREFIX?
  local v
  v="$("$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null)" \
    || return 1
  [[ "$v" == "$2"* ]]
}

if installed torch "$TORCH_VERSION"; then
  say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
else
  say "installing torch==$TORCH_VERSION (first, so that nothing pulls another build)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

if installed vllm "$VLLM_VERSION"; then
  say "vllm $VLLM_VERSION already installed"
else
  say "installing vllm==$VLLM_VERSION --no-deps"
  "${PIP[@]}" install --no-deps "vllm==$VLLM_VERSION"
fi

missing=()
for spec in "${EXTRAS[@]}"; do
  installed "${spec%%==*}" "${spec##*==}" || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (pip then lists vllm's requirements left out on purpose: expected)"
  # the torch pin keeps a dependency from replacing the CPU build
  "${PIP[@]}" install "${missing[@]}" "torch==$TORCH_VERSION"
else
  say "the ${#EXTRAS[@]} extra packages are already installed"
fi
for spec in "${NO_DEPS[@]}"; do
  if installed "${spec%%==*}" "${spec##*==}"; then
    say "$spec already installed"
  else
    say "installing $spec --no-deps"
    "${PIP[@]}" install --no-deps "$spec"
  fi
done

say "checking: vLLM's V1 scheduler imports on the CPU platform"
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - <<'EOF' 2>&1 | grep -v -e "_C_AVX512" -e "Triton not available" || true
import vllm.triton_utils
vllm.triton_utils.HAS_TRITON = True
import torch, vllm
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401
print(f"install_vllm_peer: ok: vllm {vllm.__version__}, torch {torch.__version__}")
EOF
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm.v1.core.sched.scheduler" >/dev/null 2>&1 \
  || { echo "install_vllm_peer: vLLM's scheduler does not import in $VENV" >&2; exit 1; }
say "done: run the comparison with  .venv/bin/python benchmarks/vllm_compare/run.py --vllm-python $VENV/bin/python"
