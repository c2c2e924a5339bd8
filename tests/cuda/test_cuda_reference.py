"""The PyTorch reference ops (pie.engine.cuda_ops.reference) against naive loops, on the CPU.

The CUDA kernels are tested against these references (test_cuda_kernels.py), so the references are
first checked here against the plainest possible implementation of each definition.
"""

from __future__ import annotations

import math

import pytest
import torch

from pie.engine import cuda_ops as ck
from pie.engine.cuda_ops import reference as ref


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- attention


def naive_attention(q, k_cache, v_cache, batch, masks, scale):
    """Loops over requests, tokens, heads and sequence entries, in float64."""
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    qo, kp = batch["qo_indptr"].tolist(), batch["kv_page_indptr"].tolist()
    pages_all = batch["kv_page_indices"].tolist()
    for r in range(len(qo) - 1):
        pages = pages_all[kp[r] : kp[r + 1]]
        kv_len = (len(pages) - 1) * page_size + int(batch["kv_last_page_len"][r])
        qo_len = qo[r + 1] - qo[r]
        for i in range(qo_len):
            if masks is not None and masks[r] is not None:
                allowed, attend = [], True
                for n in masks[r][i]:
                    allowed += [attend] * n
                    attend = not attend
            else:
                allowed = [j <= kv_len - qo_len + i for j in range(kv_len)]
            for h in range(q.shape[1]):
                qv = q[qo[r] + i, h].double()
                scores, values = [], []
                for j in range(kv_len):
                    if not allowed[j]:
                        continue
                    page, off = pages[j // page_size], j % page_size
                    kv = k_cache[page, off, h // group].double()
                    scores.append(float(qv @ kv) * scale)
                    values.append(v_cache[page, off, h // group].double())
                if not scores:
                    continue
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                out[qo[r] + i, h] = sum(wi / z * vi for wi, vi in zip(w, values))
    return out


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (6, 2)])
@pytest.mark.parametrize("with_masks", [False, True])
def test_attention_reference_matches_loops(num_q_heads, num_kv_heads, with_masks):
    g = gen(1)
    page_size, head_dim = 4, 8
    qo_lens, kv_lens = [1, 3, 5, 2], [1, 7, 9, 4]  # decode, page boundary crossings, full prefill
    batch = ref.make_paged_batch(qo_lens, kv_lens, page_size, generator=g)
    q = torch.randn(sum(qo_lens), num_q_heads, head_dim, generator=g)
    k_cache = torch.randn(batch["num_pages"], page_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(batch["num_pages"], page_size, num_kv_heads, head_dim, generator=g)
    masks = None
    if with_masks:
        masks = [None, ref.random_brle_rows(3, 7, g), ref.random_brle_rows(5, 9, g), [[0, 4]] * 2]
    out = ref.paged_attention(
        q, k_cache, v_cache, batch["qo_indptr"], batch["kv_page_indptr"], batch["kv_page_indices"],
        batch["kv_last_page_len"], masks=masks,
    )
    want = naive_attention(q, k_cache, v_cache, batch, masks, 1 / math.sqrt(head_dim))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if with_masks:  # the all-hidden rows of request 3 are zeros
        assert out[sum(qo_lens[:3]) :].abs().max() == 0


def test_brle_examples():
    assert ref.brle_to_dense([[2, 3, 1]], 6).tolist() == [[True, True, False, False, False, True]]
    assert ref.brle_to_dense([[0, 4, 2]], 6).tolist() == [[False] * 4 + [True] * 2]
    with pytest.raises(ValueError):
        ref.brle_to_dense([[2, 3]], 6)
    with pytest.raises(ValueError):
        ref.brle_to_dense([[-1, 7]], 6)
    assert ref.causal_mask(2, 4).tolist() == [[True, True, True, False], [True] * 4]


# ----------------------------------------------------------------------------- RoPE


def test_rope_tables_and_rotation():
    cos, sin = ref.rope_cos_sin(20, 8, theta=10000.0)
    for p in (0, 3, 19):
        for i in range(4):
            ang = p / 10000.0 ** (2 * i / 8)
            assert abs(cos[p, i] - math.cos(ang)) < 1e-6 and abs(sin[p, i] - math.sin(ang)) < 1e-6
    g = gen(2)
    x = torch.randn(3, 2, 8, generator=g)
    pos = torch.tensor([0, 5, 19])
    y = ref.apply_rope(x, pos, cos, sin)
    for t in range(3):
        for h in range(2):
            for i in range(4):
                c, s = float(cos[pos[t], i]), float(sin[pos[t], i])
                x1, x2 = float(x[t, h, i]), float(x[t, h, i + 4])
                assert abs(y[t, h, i] - (x1 * c - x2 * s)) < 1e-5
                assert abs(y[t, h, i + 4] - (x2 * c + x1 * s)) < 1e-5


def test_llama3_scaling_with_factor_one_is_identity():
    plain = ref.rope_cos_sin(64, 16, theta=500000.0)
    scaled = ref.rope_cos_sin(
        64, 16, theta=500000.0,
        scaling=dict(rope_type="llama3", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192),
    )
    torch.testing.assert_close(plain, scaled)
    slow = ref.rope_cos_sin(
        64, 16, theta=500000.0,
        scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192),
    )
    assert torch.equal(plain[0][:, 0], slow[0][:, 0])  # the highest frequency is unscaled
    assert not torch.equal(plain[0][:, -1], slow[0][:, -1])  # the lowest is divided by the factor


def test_rope_append_writes_slots_and_skips_out_of_range():
    g = gen(3)
    T, Hq, Hkv, D, pages, ps = 4, 4, 2, 8, 3, 2
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    cos, sin = ref.rope_cos_sin(16, D)
    k_cache = torch.zeros(pages, ps, Hkv, D)
    v_cache = torch.zeros(pages, ps, Hkv, D)
    slots = torch.tensor([5, 0, 6, -1])  # 6 and -1 are outside 0..5
    pos = torch.tensor([3, 4, 5, 6], dtype=torch.int32)
    qr = ref.rope_append_kv(q, k, v, pos, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(qr, ref.apply_rope(q, pos, cos, sin))
    kr = ref.apply_rope(k, pos, cos, sin)
    torch.testing.assert_close(k_cache[2, 1], kr[0])
    torch.testing.assert_close(k_cache[0, 0], kr[1])
    torch.testing.assert_close(v_cache[2, 1], v[0])
    written = {(2, 1), (0, 0)}
    for p in range(pages):
        for o in range(ps):
            if (p, o) not in written:
                assert k_cache[p, o].abs().max() == 0 and v_cache[p, o].abs().max() == 0


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_loops(dtype):
    g = gen(4)
    x = torch.randn(3, 10, generator=g).to(dtype)
    w = torch.randn(10, generator=g).to(dtype)
    out = ref.rms_norm(x, w, 1e-6)
    for r in range(3):
        ms = sum(float(v) ** 2 for v in x[r].float()) / 10
        for i in range(10):
            n = torch.tensor(float(x[r, i]) / math.sqrt(ms + 1e-6)).to(dtype)
            want = torch.tensor(float(w[i]) * float(n)).to(dtype)
            assert abs(float(out[r, i]) - float(want)) <= 1e-5 + 1e-2 * abs(float(want))
    res = torch.randn(3, 10, generator=g).to(dtype)
    normed, summed = ref.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(summed, (x.float() + res.float()).to(dtype))
    torch.testing.assert_close(normed, ref.rms_norm(summed, w, 1e-6))


# ----------------------------------------------------------------------------- sampling


def test_philox_known_answers():
    # Random123 philox4x32-10 known-answer vectors
    assert ref.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert ref.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    u = ref.philox_uniform([0, 1, 2**64 - 1, -1])
    assert ((u >= 0) & (u < 1)).all() and u[2] == u[3]  # -1 is read as 2^64 - 1


def test_softmax_logsumexp_logprobs_argmax():
    g = gen(5)
    logits = torch.randn(4, 50, generator=g) * 3
    t = torch.tensor([1.0, 0.5, 0.0, 2.0])
    p = ref.softmax(logits, t)
    for r, tr in enumerate([1.0, 0.5, 1.0, 2.0]):
        e = [math.exp(float(v) / tr) for v in logits[r]]
        z = sum(e)
        assert max(abs(float(p[r, i]) - e[i] / z) for i in range(50)) < 1e-6
        assert abs(float(ref.logsumexp(logits, t)[r]) - math.log(z)) < 1e-4
    rows, ids = torch.tensor([0, 3, 3]), torch.tensor([7, 0, 49])
    lp = ref.logprobs(logits, rows, ids)
    for n in range(3):
        z = sum(math.exp(float(v)) for v in logits[rows[n]])
        assert abs(float(lp[n]) - (float(logits[rows[n], ids[n]]) - math.log(z))) < 1e-4
    tied = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert ref.argmax(tied).tolist() == [1, 0]


def naive_filter(row: list[float], t: float, k: int, p: float, mp: float) -> list[float]:
    """Sort-based filters on one row; returns normalised probabilities."""
    n = len(row)
    m = max(row)
    w = [math.exp((x - m) / t) for x in row]
    keep = [True] * n
    if 0 < k < n:
        kth = sorted(row, reverse=True)[k - 1]
        keep = [x >= kth for x in row]
    if p < 1:
        order = sorted((i for i in range(n) if keep[i]), key=lambda i: -row[i])
        total = sum(w[i] for i in order)
        cum, thr = 0.0, row[order[-1]]
        for i in order:
            cum += w[i]
            if cum >= p * total:
                thr = row[i]
                break
        keep = [keep[i] and row[i] >= thr for i in range(n)]
    keep = [keep[i] and w[i] >= mp for i in range(n)]
    z = sum(w[i] for i in range(n) if keep[i])
    return [w[i] / z if keep[i] else 0.0 for i in range(n)]


@pytest.mark.parametrize(
    "t,k,p,mp",
    [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1), (0.9, 10, 0.5, 0.05),
     (1.0, 3, 0.0, 0.0)],
)
def test_filtered_weights_match_sorting(t, k, p, mp):
    g = gen(6)
    logits = torch.randn(3, 40, generator=g) * 2
    logits[1, :5] = logits[1, 5]  # ties at thresholds are kept
    w = ref.filtered_weights(logits, t, k, p, mp)
    probs = w / w.sum(-1, keepdim=True)
    for r in range(3):
        want = naive_filter(logits[r].double().tolist(), t, k, p, mp)
        assert max(abs(a - b) for a, b in zip(probs[r].tolist(), want)) < 1e-9


def test_sample_reference_follows_the_filtered_distribution():
    g = gen(7)
    logits = torch.randn(1, 12, generator=g) * 1.5
    logits[0, 3] = float("-inf")  # masked: never drawn
    draws = 20000
    rows = logits.expand(draws, 12)
    ids = ref.sample(rows, 0.8, 8, 0.9, 0.02, seeds=range(draws))
    freq = torch.bincount(ids.long(), minlength=12).double() / draws
    want = ref.filtered_weights(logits, 0.8, 8, 0.9, 0.02)[0]
    want = want / want.sum()
    assert freq[3] == 0 and ((want == 0) <= (freq == 0)).all()
    assert (freq - want).abs().sum() < 0.03  # total variation
    greedy = ref.sample(logits, 0.0, seeds=[1])
    assert greedy.tolist() == ref.argmax(logits).tolist()


def test_top_k_distribution_reference():
    g = gen(8)
    logits = torch.randn(2, 30, generator=g)
    logits[0, 10] = logits[0, 20] = 9.0  # tie: lower id first
    ids, probs = ref.top_k_distribution(logits, 4, torch.tensor([1.0, 0.5]))
    assert ids[0, :2].tolist() == [10, 20]
    for r, t in enumerate([1.0, 0.5]):
        row = logits[r].tolist()
        order = sorted(range(30), key=lambda i: (-row[i], i))[:4]
        z = sum(math.exp(x / t) for x in row)
        assert ids[r].tolist() == order
        assert max(abs(float(probs[r, n]) - math.exp(row[order[n]] / t) / z) for n in range(4)) < 1e-6


# ----------------------------------------------------------------------------- plan (CPU schedule)


def test_plan_schedule_on_cpu_covers_every_token_once():
    qo_lens, kv_lens = [1, 130, 1, 64, 65, 0], [1, 300, 5000, 64, 65, 3]
    batch = ref.make_paged_batch(qo_lens, kv_lens, 16, generator=gen(9))
    plan = ck.plan_attention(
        batch["qo_indptr"], batch["kv_page_indptr"], batch["kv_page_indices"], batch["kv_last_page_len"],
        page_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, device="cpu", num_sms=132,
    )
    assert sorted(plan.decode_req.tolist()) == [0, 2]
    covered = []
    for r, tile in zip(plan.work_req.tolist(), plan.work_tile.tolist()):
        start = int(batch["qo_indptr"][r]) + tile * ck.PREFILL_TILE
        covered += list(range(start, min(start + ck.PREFILL_TILE, int(batch["qo_indptr"][r + 1]))))
    decode_rows = [int(batch["qo_indptr"][r]) for r in plan.decode_req.tolist()]
    assert sorted(covered + decode_rows) == list(range(sum(qo_lens)))
    assert plan.num_chunks * plan.chunk_tokens >= 5000 and plan.chunk_tokens % 32 == 0
    assert plan.part_o is not None and plan.part_o.shape == (plan.num_chunks, 2, 32, 128)
    # heaviest tiles first
    costs = [int(batch["kv_page_indptr"][r + 1] - batch["kv_page_indptr"][r]) for r in plan.work_req.tolist()]
    assert costs[0] == max(costs)


def test_plan_exclude_drops_requests_from_the_schedule():
    qo_lens, kv_lens = [1, 130, 1, 64, 300], [1, 130, 5000, 64, 300]
    batch = ref.make_paged_batch(qo_lens, kv_lens, 16, generator=gen(13))
    args = (batch["qo_indptr"], batch["kv_page_indptr"], batch["kv_page_indices"], batch["kv_last_page_len"])
    kw = dict(page_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, device="cpu", num_sms=132)
    plan = ck.plan_attention(*args, exclude=[1, 2, 4], **kw)
    assert plan.decode_req.tolist() == [0]
    assert sorted(set(plan.work_req.tolist())) == [3] and plan.num_work == 1
    everything = ck.plan_attention(*args, **kw)
    assert sorted(set(everything.work_req.tolist())) == [1, 3, 4] and everything.num_decode == 2
    with pytest.raises(ValueError, match="exclude"):
        ck.plan_attention(*args, exclude=[5], **kw)


def test_plan_rejects_malformed_batches():
    kw = dict(page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, device="cpu", num_sms=8)
    with pytest.raises(ValueError, match="kv_last_page_len"):
        ck.plan_attention([0, 1], [0, 1], [0], [17], **kw)
    with pytest.raises(ValueError, match="input tokens but kv_len"):
        ck.plan_attention([0, 3], [0, 1], [0], [2], **kw)
    with pytest.raises(ValueError, match="head_dim"):
        ck.plan_attention([0, 1], [0, 1], [0], [1], **{**kw, "head_dim": 96})
    with pytest.raises(ValueError, match="multiple"):
        ck.plan_attention([0, 1], [0, 1], [0], [1], **{**kw, "num_q_heads": 3})


def test_kernels_report_why_they_are_unavailable():
    if ck.available():
        pytest.skip("CUDA kernels are available here")
    assert ck.unavailable_reason().startswith("CUDA kernels unavailable: ")


def test_plan_reuse_overwrites_in_place_and_checks_shape():
    kw = dict(page_size=16, num_q_heads=8, num_kv_heads=2, head_dim=128, device="cpu", split=(4, 256))
    a = ref.make_paged_batch([1, 1, 1], [5, 300, 17], 16, generator=gen(10))
    plan = ck.plan_attention(a["qo_indptr"], a["kv_page_indptr"], a["kv_page_indices"], a["kv_last_page_len"],
                             page_capacity=100, **kw)
    assert (plan.num_chunks, plan.chunk_tokens) == (4, 256) and plan.kv_page_indices.numel() == 100
    b = ref.make_paged_batch([1, 1, 1], [900, 2, 40], 16, generator=gen(11))
    same = ck.plan_attention(b["qo_indptr"], b["kv_page_indptr"], b["kv_page_indices"], b["kv_last_page_len"],
                             reuse=plan, **kw)
    assert same is plan
    assert plan.kv_page_indptr.tolist() == b["kv_page_indptr"].tolist()
    n = b["kv_page_indices"].numel()
    assert plan.kv_page_indices[:n].tolist() == b["kv_page_indices"].tolist()
    assert plan.kv_last_page_len.tolist() == b["kv_last_page_len"].tolist()
    with pytest.raises(ValueError, match="does not cover"):
        ck.plan_attention(b["qo_indptr"], b["kv_page_indptr"], b["kv_page_indices"], b["kv_last_page_len"],
                          **{**kw, "split": (1, 256)})
    c = ref.make_paged_batch([1, 1], [5, 6], 16, generator=gen(12))
    with pytest.raises(ValueError, match="cannot be reused"):
        ck.plan_attention(c["qo_indptr"], c["kv_page_indptr"], c["kv_page_indices"], c["kv_last_page_len"],
                          reuse=plan, **kw)
