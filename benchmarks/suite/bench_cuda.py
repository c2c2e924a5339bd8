"""CUDA (skipped without a CUDA device and pie's CUDA kernels): each kernel of pie.engine.cuda_ops next to
the torch baseline a runner would otherwise use, on the same seeded inputs, in the same group (compare
the two rows). The measured function synchronizes the device, so each time is launch + run.

- decode attention: Llama-3-8B heads (32 / 8, d 128), bf16, pages of 16, batch 32 x 1024 cached tokens;
  baseline: SDPA over the same K/V contiguous (what gathering would produce), GQA;
- prefill attention: batch 1 x 2048 tokens, causal; baseline: SDPA on contiguous K/V;
- sampling of 32 rows x 128256: top-k 50 / top-p 0.9 (baseline topk + sort + cumsum + multinomial),
  argmax (torch.argmax), softmax (torch.softmax);
- fused add + RMSNorm of 128 x 4096 bf16 (baseline: the eager torch expression of reference.py).

Full tables with bandwidth and FLOP rates: benchmarks/cuda/bench_kernels.py (scripts/gpu_check.sh).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pie.engine import cuda_ops as ck

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda"))
from torch_baselines import torch_filtered_sample  # noqa: E402  (benchmarks/cuda: shared with the full tables)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and ck.available()),
                       reason="needs a CUDA device and pie's CUDA kernels"),
]


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


HQ, HKV, D, PAGE = 32, 8, 128, 16


def paged_case(batch: int, kv_len: int, qo_len: int):
    g = gen()
    pages_per = math.ceil(kv_len / PAGE)
    num_pages = batch * pages_per
    k = torch.randn(batch, kv_len, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, kv_len, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(batch * qo_len, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k_cache = torch.zeros(num_pages * PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    for b in range(batch):  # pages in order
        k_cache[b * pages_per * PAGE: b * pages_per * PAGE + kv_len] = k[b]
        v_cache[b * pages_per * PAGE: b * pages_per * PAGE + kv_len] = v[b]
    k_cache = k_cache.view(num_pages, PAGE, HKV, D)
    v_cache = v_cache.view(num_pages, PAGE, HKV, D)
    last = kv_len - (pages_per - 1) * PAGE
    plan = ck.plan_attention(torch.arange(batch + 1) * qo_len, torch.arange(batch + 1) * pages_per,
                             torch.arange(num_pages), [last] * batch, page_size=PAGE, num_q_heads=HQ,
                             num_kv_heads=HKV, head_dim=D)
    out = torch.empty_like(q)
    qs = q.view(batch, qo_len, HQ, D).transpose(1, 2).contiguous()
    ks, vs = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ours = synced(lambda: ck.paged_attention(q, k_cache, v_cache, plan, out=out))
    causal = qo_len > 1
    try:
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        theirs = synced(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True))
    except TypeError:  # older torch: the KV heads expanded outside the measurement
        ks, vs = ks.repeat_interleave(HQ // HKV, 1), vs.repeat_interleave(HQ // HKV, 1)
        theirs = synced(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
    return ours, theirs


@pytest.mark.parametrize("impl", ["pie", "torch_sdpa"])
def test_cuda_decode_attention(benchmark, impl):
    ours, theirs = paged_case(batch=32, kv_len=1024, qo_len=1)
    benchmark.group = "cuda: decode attention b32 kv1024"
    benchmark(ours if impl == "pie" else theirs)


@pytest.mark.parametrize("impl", ["pie", "torch_sdpa"])
def test_cuda_prefill_attention(benchmark, impl):
    ours, theirs = paged_case(batch=1, kv_len=2048, qo_len=2048)
    benchmark.group = "cuda: prefill attention 2048"
    benchmark(ours if impl == "pie" else theirs)


@pytest.mark.parametrize("impl", ["pie", "torch"])
@pytest.mark.parametrize("op", ["sample_top_k_top_p", "argmax", "softmax"])
def test_cuda_sampling_32_rows(benchmark, op, impl):
    logits = torch.randn(32, 128256, device="cuda", generator=gen(1)) * 3
    t = torch.full((32,), 0.8, device="cuda")
    seeds = torch.arange(32, device="cuda")
    fns = {
        ("sample_top_k_top_p", "pie"): lambda: ck.sample(logits, t, 50, 0.9, None, seeds=seeds),
        ("sample_top_k_top_p", "torch"): lambda: torch_filtered_sample(logits, 0.8, 50, 0.9),
        ("argmax", "pie"): lambda: ck.argmax(logits),
        ("argmax", "torch"): lambda: torch.argmax(logits, -1),
        ("softmax", "pie"): lambda: ck.softmax(logits, t),
        ("softmax", "torch"): lambda: torch.softmax(logits / t[:, None], -1),
    }
    benchmark.group = f"cuda: {op} 32x128256"
    benchmark(synced(fns[op, impl]))


@pytest.mark.parametrize("impl", ["pie", "torch"])
def test_cuda_fused_add_rms_norm(benchmark, impl):
    from pie.engine.cuda_ops import reference as ref

    g = gen(2)
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = ck.fused_add_rms_norm if impl == "pie" else ref.fused_add_rms_norm
    benchmark.group = "cuda: fused add + RMSNorm 128x4096"
    benchmark(synced(lambda: fn(x, r, w, 1e-5)))
