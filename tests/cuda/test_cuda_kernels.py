"""CUDA kernels (pie.engine.cuda_ops) against the PyTorch references, on a GPU.

Skipped without a CUDA device. With PIE_REQUIRE_CUDA_KERNELS=1 (scripts/gpu_check.sh sets it) a
GPU machine without the built module fails instead of skipping. Sizes are awkward on purpose:
batch 1 and 989, vocab 111 / 49152 / 128256, ragged lengths, sequences ending on and just past page
boundaries, grouped-query heads (group 1, 3, 4, 7). Every output is poisoned with NaN first, so an
unwritten element fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from pie.engine import cuda_ops as ck
from pie.engine.cuda_ops import reference as ref

if torch.cuda.is_available() and not ck.available() and os.environ.get("PIE_REQUIRE_CUDA_KERNELS") == "1":
    raise RuntimeError(ck.unavailable_reason())

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not ck.available(), reason=str(ck.unavailable_reason())),
]

DEV = "cuda"
ATTN_DTYPES = [torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    return float((out - want).norm() / want.norm().clamp_min(1e-30))


def tol(dtype: torch.dtype) -> float:
    return 2e-3 if dtype == torch.float16 else 1.2e-2


# ----------------------------------------------------------------------------- attention


def run_attention(qo_lens, kv_lens, *, page_size, num_q_heads, num_kv_heads, head_dim, dtype, seed,
                  masks=None, use_decode_kernel=True, exclude=None):
    g = gen(seed)
    batch = ref.make_paged_batch(qo_lens, kv_lens, page_size, generator=g)
    num_tokens = sum(qo_lens)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=g).to(DEV, dtype)
    cache_shape = (batch["num_pages"], page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(DEV, dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(DEV, dtype)
    args = (batch["qo_indptr"], batch["kv_page_indptr"], batch["kv_page_indices"], batch["kv_last_page_len"])
    plan = ck.plan_attention(*args, page_size=page_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, masks=masks, use_decode_kernel=use_decode_kernel,
                             exclude=exclude)
    out = torch.full_like(q, float("nan"))
    ck.paged_attention(q, k_cache, v_cache, plan, out=out)
    torch.cuda.synchronize()
    want = ref.paged_attention(q, k_cache, v_cache, *(a.to(DEV) for a in args), masks=masks)
    return out, want, plan


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(8, 8), (12, 4), (9, 3), (28, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_small(dtype, head_dim, heads):
    kv_lens = [1, 15, 16, 17, 33, 100, 255, 257]
    out, want, plan = run_attention([1] * len(kv_lens), kv_lens, page_size=16, num_q_heads=heads[0],
                                    num_kv_heads=heads[1], head_dim=head_dim, dtype=dtype, seed=10)
    assert plan.num_decode == len(kv_lens) and plan.num_work == 0
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_split_kv_batch_1_long(dtype, head_dim):
    out, want, plan = run_attention([1], [7001], page_size=16, num_q_heads=32, num_kv_heads=8,
                                    head_dim=head_dim, dtype=dtype, seed=11)
    assert plan.num_chunks > 1  # the merge kernel ran
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_decode_batch_989_ragged(dtype):
    lens = torch.randint(1, 700, (989,), generator=gen(12)).tolist()
    out, want, _ = run_attention([1] * 989, lens, page_size=16, num_q_heads=32, num_kv_heads=8,
                                 head_dim=128, dtype=dtype, seed=12)
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 5])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (9, 3)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_prefill_small_mixed_batch(dtype, head_dim, page_size, heads):
    # prefill with and without a prefix, tile boundaries (128, 129, 300 rows), decodes mixed in
    qo_lens = [7, 1, 128, 129, 300, 1, 3]
    kv_lens = [7, 40, 128, 200, 400, 1, 131]
    out, want, plan = run_attention(qo_lens, kv_lens, page_size=page_size, num_q_heads=heads[0],
                                    num_kv_heads=heads[1], head_dim=head_dim, dtype=dtype, seed=13)
    assert plan.num_work > 0 and plan.num_decode == 2
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_excluded_requests_are_left_untouched(dtype):
    # a decode and two prefills excluded (what the CUDA attention backend hands to SDPA); the others still attended
    qo_lens = [7, 1, 129, 300, 1, 3]
    kv_lens = [7, 40, 129, 400, 1, 131]
    exclude = [1, 2, 3]
    out, want, plan = run_attention(qo_lens, kv_lens, page_size=16, num_q_heads=32, num_kv_heads=8,
                                    head_dim=128, dtype=dtype, seed=16, exclude=exclude)
    bounds = [0]
    for n in qo_lens:
        bounds.append(bounds[-1] + n)
    skipped = torch.zeros(out.shape[0], dtype=torch.bool, device=DEV)
    for r in exclude:
        skipped[bounds[r]:bounds[r + 1]] = True
    assert plan.num_decode == 1 and plan.num_work == 2  # request 4 decodes; requests 0 and 5 one tile each
    assert torch.isnan(out[skipped]).all()  # the NaN poison survives: nothing written there
    assert rel_err(out[~skipped], want[~skipped]) < tol(dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_prefill_runs_single_tokens_too(dtype):
    out, want, plan = run_attention([1, 1, 5], [9, 300, 5], page_size=16, num_q_heads=32, num_kv_heads=8,
                                    head_dim=128, dtype=dtype, seed=14, use_decode_kernel=False)
    assert plan.num_decode == 0
    assert rel_err(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_custom_masks(dtype, head_dim):
    g = gen(15)
    qo_lens, kv_lens = [5, 1, 140, 2], [37, 50, 190, 2]
    masks = [
        ref.random_brle_rows(5, 37, g),
        ref.random_brle_rows(1, 50, g),  # a decode row with a mask
        None,  # causal rows synthesised by the plan (two tiles)
        [[0, 2], [1, 1]],  # row 0 sees nothing -> zeros
    ]
    out, want, plan = run_attention(qo_lens, kv_lens, page_size=16, num_q_heads=8, num_kv_heads=2,
                                    head_dim=head_dim, dtype=dtype, seed=15, masks=masks)
    assert plan.mask is not None
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < tol(dtype)
    assert out[sum(qo_lens[:3])].abs().max() == 0


def test_long_prefill():
    """One 1000-token causal prefill over 63 pages (GQA 32/8): 8 tiles of 128 rows."""
    dtype = torch.bfloat16
    out, want, _ = run_attention([1000], [1000], page_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128,
                                 dtype=dtype, seed=16)
    assert rel_err(out, want) < tol(dtype)


def test_decode_cuda_graph_replay_with_reused_plan():
    """Capture decode attention once; refill the plan in place with new batches and replay."""
    dtype, page_size, hq, hkv, d, batch = torch.bfloat16, 16, 32, 8, 128, 8
    num_pages = 600
    k_cache = torch.randn(num_pages, page_size, hkv, d, device=DEV, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, hq, d, device=DEV, dtype=dtype)
    out = torch.empty_like(q)
    kw = dict(page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, split=(4, 256), page_capacity=num_pages)

    def batch_of(seed):
        lens = torch.randint(1, 1000, (batch,), generator=gen(seed)).tolist()  # <= 63 pages each
        b = ref.make_paged_batch([1] * batch, lens, page_size, generator=gen(seed), spare_pages=0)
        perm = torch.randperm(num_pages, generator=gen(seed))[: b["kv_page_indices"].numel()]
        b["kv_page_indices"] = perm.int()  # any pages of the big cache
        return b

    b = batch_of(60)
    args = lambda b: (b["qo_indptr"], b["kv_page_indptr"], b["kv_page_indices"], b["kv_last_page_len"])  # noqa: E731
    plan = ck.plan_attention(*args(b), **kw)
    ck.paged_attention(q, k_cache, v_cache, plan, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.paged_attention(q, k_cache, v_cache, plan, out=out)
    for seed in (61, 62):
        b = batch_of(seed)
        ck.plan_attention(*args(b), reuse=plan, **kw)
        q.copy_(torch.randn(batch, hq, d, generator=gen(seed)).to(DEV, dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.paged_attention(q, k_cache, v_cache, *(a.to(DEV) for a in args(b)))
        assert torch.isfinite(out).all()
        assert rel_err(out, want) < tol(dtype)


def test_attention_rejects_bad_inputs():
    batch = ref.make_paged_batch([2], [2], 16)
    plan = ck.plan_attention(batch["qo_indptr"], batch["kv_page_indptr"], batch["kv_page_indices"],
                             batch["kv_last_page_len"], page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64)
    q = torch.randn(2, 4, 64, device=DEV, dtype=torch.float16)
    cache = torch.randn(batch["num_pages"], 16, 2, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="shape"):
        ck.paged_attention(q[:1], cache, cache, plan)
    with pytest.raises(TypeError, match="dtype"):
        ck.paged_attention(q, cache.bfloat16(), cache, plan)
    with pytest.raises(TypeError, match="not supported"):
        ck.paged_attention(q.float(), cache.float(), cache.float(), plan)


# ----------------------------------------------------------------------------- RoPE + append


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_append_kv_from_fused_qkv(dtype, head_dim):
    g = gen(20)
    T, Hq, Hkv, pages, ps = 37, 12, 4, 9, 16
    qkv = torch.randn(T, (Hq + 2 * Hkv) * head_dim, generator=g).to(DEV, dtype)
    q = qkv[:, : Hq * head_dim].view(T, Hq, head_dim)
    k = qkv[:, Hq * head_dim : (Hq + Hkv) * head_dim].view(T, Hkv, head_dim)
    v = qkv[:, (Hq + Hkv) * head_dim :].view(T, Hkv, head_dim)
    cos, sin = (t.to(DEV) for t in ref.rope_cos_sin(4096, head_dim, theta=500000.0))
    pos = torch.randint(0, 4096, (T,), generator=g, dtype=torch.int32).to(DEV)
    slots = torch.randperm(pages * ps, generator=g)[:T].to(DEV)
    slots[3] = pages * ps + 5  # out of range: skipped
    k_cache = torch.full((pages, ps, Hkv, head_dim), float("nan"), device=DEV, dtype=dtype)
    v_cache = k_cache.clone()
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_want = ref.rope_append_kv(q.clone(), k.clone(), v.clone(), pos, cos, sin, k_want, v_want, slots)
    q_out = ck.rope_append_kv(q, k, v, pos, cos, sin, k_cache, v_cache, slots)
    assert q_out.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(q_out, q_want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k_cache, k_want, atol=1e-2, rtol=1e-2, equal_nan=True)
    assert torch.equal(v_cache.isnan(), v_want.isnan()) and torch.equal(v_cache.nan_to_num(), v_want.nan_to_num())


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (989, 2048), (33, 4096), (7, 100)])
def test_rms_norm(dtype, rows, hidden):
    g = gen(30)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(DEV, dtype)
    w = torch.randn(hidden, generator=g).to(DEV, dtype)
    out = torch.full_like(x, float("nan"))
    ck.rms_norm(x, w, 1e-5, out=out)
    want = ref.rms_norm(x, w, 1e-5)
    # same rounding steps; only the sum-of-squares order differs: within one unit in the last place
    torch.testing.assert_close(out, want, atol=1e-2, rtol=1.6e-2 if dtype == torch.bfloat16 else 2e-3)
    res = torch.randn(rows, hidden, generator=g).to(DEV, dtype)
    want_x, want_res = ref.fused_add_rms_norm(x, res, w, 1e-5)
    xo, ro = ck.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(ro, want_res)
    torch.testing.assert_close(xo, want_x, atol=1e-2, rtol=1.6e-2 if dtype == torch.bfloat16 else 2e-3)


def test_rms_norm_strided_rows():
    x = torch.randn(10, 256, device=DEV, dtype=torch.bfloat16)[::2]
    w = torch.randn(256, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(ck.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), atol=1e-2, rtol=1.6e-2)


# ----------------------------------------------------------------------------- sampling

VOCABS = [111, 49152, 128256]


def make_logits(rows, vocab, dtype=torch.float32, seed=40, scale=3.0):
    return (torch.randn(rows, vocab, generator=gen(seed)) * scale).to(DEV, dtype)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 989])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_logprobs_argmax(vocab, rows, dtype):
    if rows == 989 and vocab == 128256 and dtype == torch.bfloat16:
        pytest.skip("covered by the float32 case; keeps the test fast")
    logits = make_logits(rows, vocab, dtype)
    t = torch.rand(rows, generator=gen(41)).add(0.3).to(DEV)
    torch.testing.assert_close(ck.softmax(logits, t), ref.softmax(logits, t), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ck.logsumexp(logits, t), ref.logsumexp(logits, t), atol=1e-4, rtol=1e-5)
    assert torch.equal(ck.argmax(logits), ref.argmax(logits))
    n = 3 * rows
    r = torch.randint(0, rows, (n,), generator=gen(42), dtype=torch.int32).to(DEV)
    ids = torch.randint(0, vocab, (n,), generator=gen(43), dtype=torch.int32).to(DEV)
    torch.testing.assert_close(ck.logprobs(logits, r, ids), ref.logprobs(logits, r, ids), atol=1e-4, rtol=1e-5)


def test_argmax_ties_and_masked_rows():
    logits = torch.full((3, 1000), float("-inf"), device=DEV)
    logits[0, [5, 700]] = 2.0
    logits[1, 999] = -1e30
    assert ck.argmax(logits).tolist() == [5, 999, 0]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_distribution(vocab, dtype):
    rows = 33
    logits = make_logits(rows, vocab, dtype, seed=44)
    for k in (1, 20, min(vocab, 1024)):
        t = torch.full((rows,), 0.8, device=DEV)
        ids, probs = ck.top_k_distribution(logits, k, t)
        want_ids, want_probs = ref.top_k_distribution(logits, k, t)
        assert torch.equal(ids, want_ids), f"k={k}"
        torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 989])
def test_sample_matches_reference_draws(vocab, rows):
    """Same seeds -> the same tokens as the reference, except where rounding moves a boundary."""
    logits = make_logits(rows, vocab, seed=45, scale=2.0)
    g = gen(46)
    t = torch.rand(rows, generator=g).add(0.5)
    k = torch.randint(0, 60, (rows,), generator=g, dtype=torch.int32)
    p = torch.rand(rows, generator=g).clamp(0.3, 1.0)
    mp = torch.rand(rows, generator=g) * 0.1
    seeds = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g)
    t[::7] = 0.0  # greedy rows
    p[::5] = 1.0
    k[::3] = 0
    out = ck.sample(logits, t, k, p, mp, seeds=seeds)
    want = ref.sample(logits.cpu(), t, k, p, mp, seeds=seeds.tolist())
    agree = (out.cpu() == want).double().mean()
    assert agree >= (0.99 if rows > 1 else 1.0), f"agreement {agree:.4f}"
    assert torch.equal(ck.sample(logits, t, k, p, mp, seeds=seeds), out)  # deterministic
    assert torch.equal(out[::7].cpu(), ref.argmax(logits[::7]).cpu())


@pytest.mark.parametrize(
    "t,k,p,mp", [(1.0, 0, 1.0, 0.0), (0.7, 10, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.2, 0, 1.0, 0.05),
                 (0.9, 20, 0.8, 0.01)],
)
def test_sample_statistics(t, k, p, mp):
    """20000 draws of one row: frequencies follow the filtered distribution; masked never drawn."""
    vocab, draws = 64, 20000
    logits = make_logits(1, vocab, seed=47, scale=1.5)
    logits[0, 7] = float("-inf")
    rows = logits.expand(draws, vocab).contiguous()
    ids = ck.sample(rows, t, k, p, mp, seeds=torch.arange(draws))
    freq = torch.bincount(ids.long().cpu(), minlength=vocab).double() / draws
    want = ref.filtered_weights(logits.cpu(), t, k, p, mp)[0]
    want /= want.sum()
    assert freq[7] == 0
    assert bool(((want == 0) <= (freq == 0)).all()), "a filtered-out token was drawn"
    assert float((freq - want).abs().sum()) < 0.035


def test_sample_large_vocab_filters_hold():
    """128256-way rows: every draw lies inside the top-k / top-p set."""
    rows, vocab = 64, 128256
    logits = make_logits(rows, vocab, seed=48, scale=4.0)
    ids = ck.sample(logits, 1.0, 40, 0.9, 0.0, seeds=torch.arange(rows)).long().cpu()
    w = ref.filtered_weights(logits.cpu(), 1.0, 40, 0.9, 0.0)
    assert bool((w[torch.arange(rows), ids] > 0).all())


def test_sample_bfloat16_logits_and_defaults():
    logits = make_logits(5, 49152, torch.bfloat16, seed=49)
    ids = ck.sample(logits)  # t = 1, no filters, fresh seeds
    assert ids.shape == (5,) and ids.dtype == torch.int32
    assert bool(((ids >= 0) & (ids < 49152)).all())
