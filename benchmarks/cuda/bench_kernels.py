"""GPU benchmark of pie's CUDA kernels against the device's ceilings and torch baselines.

  python3 benchmarks/cuda/bench_kernels.py [--out DIR] [--quick]

Measures, on the current CUDA device:
- device-to-device copy bandwidth (bytes read + written), the ceiling for memory-bound kernels;
- paged decode attention: bytes it must read (K and V of every sequence, q, out) over its time, as
  a fraction of the copy bandwidth (goal >= 0.8);
- paged prefill attention (causal, GQA) against torch.nn.functional.scaled_dot_product_attention on
  the same shapes with contiguous K/V (goal: SDPA time / ours >= 0.9): pie's prefill kernel, and the
  runner's route for fresh prompts (pie.engine.attention.sdpa_prefill: K/V gathered from the pages, then SDPA);
- sampling (filtered and plain), softmax and argmax against the torch ops a runner would use;
- RMSNorm against the eager torch expression.
Timing: CUDA events around each call, warm-up first, median of many runs; inputs rotate among
several sets where one set would fit in L2. Writes benchmarks/results/cuda_kernels_<device>.json and
.md (and copies to --out), and prints the table last.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pie.engine import cuda_ops as ck  # noqa: E402
from pie.engine.attention.sdpa_prefill import plan_sdpa_prefill, sdpa_prefill_attention  # noqa: E402
from pie.engine.cuda_ops import reference as ref  # noqa: E402
from pie.engine.kv_cache import sequence_slots  # noqa: E402
from results import write_results  # noqa: E402  (benchmarks/cuda/results.py)
from torch_baselines import torch_filtered_sample  # noqa: E402  (benchmarks/cuda/torch_baselines.py)

L2_DEFEAT_BYTES = 256 << 20  # rotate inputs until this many bytes are touched per cycle


def time_ms(fn, *, sets: int = 1, warmup: int = 5, reps: int = 50) -> float:
    """Median milliseconds of fn(i) (i cycles through input sets), timed with CUDA events."""
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> dict:
    n = 1 << 30  # 1 GiB each way
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = time_ms(lambda i: y.copy_(x), reps=30)
    return {"bytes": 2 * n, "ms": ms, "GBps": 2 * n / ms / 1e6}


# ----------------------------------------------------------------------------- attention


def decode_case(name, batch, kv_len, hq, hkv, d, page_size=16, dtype=torch.bfloat16, copy_gbps=None):
    elem = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = batch * kv_len * hkv * d * 2 * elem
    sets = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / kv_bytes)))
    pages_per = math.ceil(kv_len / page_size)
    num_pages = sets * batch * pages_per
    k_cache = torch.randn(num_pages, page_size, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    plans = []
    perm = torch.randperm(num_pages)
    last = kv_len - (pages_per - 1) * page_size
    for s in range(sets):
        pages = perm[s * batch * pages_per : (s + 1) * batch * pages_per]
        plans.append(
            ck.plan_attention(
                torch.arange(batch + 1), torch.arange(batch + 1) * pages_per, pages, [last] * batch,
                page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
            )
        )
    ms = time_ms(lambda i: ck.paged_attention(q, k_cache, v_cache, plans[i], out=out), sets=sets)
    moved = kv_bytes + 2 * q.numel() * elem + batch * pages_per * 4
    gbps = moved / ms / 1e6
    row = {
        "kind": "decode_attention", "case": name, "batch": batch, "kv_len": kv_len, "heads": f"{hq}/{hkv}",
        "head_dim": d, "page_size": page_size, "ms": ms, "GBps": gbps, "chunks": plans[0].num_chunks,
    }
    if copy_gbps:
        row["frac_of_copy"] = gbps / copy_gbps
    return row


def prefill_case(name, batch, seq, hq, hkv, d, page_size=16, dtype=torch.bfloat16):
    pages_per = math.ceil(seq / page_size)
    num_pages = batch * pages_per
    q = torch.randn(batch * seq, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, seq, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    # the same K/V in a paged cache (pages in order) for ours, head-major for SDPA
    k_cache = torch.zeros(num_pages * page_size, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for b in range(batch):
        k_cache[b * pages_per * page_size : b * pages_per * page_size + seq] = k[b]
        v_cache[b * pages_per * page_size : b * pages_per * page_size + seq] = v[b]
    k_cache = k_cache.view(num_pages, page_size, hkv, d)
    v_cache = v_cache.view(num_pages, page_size, hkv, d)
    last = seq - (pages_per - 1) * page_size
    plan = ck.plan_attention(
        torch.arange(batch + 1) * seq, torch.arange(batch + 1) * pages_per, torch.arange(num_pages), [last] * batch,
        page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
    )
    out = torch.empty_like(q)
    ours = time_ms(lambda i: ck.paged_attention(q, k_cache, v_cache, plan, out=out), reps=20)
    qs = q.view(batch, seq, hq, d).transpose(1, 2).contiguous()
    ks, vs = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    try:
        sdpa = lambda i: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
        sdpa(0)
        gqa = "enable_gqa"
    except TypeError:  # older torch: expand the KV heads outside the timed region
        ks, vs = ks.repeat_interleave(hq // hkv, 1), vs.repeat_interleave(hq // hkv, 1)
        sdpa = lambda i: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
        gqa = "repeat_interleave"
    theirs = time_ms(sdpa, reps=20)
    # the runner's route for fresh prompts: gather each request's K/V from its pages, then SDPA
    groups = plan_sdpa_prefill([b * seq for b in range(batch)], [seq] * batch,
                               [sequence_slots(range(b * pages_per, (b + 1) * pages_per), seq, page_size)
                                for b in range(batch)], torch.device("cuda"))
    routed = torch.empty_like(q)
    k_slots, v_slots = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    scale = 1.0 / math.sqrt(d)
    route = time_ms(lambda i: sdpa_prefill_attention(q, k_slots, v_slots, groups, scale, routed), reps=20)
    # check all three agree on this shape while we are here
    want = sdpa(0).transpose(1, 2).reshape(batch * seq, hq, d)
    ck.paged_attention(q, k_cache, v_cache, plan, out=out)
    err = float((out.double() - want.double()).norm() / want.double().norm())
    route_err = float((routed.double() - want.double()).norm() / want.double().norm())
    flops = 4 * batch * hq * d * seq * (seq + 1) / 2
    return {
        "kind": "prefill_attention", "case": name, "batch": batch, "seq": seq, "heads": f"{hq}/{hkv}", "head_dim": d,
        "ms": ours, "sdpa_ms": theirs, "speed_vs_sdpa": theirs / ours, "TFLOPs": flops / ours / 1e9,
        "sdpa_TFLOPs": flops / theirs / 1e9, "rel_err_vs_sdpa": err, "sdpa_gqa": gqa,
        "route_ms": route, "route_speed_vs_sdpa": theirs / route, "route_rel_err_vs_sdpa": route_err,
    }


# ----------------------------------------------------------------------------- sampling


def sampling_cases(rows, vocab):
    sets = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (rows * vocab * 4))))
    logits = [torch.randn(rows, vocab, device="cuda") * 3 for _ in range(sets)]
    seeds = torch.arange(rows, device="cuda")
    t = torch.full((rows,), 0.8, device="cuda")
    out = []

    def add(op, ours, theirs, baseline):
        a, b = time_ms(ours, sets=sets), time_ms(theirs, sets=sets)
        out.append({"kind": "sampling", "case": op, "rows": rows, "vocab": vocab, "ms": a, "torch_ms": b,
                    "speed_vs_torch": b / a, "torch_op": baseline})

    add("sample top_k=50 top_p=0.9", lambda i: ck.sample(logits[i], t, 50, 0.9, None, seeds=seeds),
        lambda i: torch_filtered_sample(logits[i], 0.8, 50, 0.9), "topk+sort+cumsum+multinomial")
    add("sample (no filter)", lambda i: ck.sample(logits[i], t, None, None, None, seeds=seeds),
        lambda i: torch.multinomial(torch.softmax(logits[i] / 0.8, -1), 1), "softmax+multinomial")
    add("argmax", lambda i: ck.argmax(logits[i]), lambda i: torch.argmax(logits[i], -1), "argmax")
    add("softmax", lambda i: ck.softmax(logits[i], t), lambda i: torch.softmax(logits[i] / t[:, None], -1),
        "softmax(l / t)")
    add("top-20 distribution", lambda i: ck.top_k_distribution(logits[i], 20, t),
        lambda i: torch.topk(torch.softmax(logits[i] / t[:, None], -1), 20), "softmax+topk")
    return out


def norm_case(rows, hidden, dtype=torch.bfloat16):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    ours = time_ms(lambda i: ck.fused_add_rms_norm(x, r, w, 1e-5))
    theirs = time_ms(lambda i: ref.fused_add_rms_norm(x, r, w, 1e-5))
    elem = x.element_size()
    moved = 4 * x.numel() * elem  # read x, r; write x, r
    return {"kind": "rms_norm", "case": "fused_add_rms_norm", "rows": rows, "hidden": hidden, "ms": ours,
            "torch_ms": theirs, "speed_vs_torch": theirs / ours, "GBps": moved / ours / 1e6}


# ----------------------------------------------------------------------------- report


def fmt(row: dict) -> str:
    k = row["kind"]
    if "error" in row:
        return f"| {k} | {row.get('case', '')} | ERROR: {row['error'][:80]} | | |"
    if k == "decode_attention":
        shape = f"B={row['batch']} kv={row['kv_len']} h={row['heads']} d={row['head_dim']} chunks={row['chunks']}"
        frac = f"{row.get('frac_of_copy', float('nan')):.2f} of copy BW"
        return f"| {k} | {row['case']} {shape} | {row['ms'] * 1e3:.1f} us | {row['GBps']:.0f} GB/s | {frac} |"
    if k == "prefill_attention":
        shape = f"B={row['batch']} L={row['seq']} h={row['heads']} d={row['head_dim']}"
        kernel = (f"| {k} (kernel) | {row['case']} {shape} | {row['ms']:.3f} ms ({row['TFLOPs']:.0f} TFLOP/s) | "
                  f"SDPA {row['sdpa_ms']:.3f} ms | {row['speed_vs_sdpa']:.2f}x SDPA speed |")
        if "route_ms" not in row:
            return kernel
        return kernel + (f"\n| {k} (runner: gather + SDPA) | {row['case']} {shape} | {row['route_ms']:.3f} ms | "
                         f"SDPA {row['sdpa_ms']:.3f} ms | {row['route_speed_vs_sdpa']:.2f}x SDPA speed |")
    if k == "sampling":
        return (f"| {k} | {row['case']} rows={row['rows']} V={row['vocab']} | {row['ms'] * 1e3:.1f} us | "
                f"torch {row['torch_ms'] * 1e3:.1f} us | {row['speed_vs_torch']:.2f}x |")
    if k == "rms_norm":
        return (f"| {k} | rows={row['rows']} hidden={row['hidden']} | {row['ms'] * 1e3:.1f} us "
                f"({row['GBps']:.0f} GB/s) | torch {row['torch_ms'] * 1e3:.1f} us | {row['speed_vs_torch']:.2f}x |")
    return f"| {k} | {row} | | | |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    if not ck.available():
        print(ck.unavailable_reason(), file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    device = torch.cuda.get_device_name(0)
    copy = copy_bandwidth()
    rows: list[dict] = []

    def attempt(fn, *a, **kw):
        try:
            r = fn(*a, **kw)
            rows.extend(r if isinstance(r, list) else [r])
        except Exception as e:  # record and go on: one failing shape must not hide the rest
            rows.append({"kind": fn.__name__, "case": repr(a), "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()

    models = [("llama3-8B", 32, 8, 128), ("llama3.2-1B", 32, 8, 64)]
    if not args.quick:
        models.append(("llama3.2-3B", 24, 8, 128))
    for name, hq, hkv, d in models:
        for batch in (1, 32, 128):
            for kv_len in ((1024, 4096) if args.quick else (1024, 4096, 16384)):
                if batch * kv_len > 128 * 4096 and kv_len > 4096:
                    continue  # keep one layer's cache under a few GB
                attempt(decode_case, name, batch, kv_len, hq, hkv, d, copy_gbps=copy["GBps"])
    for name, hq, hkv, d in models[:2]:
        for batch, seq in ((1, 4096), (4, 2048), (16, 512)) if not args.quick else ((1, 4096),):
            attempt(prefill_case, name, batch, seq, hq, hkv, d)
    for batch in (1, 32, 128):
        attempt(sampling_cases, batch, 128256)
    attempt(sampling_cases, 32, 49152)
    attempt(norm_case, 128, 4096)
    attempt(norm_case, 1, 2048)

    result = {
        "device": device,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "copy_bandwidth": copy,
        "results": rows,
    }
    table = [
        f"# pie CUDA kernels on {device} ({props.multi_processor_count} SMs), torch {torch.__version__}",
        "",
        f"Device-to-device copy: {copy['GBps']:.0f} GB/s (bytes read + written). Medians of CUDA-event timings.",
        "",
        "| kernel | shape | ours | baseline | ratio |",
        "| --- | --- | --- | --- | --- |",
        *[fmt(r) for r in rows],
    ]
    write_results("cuda_kernels", device, result, table, args.out)
    print("\n".join(table))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
