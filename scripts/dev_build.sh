#!/usr/bin/env bash
# Developer build: compiles the extension modules into the source tree's pie/_ext/ (ignored by git),
# so `python -c "import pie"` from the checkout uses them without reinstalling.
#   scripts/dev_build.sh [BUILD_DIR] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
shift || true
python=${PYTHON:-python3}
pybind11_dir=$($python -m pybind11 --cmakedir)
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind11_dir" \
  -DPython_EXECUTABLE="$(command -v $python)" -DPIE_CUDA="${PIE_CUDA:-0}" \
  -DCMAKE_INSTALL_PREFIX="$root" >/dev/null
if [ $# -gt 0 ]; then
  for t in "$@"; do cmake --build "$build" --target "$t"; done
else
  cmake --build "$build"
fi
cmake --install "$build" >/dev/null
ls "$root"/pie/_ext/*.so
