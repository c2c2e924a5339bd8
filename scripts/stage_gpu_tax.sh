#!/usr/bin/env bash
# Fills .gpu_carry_tax/ (ignored) with what `scripts/gpu_check.sh tax` needs on a lent GPU machine:
# the wasmtime and componentize-py wheels for its Python 3.12 (the versions pie pins), and SmolLM2's
# config and tokenizer (its weights are made up there). About 28 MB. Then, from a session:
#   run(command="bash scripts/gpu_check.sh build tax", carry=[".gpu_carry_tax"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu_carry_tax
grep -qx "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >>.git/info/exclude
python=${PYTHON:-python3}
mkdir -p "$dest/smollm2"
wasmtime=$($python -c "from importlib.metadata import version; print(version('wasmtime'))")
componentize=$($python -c "from pie.runtime.python_runtime import COMPONENTIZE_PY_VERSION as v; print(v)")
$python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest" "wasmtime==$wasmtime" "componentize-py==$componentize"
model=$($python -c "from pie.engine.model_store import ModelStore, DEFAULT_MODEL; print(ModelStore().resolve(DEFAULT_MODEL).path)")
for f in config.json tokenizer.json tokenizer_config.json; do cp "$model/$f" "$dest/smollm2/"; done
du -sh "$dest"
ls "$dest" "$dest/smollm2"
