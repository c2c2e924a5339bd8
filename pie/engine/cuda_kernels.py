"""CUDA kernels of the inference layer: paged attention, RoPE + KV append, RMSNorm, sampling.

The Python face of the compiled module `pie._ext._kernels_cuda` (csrc/kernels/cuda/): each function
validates shapes, dtypes and devices, allocates its outputs, and calls the kernel on the current
CUDA stream. `pie.engine.cuda_reference` holds a PyTorch reference of every op with the same
semantics; the tests in tests/cuda/ compare the two.

Attention follows flashinfer's "plan once per batch, run once per layer": `plan_attention` takes the
ragged batch description on the CPU, splits it into decode requests (one input token) and prefill
work tiles, expands custom masks to bits on the device, and allocates the split-KV workspace;
`paged_attention` then runs each layer with that plan.

Example
-------
>>> from pie.engine import cuda_kernels as ck
>>> plan = ck.plan_attention([0, 5, 6], [0, 2, 3], [4, 7, 1], [3, 9], page_size=16,
...                          num_q_heads=32, num_kv_heads=8, head_dim=64)  # doctest: +SKIP
>>> out = ck.paged_attention(q, k_cache, v_cache, plan)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

try:
    from pie._ext import _kernels_cuda as _C

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not built (no CUDA toolkit at build time) or not loadable here
    _C = None
    _IMPORT_ERROR = e

__all__ = [
    "CudaKernelsUnavailable",
    "available",
    "unavailable_reason",
    "AttentionPlan",
    "decode_split",
    "plan_attention",
    "paged_attention",
    "rope_append_kv",
    "rms_norm",
    "fused_add_rms_norm",
    "softmax",
    "logsumexp",
    "logprobs",
    "argmax",
    "sample",
    "top_k_distribution",
]

PREFILL_TILE = 128  # query rows per prefill CTA (kBlockM in attention.cu)
MAX_TOP_K_DISTRIBUTION = 1024


class CudaKernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run here (module not built, or no CUDA device)."""


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    if _C is None:
        return (
            f"CUDA kernels unavailable: {_IMPORT_ERROR} (build them with a CUDA toolkit: "
            "PIE_CUDA=1 pip install . or scripts/dev_build.sh with PIE_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "CUDA kernels unavailable: no CUDA device visible to torch"
    return None


def available() -> bool:
    """True when the module is built and a CUDA device is visible."""
    return unavailable_reason() is None


def _lib():
    if _C is None:
        raise CudaKernelsUnavailable(unavailable_reason())
    return _C


def _check(code: int, op: str) -> None:
    if code != 0:
        raise RuntimeError(f"{op}: CUDA kernel error {code}: {_lib().error_string(code)}")


def _stream(device: torch.device) -> int:
    """The current stream of `device`, which must be the current device (kernels launch there)."""
    current = torch.cuda.current_device()
    if device.index is not None and device.index != current:
        raise ValueError(
            f"tensors are on {device} but the current CUDA device is cuda:{current}; "
            f"call inside `with torch.cuda.device({device.index}):`"
        )
    return torch.cuda.current_stream(device).cuda_stream


def _aligned16(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.data_ptr() % 16:
            raise ValueError("attention and cache tensors must start on a 16-byte boundary (vectorised access)")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_ATTN_DTYPES = {torch.float16: 1, torch.bfloat16: 2}
_LOGIT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dtype_code(t: torch.Tensor, name: str, table: dict) -> int:
    if t.dtype not in table:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (expected one of {list(table)})")
    return table[t.dtype]


def _expect(
    t: torch.Tensor,
    name: str,
    *,
    shape: tuple | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def _cpu_i64(x) -> torch.Tensor:
    return torch.as_tensor(x).to("cpu", torch.int64).reshape(-1)


# ----------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionPlan:
    """One batch's attention schedule, built once and used by every layer.

    Device tensors are int32. Decode requests (one input token) run the split-KV decode kernel over
    `num_chunks` chunks of `chunk_tokens`; the others run as `num_work` prefill tiles of PREFILL_TILE rows.
    """

    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    num_requests: int
    qo_indptr: torch.Tensor  # (R+1,)
    kv_page_indptr: torch.Tensor  # (R+1,)
    kv_page_indices: torch.Tensor  # (total_pages,)
    kv_last_page_len: torch.Tensor  # (R,)
    work_req: torch.Tensor  # (num_work,) request of each prefill tile
    work_tile: torch.Tensor  # (num_work,) tile index (rows [PREFILL_TILE * tile, +PREFILL_TILE)) of the request
    decode_req: torch.Tensor  # (num_decode,)
    num_chunks: int
    chunk_tokens: int
    part_o: torch.Tensor | None  # (num_chunks, num_decode, num_q_heads, head_dim) fp32 when num_chunks > 1
    part_lse: torch.Tensor | None  # (num_chunks, num_decode, num_q_heads) fp32
    mask: torch.Tensor | None  # (total_words,) int32 bit rows, or None (causal)
    mask_indptr: torch.Tensor | None  # (R+1,) word offset of each request's rows

    @property
    def num_work(self) -> int:
        return int(self.work_req.numel())

    @property
    def num_decode(self) -> int:
        return int(self.decode_req.numel())


def _mask_runs(
    masks: Sequence[Sequence[Sequence[int]] | None], qo_lens: list[int], kv_lens: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Flatten per-request BRLE rows (None -> causal rows) into runs, run offsets, row lengths."""
    runs: list[int] = []
    offsets = [0]
    row_len: list[int] = []
    for r, (rows, qo_len, kv_len) in enumerate(zip(masks, qo_lens, kv_lens)):
        if rows is None:
            rows = [[kv_len - qo_len + i + 1, qo_len - i - 1] for i in range(qo_len)]
        if len(rows) != qo_len:
            raise ValueError(f"request {r}: mask: {len(rows)} rows, expected {qo_len} (one per input token)")
        for i, row in enumerate(rows):
            if any(n < 0 for n in row):
                raise ValueError(f"request {r}: mask row {i}: negative run")
            if sum(row) != kv_len:
                raise ValueError(f"request {r}: mask row {i}: runs sum to {sum(row)}, expected kv_len {kv_len}")
            runs.extend(int(n) for n in row)
            offsets.append(len(runs))
            row_len.append(kv_len)
    return runs, offsets, row_len


def decode_split(num_decode: int, max_kv: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 num_sms: int) -> tuple[int, int]:
    """(num_chunks, chunk_tokens) of the split-KV decode kernel for `num_decode` requests whose
    longest sequence is `max_kv` tokens: about two waves of CTAs, chunks of >= 128 tokens, each a
    whole number of CTA iterations. plan_attention's automatic choice."""
    head_groups = -(-(num_q_heads // num_kv_heads) // 4)
    base_ctas = num_decode * num_kv_heads * head_groups
    step = 32 if head_dim == 128 else 64  # tokens per CTA iteration (slots x unroll)
    want = max(1, -(-2 * num_sms // base_ctas))  # about two waves of CTAs
    num_chunks = max(1, min(want, -(-max_kv // 128)))  # chunks of >= 128 tokens
    chunk_tokens = -(-max_kv // num_chunks)
    chunk_tokens = -(-chunk_tokens // step) * step
    return -(-max_kv // chunk_tokens), chunk_tokens


def plan_attention(
    qo_indptr,
    kv_page_indptr,
    kv_page_indices,
    kv_last_page_len,
    *,
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    masks: Sequence[Sequence[Sequence[int]] | None] | None = None,
    device: torch.device | str | None = None,
    use_decode_kernel: bool = True,
    num_sms: int | None = None,
    split: tuple[int, int] | None = None,
    page_capacity: int | None = None,
    reuse: AttentionPlan | None = None,
    exclude: Sequence[int] | None = None,
) -> AttentionPlan:
    """Plan one ragged batch's attention; the index arrays are CPU lists/arrays/tensors.

    Parameters
    ----------
    qo_indptr : (R+1,) ints
        Request r's input tokens are rows qo_indptr[r]:qo_indptr[r+1] of q.
    kv_page_indptr, kv_page_indices : (R+1,), (total_pages,) ints
        Request r's KV pages, in sequence order.
    kv_last_page_len : (R,) ints in 1..page_size
        Tokens in each request's last page (after this pass's writes).
    page_size, num_q_heads, num_kv_heads, head_dim : int
        Cache geometry; head_dim 64 or 128, num_q_heads a multiple of num_kv_heads.
    masks : per request None (causal) or qo_len BRLE rows over kv_len, optional
        None for all causal. Rows alternate "may attend"/"hidden" runs, starting with "may attend".
    device : the CUDA device (default: current). "cpu" builds the schedule alone (for tests; no
        masks, num_sms required).
    use_decode_kernel : run one-token requests with the split-KV decode kernel (default True).
    num_sms : multiprocessor count used to size the split-KV chunks (default: the device's).
    split : (num_chunks, chunk_tokens) for the decode kernel instead of the automatic choice; must
        cover the longest decode sequence (empty chunks cost a CTA launch each, nothing else).
    page_capacity : allocate kv_page_indices for this many pages (for later `reuse`).
    reuse : a plan whose device tensors are overwritten in place with this batch (same number of
        requests, decode requests and prefill tiles, same split, no masks, pages within capacity)
        and returned. For CUDA graphs: plan once with a fixed `split` and `page_capacity`, capture
        `paged_attention` with that plan, then before each replay re-plan with `reuse=plan`.
    exclude : request indices the kernels skip: no decode work, no prefill tiles, their rows of
        `out` left as they were. For callers that attend those requests themselves (CudaForward runs
        fresh causal prefill through torch SDPA).

    Returns
    -------
    AttentionPlan
    """
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim {head_dim} not supported (64 or 128)")
    if num_q_heads <= 0 or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} must be a positive multiple of num_kv_heads {num_kv_heads}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    qo = _cpu_i64(qo_indptr)
    kp = _cpu_i64(kv_page_indptr)
    ki = _cpu_i64(kv_page_indices)
    kl = _cpu_i64(kv_last_page_len)
    num_requests = qo.numel() - 1
    if num_requests < 0 or kp.numel() != num_requests + 1 or kl.numel() != num_requests:
        raise ValueError(
            f"qo_indptr ({qo.numel()}), kv_page_indptr ({kp.numel()}) and kv_last_page_len ({kl.numel()}) "
            "must describe the same number of requests (R+1, R+1, R)"
        )
    qo_lens_t = qo[1:] - qo[:-1]
    pages_t = kp[1:] - kp[:-1]
    if num_requests and (qo[0] != 0 or kp[0] != 0):
        raise ValueError("qo_indptr and kv_page_indptr must start at 0")
    if (qo_lens_t < 0).any() or (pages_t < 1).any():
        bad = int(torch.nonzero((qo_lens_t < 0) | (pages_t < 1))[0])
        raise ValueError(f"request {bad}: needs >= 0 input tokens and >= 1 KV page")
    if ((kl < 1) | (kl > page_size)).any():
        bad = int(torch.nonzero((kl < 1) | (kl > page_size))[0])
        raise ValueError(f"request {bad}: kv_last_page_len {int(kl[bad])} outside 1..{page_size}")
    if kp.numel() and int(kp[-1]) > ki.numel():
        raise ValueError(f"kv_page_indptr ends at {int(kp[-1])} but kv_page_indices has {ki.numel()} entries")
    kv_lens_t = (pages_t - 1) * page_size + kl
    if (kv_lens_t < qo_lens_t).any():
        bad = int(torch.nonzero(kv_lens_t < qo_lens_t)[0])
        raise ValueError(f"request {bad}: {int(qo_lens_t[bad])} input tokens but kv_len {int(kv_lens_t[bad])}")
    qo_lens, kv_lens = qo_lens_t.tolist(), kv_lens_t.tolist()
    num_tokens = int(qo[-1]) if num_requests else 0

    # Masks -> bit rows on the device (any custom mask: every request gets rows, causal ones synthesized).
    mask = mask_indptr = None
    if masks is not None and any(m is not None for m in masks):
        if dev.type != "cuda":
            raise ValueError("masks are expanded on the device: plan on a CUDA device")
        if len(masks) != num_requests:
            raise ValueError(f"masks: {len(masks)} entries, expected one per request ({num_requests})")
        runs, run_offsets, row_len = _mask_runs(masks, qo_lens, kv_lens)
        words = [(n + 31) // 32 for n in kv_lens]
        req_words = [q_len * w for q_len, w in zip(qo_lens, words)]
        mask_indptr_cpu = torch.zeros(num_requests + 1, dtype=torch.int64)
        mask_indptr_cpu[1:] = torch.cumsum(torch.tensor(req_words, dtype=torch.int64), 0)
        total_words = int(mask_indptr_cpu[-1])
        if total_words >= 2**31:
            raise ValueError(f"masks need {total_words} words, more than int32 offsets address")
        row_word_offset = torch.cat(
            [mask_indptr_cpu[r] + torch.arange(qo_lens[r]) * words[r] for r in range(num_requests)]
        ) if num_tokens else torch.zeros(0, dtype=torch.int64)
        mask = torch.empty(max(total_words, 1), dtype=torch.int32, device=dev)
        mask_indptr = mask_indptr_cpu.to(dev, torch.int32)
        # Every device input is bound to a name until the launch: a temporary freed before it would
        # hand its block to the next allocation, and the kernel would read that tensor instead.
        runs_d = torch.tensor(runs if runs else [0], dtype=torch.int32, device=dev)
        run_offsets_d = torch.tensor(run_offsets, dtype=torch.int64, device=dev)
        row_len_d = torch.tensor(row_len if row_len else [0], dtype=torch.int32, device=dev)
        row_word_offset_d = row_word_offset.to(dev, torch.int32)
        with torch.cuda.device(dev):
            _check(
                _lib().expand_brle_bits(
                    runs_d.data_ptr(),
                    run_offsets_d.data_ptr(),
                    len(row_len),
                    row_len_d.data_ptr(),
                    row_word_offset_d.data_ptr() if num_tokens else 0,
                    mask.data_ptr(),
                    0,
                    _stream(dev),
                ),
                "expand_brle_bits",
            )

    # Split: one-token requests -> decode kernel; the rest -> PREFILL_TILE-row tiles, heaviest first.
    active = torch.ones(num_requests, dtype=torch.bool)
    if exclude is not None and len(exclude):
        skipped = _cpu_i64(exclude)
        if ((skipped < 0) | (skipped >= num_requests)).any():
            raise ValueError(f"exclude: request indices must be in 0..{num_requests - 1}, got {skipped.tolist()}")
        active[skipped] = False
    is_decode = ((qo_lens_t == 1) if use_decode_kernel else torch.zeros(num_requests, dtype=torch.bool)) & active
    decode_req = torch.nonzero(is_decode).reshape(-1)
    prefill_req = torch.nonzero(~is_decode & (qo_lens_t > 0) & active).reshape(-1)
    tiles = (qo_lens_t[prefill_req] + PREFILL_TILE - 1) // PREFILL_TILE
    work_req = torch.repeat_interleave(prefill_req, tiles)
    first = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles)
    work_tile = torch.arange(work_req.numel()) - first
    if work_req.numel():
        # KV tokens each tile reads (causal bound; masks read the whole sequence)
        rows_end = torch.minimum(qo_lens_t[work_req], (work_tile + 1) * PREFILL_TILE)
        cost = kv_lens_t[work_req] - qo_lens_t[work_req] + rows_end if mask is None else kv_lens_t[work_req]
        order = torch.argsort(cost, descending=True, stable=True)
        work_req, work_tile = work_req[order], work_tile[order]

    num_chunks, chunk_tokens = 1, 1
    part_o = part_lse = None
    num_decode = decode_req.numel()
    if num_decode:
        max_kv = int(kv_lens_t[decode_req].max())
        if split is not None:
            num_chunks, chunk_tokens = int(split[0]), int(split[1])
            if num_chunks < 1 or chunk_tokens < 1 or num_chunks * chunk_tokens < max_kv:
                raise ValueError(f"split {split} does not cover the longest decode sequence ({max_kv} tokens)")
        else:
            if num_sms is None:
                if dev.type != "cuda":
                    raise ValueError("num_sms is required when planning for a non-CUDA device")
                num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
            num_chunks, chunk_tokens = decode_split(num_decode, max_kv, num_q_heads, num_kv_heads, head_dim, num_sms)

    if reuse is not None:
        return _refill(reuse, qo, kp, ki, kl, work_req, work_tile, decode_req, num_chunks, chunk_tokens,
                       num_tokens, mask is not None)
    if num_decode and num_chunks > 1:
        part_o = torch.empty(num_chunks, num_decode, num_q_heads, head_dim, dtype=torch.float32, device=dev)
        part_lse = torch.empty(num_chunks, num_decode, num_q_heads, dtype=torch.float32, device=dev)

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, torch.int32)

    pages = to_dev(ki if ki.numel() else torch.zeros(1, dtype=torch.int64))
    if page_capacity is not None and page_capacity > pages.numel():
        pages = torch.cat([pages, torch.zeros(page_capacity - pages.numel(), dtype=torch.int32, device=dev)])
    return AttentionPlan(
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_tokens=num_tokens,
        num_requests=num_requests,
        qo_indptr=to_dev(qo),
        kv_page_indptr=to_dev(kp),
        kv_page_indices=pages,
        kv_last_page_len=to_dev(kl),
        work_req=to_dev(work_req),
        work_tile=to_dev(work_tile),
        decode_req=to_dev(decode_req),
        num_chunks=num_chunks,
        chunk_tokens=chunk_tokens,
        part_o=part_o,
        part_lse=part_lse,
        mask=mask,
        mask_indptr=mask_indptr,
    )


def _refill(plan: AttentionPlan, qo, kp, ki, kl, work_req, work_tile, decode_req, num_chunks: int,
            chunk_tokens: int, num_tokens: int, has_mask: bool) -> AttentionPlan:
    """Overwrite `plan`'s device tensors with a new batch of the same shape (see plan_attention)."""
    checks = [
        ("masks", has_mask or plan.mask is not None, False),
        ("num_tokens", num_tokens, plan.num_tokens),
        ("num_requests", qo.numel() - 1, plan.num_requests),
        ("decode requests", decode_req.numel(), plan.num_decode),
        ("prefill tiles", work_req.numel(), plan.num_work),
        ("split", (num_chunks, chunk_tokens) if decode_req.numel() else None,
         (plan.num_chunks, plan.chunk_tokens) if plan.num_decode else None),
    ]
    for what, got, want in checks:
        if got != want:
            raise ValueError(f"plan cannot be reused: {what} {got} != {want} (plan anew, or pass `split`)")
    if ki.numel() > plan.kv_page_indices.numel():
        raise ValueError(
            f"plan cannot be reused: {ki.numel()} pages > capacity {plan.kv_page_indices.numel()} (page_capacity)"
        )
    for dst, src in ((plan.qo_indptr, qo), (plan.kv_page_indptr, kp), (plan.kv_last_page_len, kl),
                     (plan.work_req, work_req), (plan.work_tile, work_tile), (plan.decode_req, decode_req)):
        dst.copy_(src.to(torch.int32))
    if ki.numel():
        plan.kv_page_indices[: ki.numel()].copy_(ki.to(torch.int32))
    return plan


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a planned ragged batch over one layer's paged KV cache.

    Parameters
    ----------
    q : (num_tokens, num_q_heads, head_dim) fp16 or bf16, contiguous
    k_cache, v_cache : (num_pages, page_size, num_kv_heads, head_dim), q's dtype, contiguous
    plan : from `plan_attention` on the same batch
    sm_scale : softmax scale, default 1 / sqrt(head_dim)
    out : optional output buffer shaped like q

    Returns
    -------
    (num_tokens, num_q_heads, head_dim) tensor, q's dtype. Rows that may attend nothing are zero.

    Example
    -------
    >>> out = paged_attention(q, k_cache, v_cache, plan)  # doctest: +SKIP
    """
    lib = _lib()
    p = plan
    _expect(q, "q", shape=(p.num_tokens, p.num_q_heads, p.head_dim))
    dtype = _dtype_code(q, "q", _ATTN_DTYPES)
    cache_shape = (None, p.page_size, p.num_kv_heads, p.head_dim)
    _expect(k_cache, "k_cache", shape=cache_shape, dtype=q.dtype, device=q.device)
    _expect(v_cache, "v_cache", shape=tuple(k_cache.shape), dtype=q.dtype, device=q.device)
    if p.qo_indptr.device != q.device:
        raise ValueError(f"plan is on {p.qo_indptr.device}, q on {q.device}")
    if out is None:
        out = torch.empty_like(q)
    else:
        _expect(out, "out", shape=tuple(q.shape), dtype=q.dtype, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(p.head_dim)
    _aligned16(q, out, k_cache, v_cache)
    stream = _stream(q.device)
    common = (p.qo_indptr.data_ptr(), p.kv_page_indptr.data_ptr(), p.kv_page_indices.data_ptr(),
              p.kv_last_page_len.data_ptr())
    if p.num_decode:
        _check(
            lib.paged_decode_attention(
                dtype, q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *common,
                p.decode_req.data_ptr(), p.num_decode, p.num_chunks, p.chunk_tokens,
                _ptr(p.part_o), _ptr(p.part_lse), _ptr(p.mask), _ptr(p.mask_indptr), p.page_size,
                p.num_q_heads, p.num_kv_heads, p.head_dim, scale, stream,
            ),
            "paged_decode_attention",
        )
    if p.num_work:
        _check(
            lib.paged_prefill_attention(
                dtype, q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *common,
                p.work_req.data_ptr(), p.work_tile.data_ptr(), p.num_work, _ptr(p.mask),
                _ptr(p.mask_indptr), p.page_size, p.num_q_heads, p.num_kv_heads, p.head_dim, scale, stream,
            ),
            "paged_prefill_attention",
        )
    return out


# ----------------------------------------------------------------------------- RoPE + KV append


def _heads_view(t: torch.Tensor, name: str, num_tokens: int | None, head_dim: int | None):
    """Checks a (T, H, D) tensor whose heads are contiguous; returns its token stride."""
    _expect(t, name, shape=(num_tokens, None, head_dim), contiguous=False)
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
    cos, sin : (max_pos, head_dim // 2) float32 tables (`cuda_reference.rope_cos_sin`)
    k_cache, v_cache : (num_pages, page_size, num_kv_heads, head_dim), contiguous
    write_slots : (T,) int64 flat slots page * page_size + offset (out-of-range slots skipped)

    Returns
    -------
    q, rotated in place.

    Example
    -------
    >>> q = rope_append_kv(q, k, v, pos, cos, sin, k_cache, v_cache, slots)  # doctest: +SKIP
    """
    lib = _lib()
    num_tokens, num_q_heads, head_dim = q.shape
    dtype = _dtype_code(q, "q", _ATTN_DTYPES)
    q_stride = _heads_view(q, "q", None, None)
    k_stride = _heads_view(k, "k", num_tokens, head_dim)
    v_stride = _heads_view(v, "v", num_tokens, head_dim)
    num_kv_heads = k.shape[1]
    _expect(v, "v", shape=(num_tokens, num_kv_heads, head_dim), dtype=q.dtype, device=q.device, contiguous=False)
    _expect(k, "k", dtype=q.dtype, device=q.device, contiguous=False)
    _expect(positions, "positions", shape=(num_tokens,), dtype=torch.int32, device=q.device)
    _expect(cos, "cos", shape=(None, head_dim // 2), dtype=torch.float32, device=q.device)
    _expect(sin, "sin", shape=tuple(cos.shape), dtype=torch.float32, device=q.device)
    _expect(k_cache, "k_cache", shape=(None, None, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
    _expect(v_cache, "v_cache", shape=tuple(k_cache.shape), dtype=q.dtype, device=q.device)
    _expect(write_slots, "write_slots", shape=(num_tokens,), dtype=torch.int64, device=q.device)
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even")
    _check(
        lib.rope_append_kv(
            dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), write_slots.data_ptr(), num_tokens,
            num_q_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride, cos.shape[0],
            k_cache.shape[0] * k_cache.shape[1], _stream(q.device),
        ),
        "rope_append_kv",
    )
    return q


# ----------------------------------------------------------------------------- RMSNorm


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
    lib = _lib()
    _expect(x, "x", shape=(None, None), contiguous=False)
    if x.stride(1) != 1:
        raise ValueError("x: the hidden dimension must have unit stride")
    dtype = _dtype_code(x, "x", _ATTN_DTYPES)
    rows, hidden = x.shape
    _expect(weight, "weight", shape=(hidden,), dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    else:
        _expect(out, "out", shape=(rows, hidden), dtype=x.dtype, device=x.device, contiguous=False)
        if out.stride(1) != 1:
            raise ValueError("out: the hidden dimension must have unit stride")
    _check(
        lib.rms_norm(dtype, x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, hidden, x.stride(0),
                     out.stride(0), float(eps), _stream(x.device)),
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
    lib = _lib()
    _expect(x, "x", shape=(None, None))
    dtype = _dtype_code(x, "x", _ATTN_DTYPES)
    rows, hidden = x.shape
    _expect(residual, "residual", shape=(rows, hidden), dtype=x.dtype, device=x.device)
    _expect(weight, "weight", shape=(hidden,), dtype=x.dtype, device=x.device)
    _check(
        lib.fused_add_rms_norm(dtype, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, hidden,
                               float(eps), _stream(x.device)),
        "fused_add_rms_norm",
    )
    return x, residual


# ----------------------------------------------------------------------------- sampling


def _logits(logits: torch.Tensor) -> tuple[int, int, int]:
    _expect(logits, "logits", shape=(None, None))
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: empty vocab")
    return _dtype_code(logits, "logits", _LOGIT_DTYPES), rows, vocab


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
    lib = _lib()
    dtype, rows, vocab = _logits(logits)
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    probs = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    _check(lib.softmax(dtype, logits.data_ptr(), _ptr(t), probs.data_ptr(), rows, vocab, _stream(logits.device)), "softmax")
    return probs


def logsumexp(logits: torch.Tensor, temperature=None) -> torch.Tensor:
    """(rows,) float32 logsumexp(logits / t)."""
    lib = _lib()
    dtype, rows, vocab = _logits(logits)
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _check(lib.logsumexp(dtype, logits.data_ptr(), _ptr(t), lse.data_ptr(), rows, vocab, _stream(logits.device)), "logsumexp")
    return lse


def logprobs(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(n,) float32 log_softmax(logits)[rows[i], token_ids[i]] (ids outside the vocab: -inf).

    rows, token_ids : (n,) int32 on the logits' device.

    Example
    -------
    >>> lp = logprobs(logits, rows, ids)  # doctest: +SKIP
    """
    lib = _lib()
    dtype, num_rows, vocab = _logits(logits)
    n = rows.numel()
    _expect(rows, "rows", shape=(n,), dtype=torch.int32, device=logits.device)
    _expect(token_ids, "token_ids", shape=(n,), dtype=torch.int32, device=logits.device)
    lse = logsumexp(logits)
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    _check(
        lib.gather_logprobs(dtype, logits.data_ptr(), lse.data_ptr(), rows.data_ptr(), token_ids.data_ptr(), n,
                            vocab, out.data_ptr(), _stream(logits.device)),
        "gather_logprobs",
    )
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) int32 index of each row's largest logit (lowest index on ties)."""
    lib = _lib()
    dtype, rows, vocab = _logits(logits)
    out = torch.empty(rows, dtype=torch.int32, device=logits.device)
    _check(lib.argmax(dtype, logits.data_ptr(), out.data_ptr(), rows, vocab, _stream(logits.device)), "argmax")
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
    lib = _lib()
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
    _check(
        lib.sample(dtype, logits.data_ptr(), _ptr(t), _ptr(k), _ptr(p), _ptr(mp), s.data_ptr(), out.data_ptr(),
                   rows, vocab, _stream(logits.device)),
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
    lib = _lib()
    dtype, rows, vocab = _logits(logits)
    if not 1 <= k <= min(vocab, MAX_TOP_K_DISTRIBUTION):
        raise ValueError(f"k {k} outside 1..{min(vocab, MAX_TOP_K_DISTRIBUTION)}")
    t = _per_row(temperature, rows, torch.float32, logits.device, "temperature")
    ids = torch.empty(rows, k, dtype=torch.int32, device=logits.device)
    probs = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    _check(
        lib.top_k_distribution(dtype, logits.data_ptr(), _ptr(t), k, ids.data_ptr(), probs.data_ptr(), rows, vocab,
                               _stream(logits.device)),
        "top_k_distribution",
    )
    return ids, probs
