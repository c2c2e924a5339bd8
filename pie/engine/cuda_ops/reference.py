"""PyTorch reference implementations of every CUDA kernel op (pie.engine.cuda_ops).

Plain, readable PyTorch that runs on any device (float32/float64 arithmetic); the CUDA kernels are
tested against these at awkward sizes, and these are tested against naive loops
(tests/cuda/test_cuda_reference.py). Conventions are those of pie/engine/batch.py and
csrc/kernels/cuda/pie_cuda.h:

- Paged KV cache per layer: k_cache, v_cache (num_pages, page_size, num_kv_heads, head_dim).
- Ragged batch: qo_indptr (R+1,), kv_page_indptr (R+1,), kv_page_indices (total_pages,),
  kv_last_page_len (R,); kv_len = (num_pages - 1) * page_size + last_page_len; input token i of a
  request with T inputs sits at sequence index kv_len - T + i and by default sees j <= kv_len - T + i.
- Masks: per request None (causal) or T BRLE rows over kv_len entries ("may attend" runs first).
- A query row that may attend nothing outputs zeros.
- Sampling filters: top-k, then top-p over what top-k kept, then min-p (p >= min_p * max p); ties
  at a threshold are kept; uniform draw u = philox4x32-10(key=seed, counter=0) word 0 >> 8, / 2^24.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pie.engine.kv_cache import sequence_length

# ----------------------------------------------------------------------------- attention


def kv_lengths(kv_page_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """(R,) int64 sequence lengths of a ragged batch."""
    num_pages = (kv_page_indptr[1:] - kv_page_indptr[:-1]).long()
    return sequence_length(num_pages, kv_last_page_len.long(), page_size)


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(kv_len, H, D) rows of one request's sequence from a (num_pages, page_size, H, D) cache."""
    return cache[pages.long()].flatten(0, 1)[:kv_len]


def brle_to_dense(rows: Sequence[Sequence[int]], row_len: int) -> torch.Tensor:
    """(len(rows), row_len) bool mask from BRLE rows; raises ValueError if a row is malformed."""
    out = torch.zeros(len(rows), row_len, dtype=torch.bool)
    for r, runs in enumerate(rows):
        pos, attend = 0, True
        for n in runs:
            if n < 0:
                raise ValueError(f"mask row {r}: negative run {n}")
            if attend:
                out[r, pos : pos + n] = True
            pos += n
            attend = not attend
        if pos != row_len:
            raise ValueError(f"mask row {r}: runs sum to {pos}, expected {row_len}")
    return out


def causal_mask(qo_len: int, kv_len: int) -> torch.Tensor:
    """(qo_len, kv_len) bool: input token i sees j <= kv_len - qo_len + i."""
    i = torch.arange(qo_len).unsqueeze(1)
    j = torch.arange(kv_len).unsqueeze(0)
    return j <= kv_len - qo_len + i


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_page_indptr: torch.Tensor,
    kv_page_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    masks: Sequence[Sequence[Sequence[int]] | None] | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of a ragged batch over a paged KV cache; returns q's shape and dtype.

    q: (num_tokens, num_q_heads, head_dim); caches (num_pages, page_size, num_kv_heads, head_dim);
    grouped-query: q head h reads kv head h // (num_q_heads // num_kv_heads). Computed in float32.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    qo = qo_indptr.tolist()
    kp = kv_page_indptr.tolist()
    kv_lens = kv_lengths(kv_page_indptr.cpu(), kv_last_page_len.cpu(), page_size).tolist()
    out = torch.zeros_like(q)
    for r in range(len(qo) - 1):
        t0, t1, kv_len = qo[r], qo[r + 1], kv_lens[r]
        if t1 == t0:
            continue
        pages = kv_page_indices[kp[r] : kp[r + 1]]
        k = gather_kv(k_cache, pages, kv_len).float().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = gather_kv(v_cache, pages, kv_len).float().repeat_interleave(group, dim=1)
        qr = q[t0:t1].float()  # (T, Hq, D)
        if masks is not None and masks[r] is not None:
            allowed = brle_to_dense(masks[r], kv_len)
        else:
            allowed = causal_mask(t1 - t0, kv_len)
        allowed = allowed.to(q.device)
        s = torch.einsum("thd,lhd->htl", qr, k) * scale  # (Hq, T, L)
        s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> zeros
        out[t0:t1] = torch.einsum("htl,lhd->thd", p, v).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- RoPE + KV append


def rope_cos_sin(
    max_pos: int, head_dim: int, theta: float = 10000.0, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pos, head_dim // 2) float32 cos and sin tables of Llama rotate-half RoPE.

    scaling: None, or a Llama-3 `rope_scaling` dict (rope_type "llama3": factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings), applied to the inverse frequencies.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.arange(max_pos, dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (num_tokens, num_heads, head_dim) in float32, rounded to x's dtype."""
    half = x.shape[-1] // 2
    pos = positions.long().clamp(0, cos.shape[0] - 1)
    c = cos[pos].unsqueeze(1)  # (T, 1, D/2)
    s = sin[pos].unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_append_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_slots: torch.Tensor,
) -> torch.Tensor:
    """Rotates q and k; writes k, v to flat slots write_slots of the caches (in place).

    q (T, Hq, D), k and v (T, Hkv, D); slots outside [0, num_pages * page_size) are skipped.
    Returns the rotated q (a new tensor; the kernel rotates q in place).
    """
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = write_slots.long()
    ok = (slots >= 0) & (slots < num_slots)
    kf = k_cache.view(num_slots, *k_cache.shape[2:])
    vf = v_cache.view(num_slots, *v_cache.shape[2:])
    kf[slots[ok]] = apply_rope(k, positions, cos, sin)[ok]
    vf[slots[ok]] = v[ok]
    return apply_rope(q, positions, cos, sin)


# ----------------------------------------------------------------------------- RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm: w * to_dtype(x * rsqrt(mean(x^2) + eps)), statistics in float32."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype first."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


# ----------------------------------------------------------------------------- sampling


def _inv_t(temperature: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """(rows, 1) float32 1/t, with t <= 0 (or no temperature) read as 1."""
    if temperature is None:
        return torch.ones(rows, 1, device=device)
    t = temperature.float().to(device).reshape(rows, 1)
    return torch.where(t > 0, 1.0 / t, torch.ones_like(t))


def softmax(logits: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, vocab) float32 softmax(logits / t)."""
    return torch.softmax(logits.float() * _inv_t(temperature, logits.shape[0], logits.device), dim=-1)


def logsumexp(logits: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """(rows,) float32 logsumexp(logits / t)."""
    return torch.logsumexp(logits.float() * _inv_t(temperature, logits.shape[0], logits.device), dim=-1)


def logprobs(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(n,) float32 log_softmax(logits)[rows[i], token_ids[i]]."""
    return torch.log_softmax(logits.float(), dim=-1)[rows.long(), token_ids.long()]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) int32 index of the largest logit, lowest index on ties."""
    lf = logits.float()
    is_max = lf == lf.max(dim=-1, keepdim=True).values
    idx = torch.arange(lf.shape[-1], device=lf.device).expand_as(lf)
    return torch.where(is_max, idx, lf.shape[-1]).min(dim=-1).values.int()


_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Random123) of a 4-word counter and 2-word key, as Python ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
    return c0, c1, c2, c3


def philox_uniform(seeds: Sequence[int]) -> torch.Tensor:
    """(rows,) float64 uniform draws in [0, 1): philox(counter 0, key = seed) word 0 >> 8, / 2^24."""
    out = []
    for seed in seeds:
        s = int(seed) & 0xFFFFFFFFFFFFFFFF
        w0 = philox4x32_10((0, 0, 0, 0), (s & _MASK32, s >> 32))[0]
        out.append((w0 >> 8) / 16777216.0)
    return torch.tensor(out, dtype=torch.float64)


def _per_row(value, rows: int, dtype, default) -> torch.Tensor:
    if value is None:
        return torch.full((rows,), default, dtype=dtype)
    if isinstance(value, torch.Tensor):
        return value.to("cpu", dtype).reshape(-1).expand(rows) if value.numel() == 1 else value.to("cpu", dtype)
    return torch.full((rows,), value, dtype=dtype)


def filtered_weights(
    logits: torch.Tensor,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
) -> torch.Tensor:
    """(rows, vocab) float64 unnormalised kept weights exp((l - max) / t) after the filters.

    top-k keeps logits >= the k-th largest (0 or >= vocab: off); top-p keeps the largest tokens
    whose mass (over what top-k kept) first reaches top_p, plus ties (>= 1: off); min-p keeps
    weights >= min_p. Rows with t <= 0 are greedy: weight 1 on the argmax alone.
    """
    rows, vocab = logits.shape
    lf = logits.double().cpu()
    t = _per_row(temperature, rows, torch.float64, 1.0)
    k = _per_row(top_k, rows, torch.int64, 0)
    p = _per_row(top_p, rows, torch.float64, 1.0)
    mp = _per_row(min_p, rows, torch.float64, 0.0)
    out = torch.zeros(rows, vocab, dtype=torch.float64)
    greedy = argmax(lf)
    for r in range(rows):
        if not t[r] > 0:
            out[r, greedy[r]] = 1.0
            continue
        row = lf[r]
        w = torch.exp((row - row.max()) / t[r])
        keep = torch.ones(vocab, dtype=torch.bool)
        if 0 < k[r] < vocab:
            kth = torch.topk(row, int(k[r])).values[-1]
            keep &= row >= kth
        if p[r] < 1:
            wk = torch.where(keep, w, torch.zeros_like(w))
            vals, order = torch.sort(row.masked_fill(~keep, float("-inf")), descending=True)
            cum = torch.cumsum(wk[order], 0)
            target = max(float(p[r]), 0.0) * float(wk.sum())
            hit = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=vocab - 1))
            keep &= row >= vals[hit]
        keep &= w >= mp[r]
        out[r] = torch.where(keep, w, torch.zeros_like(w))
    return out


def sample(
    logits: torch.Tensor,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    seeds: Sequence[int] = (),
) -> torch.Tensor:
    """(rows,) int32 draws: the first token whose running kept weight exceeds u * total."""
    w = filtered_weights(logits, temperature, top_k, top_p, min_p)
    u = philox_uniform(seeds)
    cum = torch.cumsum(w, dim=-1)
    target = (u * cum[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(1)
    return idx.clamp(max=logits.shape[1] - 1).int()


def top_k_distribution(
    logits: torch.Tensor, k: int, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((rows, k) int32 ids, (rows, k) float32 probs) of the k most likely tokens, descending,
    lower id first on ties."""
    probs = softmax(logits, temperature)
    # stable sort: (logit descending, id ascending)
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.int(), torch.gather(probs, 1, order)


# ----------------------------------------------------------------------------- test batches


def make_paged_batch(
    qo_lens: Sequence[int],
    kv_lens: Sequence[int],
    page_size: int,
    *,
    spare_pages: int = 3,
    generator: torch.Generator | None = None,
) -> dict:
    """A ragged batch over randomly placed (shuffled, distinct) pages, as CPU int32 tensors.

    Returns dict(qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, num_pages), with
    num_pages = pages used + spare_pages (unused pages, to catch reads outside the sequence).
    """
    if len(qo_lens) != len(kv_lens):
        raise ValueError("qo_lens and kv_lens differ in length")
    pages_per = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per) + spare_pages
    perm = torch.randperm(num_pages, generator=generator)
    qo_indptr = torch.zeros(len(qo_lens) + 1, dtype=torch.int32)
    qo_indptr[1:] = torch.cumsum(torch.tensor(qo_lens, dtype=torch.int64), 0)
    kv_page_indptr = torch.zeros(len(kv_lens) + 1, dtype=torch.int32)
    kv_page_indptr[1:] = torch.cumsum(torch.tensor(pages_per, dtype=torch.int64), 0)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(kv_lens, pages_per)], dtype=torch.int32)
    return dict(
        qo_indptr=qo_indptr,
        kv_page_indptr=kv_page_indptr,
        kv_page_indices=perm[: sum(pages_per)].int(),
        kv_last_page_len=last,
        num_pages=num_pages,
    )


def random_brle_rows(qo_len: int, kv_len: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """qo_len random BRLE rows over kv_len entries (runs of 0..8, first run may be 0)."""
    rows = []
    for _ in range(qo_len):
        runs, left = [], kv_len
        while left > 0:
            n = min(left, int(torch.randint(0, 9, (1,), generator=generator)))
            runs.append(n)
            left -= n
        rows.append(runs)
    return rows
