"""Softmax, log-sum-exp, log-probabilities, argmax, filtered sampling and top-k distributions over
logits rows (csrc/kernels/cuda/sampling.cu)."""

from __future__ import annotations

import torch

from pie.engine.cuda_ops._lib import LOGIT_DTYPES, check, dtype_code, expect, lib, ptr, stream

MAX_TOP_K_DISTRIBUTION = 1024


def _logits(logits: torch.Tensor) -> tuple[int, int, int]:
    """(dtype code, rows, vocab) of a checked (rows, vocab) logits tensor."""
    expect(logits, "logits", shape=(None, None))
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: empty vocab")
    return dtype_code(logits, "logits", LOGIT_DTYPES), rows, vocab


def _per_row(value, rows: int, dtype: torch.dtype, device, name: str) -> torch.Tensor | None:
    """None -> None; a number -> (rows,) filled; a tensor -> (rows,) of dtype on device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype).reshape(-1)
        if t.numel() == 1:
            return t.expand(rows).contiguous()
        if t.numel() != rows:
            raise ValueError(f"{name}: {t.numel()} values for {rows} rows")
        return t.contiguous()
    return torch.full((rows,), value, dtype=dtype, device=device)


def softmax(logits: torch.Tensor, temperature=None) -> torch.Tensor:
    """(rows, vocab) float32 softmax(logits / t); t per row or scalar, t <= 0 read as 1.

    Example
    -------
    >>> probs = softmax(logits, 0.7)  # doctest: +SKIP
    """
    kernels = lib()
    dtype, rows, vocab = _logits(logits)
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    probs = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    check(kernels.softmax(dtype, logits.data_ptr(), ptr(t), probs.data_ptr(), rows, vocab, stream(logits.device)),
          "softmax")
    return probs


def logsumexp(logits: torch.Tensor, temperature=None) -> torch.Tensor:
    """(rows,) float32 logsumexp(logits / t)."""
    kernels = lib()
    dtype, rows, vocab = _logits(logits)
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    check(kernels.logsumexp(dtype, logits.data_ptr(), ptr(t), lse.data_ptr(), rows, vocab, stream(logits.device)),
          "logsumexp")
    return lse


def logprobs(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(n,) float32 log_softmax(logits)[rows[i], token_ids[i]] (ids outside the vocab: -inf).

    rows, token_ids : (n,) int32 on the logits' device.

    Example
    -------
    >>> lp = logprobs(logits, rows, ids)  # doctest: +SKIP
    """
    kernels = lib()
    dtype, num_rows, vocab = _logits(logits)
    n = rows.numel()
    expect(rows, "rows", shape=(n,), dtype=torch.int32, device=logits.device)
    expect(token_ids, "token_ids", shape=(n,), dtype=torch.int32, device=logits.device)
    lse = logsumexp(logits)
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    check(
        kernels.gather_logprobs(dtype, logits.data_ptr(), lse.data_ptr(), rows.data_ptr(), token_ids.data_ptr(), n,
                                vocab, out.data_ptr(), stream(logits.device)),
        "gather_logprobs",
    )
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) int32 index of each row's largest logit (lowest index on ties)."""
    kernels = lib()
    dtype, rows, vocab = _logits(logits)
    out = torch.empty(rows, dtype=torch.int32, device=logits.device)
    check(kernels.argmax(dtype, logits.data_ptr(), out.data_ptr(), rows, vocab, stream(logits.device)), "argmax")
    return out


def sample(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    seeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from softmax(logits / t) filtered by top-k, then top-p, then min-p.

    Parameters
    ----------
    logits : (rows, vocab) float32, fp16 or bf16
    temperature : scalar or (rows,); rows with t <= 0 take the argmax
    top_k : scalar or (rows,) int; 0 or >= vocab: off. Ties with the k-th logit are kept.
    top_p : scalar or (rows,) float in [0, 1]; 1: off. Applied to what top-k kept.
    min_p : scalar or (rows,) float; keeps p >= min_p * max p; 0: off.
    seeds : (rows,) int64 (read as uint64); a row's draw depends only on its seed and logits.
        None: fresh seeds from `generator` (torch's default CPU generator if None).

    Returns
    -------
    (rows,) int32 token ids.

    Example
    -------
    >>> ids = sample(logits, 0.8, top_p=0.95, seeds=seeds)  # doctest: +SKIP
    """
    kernels = lib()
    dtype, rows, vocab = _logits(logits)
    dev = logits.device
    t = _per_row(temperature, rows, torch.float32, dev, "temperature")
    k = _per_row(top_k, rows, torch.int32, dev, "top_k")
    p = _per_row(top_p, rows, torch.float32, dev, "top_p")
    mp = _per_row(min_p, rows, torch.float32, dev, "min_p")
    if seeds is None:
        seeds = torch.randint(-(2**63), 2**63 - 1, (rows,), dtype=torch.int64, generator=generator)
    s = _per_row(seeds, rows, torch.int64, dev, "seeds")
    out = torch.empty(rows, dtype=torch.int32, device=dev)
    check(
        kernels.sample(dtype, logits.data_ptr(), ptr(t), ptr(k), ptr(p), ptr(mp), s.data_ptr(), out.data_ptr(),
                       rows, vocab, stream(logits.device)),
        "sample",
    )
    return out


def top_k_distribution(logits: torch.Tensor, k: int, temperature=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens per row and their probabilities under softmax(logits / t).

    Returns ((rows, k) int32 ids, (rows, k) float32 probs), probabilities descending, lower id first
    on ties. 1 <= k <= min(vocab, 1024).

    Example
    -------
    >>> ids, probs = top_k_distribution(logits, 20)  # doctest: +SKIP
    """
    kernels = lib()
    dtype, rows, vocab = _logits(logits)
    if not 1 <= k <= min(vocab, MAX_TOP_K_DISTRIBUTION):
        raise ValueError(f"k {k} outside 1..{min(vocab, MAX_TOP_K_DISTRIBUTION)}")
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    ids = torch.empty(rows, k, dtype=torch.int32, device=logits.device)
    probs = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    check(
        kernels.top_k_distribution(dtype, logits.data_ptr(), ptr(t), k, ids.data_ptr(), probs.data_ptr(), rows,
                                   vocab, stream(logits.device)),
        "top_k_distribution",
    )
    return ids, probs
