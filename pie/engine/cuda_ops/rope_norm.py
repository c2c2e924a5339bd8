"""RoPE fused with the paged-KV append, and RMSNorm (csrc/kernels/cuda/rope_norm.cu)."""

from __future__ import annotations

import torch

from pie.engine.cuda_ops._lib import ATTN_DTYPES, check, dtype_code, expect, lib, stream


def _heads_view(t: torch.Tensor, name: str, num_tokens: int | None, head_dim: int | None):
    """Checks a (T, H, D) tensor whose heads are contiguous; returns its token stride."""
    expect(t, name, shape=(num_tokens, None, head_dim), contiguous=False)
    if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        raise ValueError(f"{name}: each token's (heads, head_dim) block must be contiguous")
    return t.stride(0)


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
    """Rotate q (in place) and k with rotate-half RoPE; write k and v into the paged cache.

    Parameters
    ----------
    q : (T, num_q_heads, head_dim) fp16/bf16; token rows may be strided (views of a fused QKV)
    k, v : (T, num_kv_heads, head_dim), q's dtype, token rows may be strided
    positions : (T,) int32 RoPE positions (clamped to the table)
    cos, sin : (max_pos, head_dim // 2) float32 tables (`reference.rope_cos_sin`)
    k_cache, v_cache : (num_pages, page_size, num_kv_heads, head_dim), contiguous
    write_slots : (T,) int64 flat slots page * page_size + offset (out-of-range slots skipped)

    Returns
    -------
    q, rotated in place.

    Example
    -------
    >>> q = rope_append_kv(q, k, v, pos, cos, sin, k_cache, v_cache, slots)  # doctest: +SKIP
    """
    kernels = lib()
    num_tokens, num_q_heads, head_dim = q.shape
    dtype = dtype_code(q, "q", ATTN_DTYPES)
    q_stride = _heads_view(q, "q", None, None)
    k_stride = _heads_view(k, "k", num_tokens, head_dim)
    v_stride = _heads_view(v, "v", num_tokens, head_dim)
    num_kv_heads = k.shape[1]
    expect(v, "v", shape=(num_tokens, num_kv_heads, head_dim), dtype=q.dtype, device=q.device, contiguous=False)
    expect(k, "k", dtype=q.dtype, device=q.device, contiguous=False)
    expect(positions, "positions", shape=(num_tokens,), dtype=torch.int32, device=q.device)
    expect(cos, "cos", shape=(None, head_dim // 2), dtype=torch.float32, device=q.device)
    expect(sin, "sin", shape=tuple(cos.shape), dtype=torch.float32, device=q.device)
    expect(k_cache, "k_cache", shape=(None, None, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
    expect(v_cache, "v_cache", shape=tuple(k_cache.shape), dtype=q.dtype, device=q.device)
    expect(write_slots, "write_slots", shape=(num_tokens,), dtype=torch.int64, device=q.device)
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even")
    check(
        kernels.rope_append_kv(
            dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), write_slots.data_ptr(), num_tokens,
            num_q_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride, cos.shape[0],
            k_cache.shape[0] * k_cache.shape[1], stream(q.device),
        ),
        "rope_append_kv",
    )
    return q


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm with HF Llama rounding: w * to_dtype(x * rsqrt(mean(x^2) + eps)).

    Parameters
    ----------
    x : (rows, hidden) fp16/bf16, unit stride along hidden (rows may be strided)
    weight : (hidden,) x's dtype
    eps : float
    out : optional (rows, hidden) buffer (may be x)

    Example
    -------
    >>> y = rms_norm(x, w, 1e-5)  # doctest: +SKIP
    """
    kernels = lib()
    expect(x, "x", shape=(None, None), contiguous=False)
    if x.stride(1) != 1:
        raise ValueError("x: the hidden dimension must have unit stride")
    dtype = dtype_code(x, "x", ATTN_DTYPES)
    rows, hidden = x.shape
    expect(weight, "weight", shape=(hidden,), dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    else:
        expect(out, "out", shape=(rows, hidden), dtype=x.dtype, device=x.device, contiguous=False)
        if out.stride(1) != 1:
            raise ValueError("out: the hidden dimension must have unit stride")
    check(
        kernels.rms_norm(dtype, x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, hidden, x.stride(0),
                         out.stride(0), float(eps), stream(x.device)),
        "rms_norm",
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- to_dtype(x + residual); x <- rms_norm(residual). Returns (x, residual).

    x, residual : (rows, hidden) fp16/bf16, contiguous; weight (hidden,).

    Example
    -------
    >>> h, res = fused_add_rms_norm(h, res, w, 1e-5)  # doctest: +SKIP
    """
    kernels = lib()
    expect(x, "x", shape=(None, None))
    dtype = dtype_code(x, "x", ATTN_DTYPES)
    rows, hidden = x.shape
    expect(residual, "residual", shape=(rows, hidden), dtype=x.dtype, device=x.device)
    expect(weight, "weight", shape=(hidden,), dtype=x.dtype, device=x.device)
    check(
        kernels.fused_add_rms_norm(dtype, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, hidden,
                                   float(eps), stream(x.device)),
        "fused_add_rms_norm",
    )
    return x, residual
