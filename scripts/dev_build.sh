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
  >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  cmake --build "$build"
  targets=($(cd "$build" && find . -name '_*.so' -printf '%f\n' | sed 's/\..*//'))
else
  for t in "${targets[@]}"; do cmake --build "$build" --target "$t"; done
fi
# copy only the modules asked for, so builds in other folders are not overwritten with stale ones
for t in "${targets[@]}"; do
  # copy then rename: a running process that has the old module mapped keeps its own inode
  for so in $(find "$build" -name "$t.*.so"); do
    cp -f "$so" "$root/pie/_ext/.$(basename "$so").tmp" && mv -f "$root/pie/_ext/.$(basename "$so").tmp" "$root/pie/_ext/$(basename "$so")"
  done
  ls "$root"/pie/_ext/"$t".*.so
done
