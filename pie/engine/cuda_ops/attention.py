"""Paged attention over ragged batches (csrc/kernels/cuda/attention.cu): plan once per batch, run once
per layer, as flashinfer does.

`plan_attention` takes the batch description on the CPU and goes through named steps: check the
ragged index (`check_ragged`), expand custom masks to bit rows on the device (`expand_masks`), split
one-token requests for the decode kernel from the rest (`split_requests`), cut the rest into prefill
tiles, heaviest first (`tile_prefill`), choose the decode kernel's split over the KV sequence
(`choose_decode_split`) and allocate its workspace (`split_kv_workspace`). `paged_attention` then
runs each layer with the `PagedAttentionPlan`.

Example
-------
>>> from pie.engine import cuda_ops
>>> plan = cuda_ops.plan_attention([0, 5, 6], [0, 2, 3], [4, 7, 1], [3, 9], page_size=16,
...                                num_q_heads=32, num_kv_heads=8, head_dim=64)  # doctest: +SKIP
>>> out = cuda_ops.paged_attention(q, k_cache, v_cache, plan)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pie.engine.cuda_ops._lib import ATTN_DTYPES, aligned16, check, cpu_i64, dtype_code, expect, lib, ptr, stream
from pie.engine.kv_cache import sequence_length

PREFILL_TILE = 128  # query rows per prefill CTA (kBlockM in attention.cu)

Masks = Sequence[Sequence[Sequence[int]] | None]  # per request None (causal) or qo_len BRLE rows over kv_len


@dataclass(frozen=True)
class PagedAttentionPlan:
    """One batch's schedule for the paged attention kernels, built once and used by every layer.

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
    kv_page_indices: torch.Tensor  # (total_pages,) or (page_capacity,)
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


@dataclass(frozen=True)
class RaggedIndex:
    """A checked ragged batch of R requests and N input tokens, as int64 CPU tensors."""

    qo_indptr: torch.Tensor  # (R+1,) request r's input tokens are rows qo_indptr[r]:qo_indptr[r+1]
    kv_page_indptr: torch.Tensor  # (R+1,) request r's pages are kv_page_indices[kv_page_indptr[r]:...[r+1]]
    kv_page_indices: torch.Tensor  # (total_pages,)
    kv_last_page_len: torch.Tensor  # (R,) in 1..page_size
    qo_lens: torch.Tensor  # (R,) input tokens per request
    kv_lens: torch.Tensor  # (R,) KV sequence length per request, >= its qo_len

    @property
    def num_requests(self) -> int:
        return self.qo_indptr.numel() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1]) if self.num_requests else 0


def check_geometry(page_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Raises ValueError unless the kernels take this cache geometry."""
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim {head_dim} not supported (64 or 128)")
    if num_q_heads <= 0 or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} must be a positive multiple of num_kv_heads {num_kv_heads}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")


def check_ragged(qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, page_size: int) -> RaggedIndex:
    """The batch's index arrays ((R+1,), (R+1,), (total_pages,), (R,) ints) checked, with each request's
    input and sequence lengths; raises ValueError naming the first bad request."""
    qo = cpu_i64(qo_indptr)
    kp = cpu_i64(kv_page_indptr)
    ki = cpu_i64(kv_page_indices)
    kl = cpu_i64(kv_last_page_len)
    num_requests = qo.numel() - 1
    if num_requests < 0 or kp.numel() != num_requests + 1 or kl.numel() != num_requests:
        raise ValueError(
            f"qo_indptr ({qo.numel()}), kv_page_indptr ({kp.numel()}) and kv_last_page_len ({kl.numel()}) "
            "must describe the same number of requests (R+1, R+1, R)"
        )
    qo_lens = qo[1:] - qo[:-1]
    num_pages = kp[1:] - kp[:-1]
    if num_requests and (qo[0] != 0 or kp[0] != 0):
        raise ValueError("qo_indptr and kv_page_indptr must start at 0")
    if (qo_lens < 0).any() or (num_pages < 1).any():
        bad = int(torch.nonzero((qo_lens < 0) | (num_pages < 1))[0])
        raise ValueError(f"request {bad}: needs >= 0 input tokens and >= 1 KV page")
    if ((kl < 1) | (kl > page_size)).any():
        bad = int(torch.nonzero((kl < 1) | (kl > page_size))[0])
        raise ValueError(f"request {bad}: kv_last_page_len {int(kl[bad])} outside 1..{page_size}")
    if kp.numel() and int(kp[-1]) > ki.numel():
        raise ValueError(f"kv_page_indptr ends at {int(kp[-1])} but kv_page_indices has {ki.numel()} entries")
    kv_lens = sequence_length(num_pages, kl, page_size)
    if (kv_lens < qo_lens).any():
        bad = int(torch.nonzero(kv_lens < qo_lens)[0])
        raise ValueError(f"request {bad}: {int(qo_lens[bad])} input tokens but kv_len {int(kv_lens[bad])}")
    return RaggedIndex(qo, kp, ki, kl, qo_lens, kv_lens)


def _mask_runs(masks: Masks, qo_lens: list[int], kv_lens: list[int]) -> tuple[list[int], list[int], list[int]]:
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


def expand_masks(masks: Masks, ragged: RaggedIndex, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's mask rows as bits on the device (causal requests get causal rows).

    Returns (mask, mask_indptr): mask (max(total_words, 1),) int32, request r's row i at word
    mask_indptr[r] + i * ceil(kv_len_r / 32), bit j of a row set when the token may attend sequence
    entry j; mask_indptr (R+1,) int32.
    """
    if device.type != "cuda":
        raise ValueError("masks are expanded on the device: plan on a CUDA device")
    num_requests = ragged.num_requests
    if len(masks) != num_requests:
        raise ValueError(f"masks: {len(masks)} entries, expected one per request ({num_requests})")
    qo_lens, kv_lens = ragged.qo_lens.tolist(), ragged.kv_lens.tolist()
    runs, run_offsets, row_len = _mask_runs(masks, qo_lens, kv_lens)
    words = [(n + 31) // 32 for n in kv_lens]
    req_words = [q_len * w for q_len, w in zip(qo_lens, words)]
    mask_indptr_cpu = torch.zeros(num_requests + 1, dtype=torch.int64)
    mask_indptr_cpu[1:] = torch.cumsum(torch.tensor(req_words, dtype=torch.int64), 0)
    total_words = int(mask_indptr_cpu[-1])
    if total_words >= 2**31:
        raise ValueError(f"masks need {total_words} words, more than int32 offsets address")
    num_tokens = ragged.num_tokens
    row_word_offset = torch.cat(
        [mask_indptr_cpu[r] + torch.arange(qo_lens[r]) * words[r] for r in range(num_requests)]
    ) if num_tokens else torch.zeros(0, dtype=torch.int64)
    mask = torch.empty(max(total_words, 1), dtype=torch.int32, device=device)
    mask_indptr = mask_indptr_cpu.to(device, torch.int32)
    # Every device input is bound to a name until the launch: a temporary freed before it would
    # hand its block to the next allocation, and the kernel would read that tensor instead.
    runs_d = torch.tensor(runs if runs else [0], dtype=torch.int32, device=device)
    run_offsets_d = torch.tensor(run_offsets, dtype=torch.int64, device=device)
    row_len_d = torch.tensor(row_len if row_len else [0], dtype=torch.int32, device=device)
    row_word_offset_d = row_word_offset.to(device, torch.int32)
    with torch.cuda.device(device):
        check(
            lib().expand_brle_bits(
                runs_d.data_ptr(),
                run_offsets_d.data_ptr(),
                len(row_len),
                row_len_d.data_ptr(),
                row_word_offset_d.data_ptr() if num_tokens else 0,
                mask.data_ptr(),
                0,
                stream(device),
            ),
            "expand_brle_bits",
        )
    return mask, mask_indptr


def split_requests(qo_lens: torch.Tensor, use_decode_kernel: bool,
                   exclude: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode_req, prefill_req): int64 indices of the requests for the decode kernel (one input token,
    when use_decode_kernel) and of those with input tokens for the prefill kernel; `exclude`d requests
    in neither. qo_lens: (R,) int64."""
    num_requests = qo_lens.numel()
    active = torch.ones(num_requests, dtype=torch.bool)
    if exclude is not None and len(exclude):
        skipped = cpu_i64(exclude)
        if ((skipped < 0) | (skipped >= num_requests)).any():
            raise ValueError(f"exclude: request indices must be in 0..{num_requests - 1}, got {skipped.tolist()}")
        active[skipped] = False
    is_decode = ((qo_lens == 1) if use_decode_kernel else torch.zeros(num_requests, dtype=torch.bool)) & active
    decode_req = torch.nonzero(is_decode).reshape(-1)
    prefill_req = torch.nonzero(~is_decode & (qo_lens > 0) & active).reshape(-1)
    return decode_req, prefill_req


def tile_prefill(prefill_req: torch.Tensor, ragged: RaggedIndex, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(work_req, work_tile): (num_work,) int64, one entry per PREFILL_TILE query rows of each prefill
    request, heaviest first (KV tokens a tile reads: up to its last row's causal bound, or the whole
    sequence when masks are custom)."""
    qo_lens, kv_lens = ragged.qo_lens, ragged.kv_lens
    tiles = (qo_lens[prefill_req] + PREFILL_TILE - 1) // PREFILL_TILE
    work_req = torch.repeat_interleave(prefill_req, tiles)
    first = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles)
    work_tile = torch.arange(work_req.numel()) - first
    if work_req.numel():
        rows_end = torch.minimum(qo_lens[work_req], (work_tile + 1) * PREFILL_TILE)
        cost = kv_lens[work_req] - qo_lens[work_req] + rows_end if causal else kv_lens[work_req]
        order = torch.argsort(cost, descending=True, stable=True)
        work_req, work_tile = work_req[order], work_tile[order]
    return work_req, work_tile


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


def choose_decode_split(decode_req: torch.Tensor, kv_lens: torch.Tensor, split: tuple[int, int] | None,
                        num_sms: int | None, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        device: torch.device) -> tuple[int, int]:
    """(num_chunks, chunk_tokens) for the decode requests (decode_req (D,) into kv_lens (R,)): the given
    `split`, checked to cover the longest sequence, or `decode_split` on the device's SM count;
    (1, 1) without decode requests."""
    if not decode_req.numel():
        return 1, 1
    max_kv = int(kv_lens[decode_req].max())
    if split is not None:
        num_chunks, chunk_tokens = int(split[0]), int(split[1])
        if num_chunks < 1 or chunk_tokens < 1 or num_chunks * chunk_tokens < max_kv:
            raise ValueError(f"split {split} does not cover the longest decode sequence ({max_kv} tokens)")
        return num_chunks, chunk_tokens
    if num_sms is None:
        if device.type != "cuda":
            raise ValueError("num_sms is required when planning for a non-CUDA device")
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return decode_split(decode_req.numel(), max_kv, num_q_heads, num_kv_heads, head_dim, num_sms)


def split_kv_workspace(num_chunks: int, num_decode: int, num_q_heads: int, head_dim: int,
                       device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(part_o, part_lse): the decode kernel's per-chunk partial outputs, (num_chunks, num_decode, Hq, D)
    and (num_chunks, num_decode, Hq) float32; (None, None) when nothing is split."""
    if not num_decode or num_chunks <= 1:
        return None, None
    part_o = torch.empty(num_chunks, num_decode, num_q_heads, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(num_chunks, num_decode, num_q_heads, dtype=torch.float32, device=device)
    return part_o, part_lse


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
    masks: Masks | None = None,
    device: torch.device | str | None = None,
    use_decode_kernel: bool = True,
    num_sms: int | None = None,
    split: tuple[int, int] | None = None,
    page_capacity: int | None = None,
    reuse: PagedAttentionPlan | None = None,
    exclude: Sequence[int] | None = None,
) -> PagedAttentionPlan:
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
        `out` left as they were. For callers that attend those requests themselves (the CUDA
        attention backend runs fresh causal prefill through torch SDPA).

    Returns
    -------
    PagedAttentionPlan
    """
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    check_geometry(page_size, num_q_heads, num_kv_heads, head_dim)
    ragged = check_ragged(qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, page_size)
    mask = mask_indptr = None
    if masks is not None and any(m is not None for m in masks):
        mask, mask_indptr = expand_masks(masks, ragged, dev)
    decode_req, prefill_req = split_requests(ragged.qo_lens, use_decode_kernel, exclude)
    work_req, work_tile = tile_prefill(prefill_req, ragged, causal=mask is None)
    num_chunks, chunk_tokens = choose_decode_split(decode_req, ragged.kv_lens, split, num_sms, num_q_heads,
                                                   num_kv_heads, head_dim, dev)
    if reuse is not None:
        return _refill(reuse, ragged, work_req, work_tile, decode_req, num_chunks, chunk_tokens, mask is not None)
    part_o, part_lse = split_kv_workspace(num_chunks, decode_req.numel(), num_q_heads, head_dim, dev)

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, torch.int32)

    ki = ragged.kv_page_indices
    pages = to_dev(ki if ki.numel() else torch.zeros(1, dtype=torch.int64))
    if page_capacity is not None and page_capacity > pages.numel():
        pages = torch.cat([pages, torch.zeros(page_capacity - pages.numel(), dtype=torch.int32, device=dev)])
    return PagedAttentionPlan(
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_tokens=ragged.num_tokens,
        num_requests=ragged.num_requests,
        qo_indptr=to_dev(ragged.qo_indptr),
        kv_page_indptr=to_dev(ragged.kv_page_indptr),
        kv_page_indices=pages,
        kv_last_page_len=to_dev(ragged.kv_last_page_len),
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


def _refill(plan: PagedAttentionPlan, ragged: RaggedIndex, work_req, work_tile, decode_req, num_chunks: int,
            chunk_tokens: int, has_mask: bool) -> PagedAttentionPlan:
    """Overwrite `plan`'s device tensors with a new batch of the same shape (see plan_attention)."""
    checks = [
        ("masks", has_mask or plan.mask is not None, False),
        ("num_tokens", ragged.num_tokens, plan.num_tokens),
        ("num_requests", ragged.num_requests, plan.num_requests),
        ("decode requests", decode_req.numel(), plan.num_decode),
        ("prefill tiles", work_req.numel(), plan.num_work),
        ("split", (num_chunks, chunk_tokens) if decode_req.numel() else None,
         (plan.num_chunks, plan.chunk_tokens) if plan.num_decode else None),
    ]
    for what, got, want in checks:
        if got != want:
            raise ValueError(f"plan cannot be reused: {what} {got} != {want} (plan anew, or pass `split`)")
    ki = ragged.kv_page_indices
    if ki.numel() > plan.kv_page_indices.numel():
        raise ValueError(
            f"plan cannot be reused: {ki.numel()} pages > capacity {plan.kv_page_indices.numel()} (page_capacity)"
        )
    for dst, src in ((plan.qo_indptr, ragged.qo_indptr), (plan.kv_page_indptr, ragged.kv_page_indptr),
                     (plan.kv_last_page_len, ragged.kv_last_page_len), (plan.work_req, work_req),
                     (plan.work_tile, work_tile), (plan.decode_req, decode_req)):
        dst.copy_(src.to(torch.int32))
    if ki.numel():
        plan.kv_page_indices[: ki.numel()].copy_(ki.to(torch.int32))
    return plan


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedAttentionPlan,
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
    kernels = lib()
    p = plan
    expect(q, "q", shape=(p.num_tokens, p.num_q_heads, p.head_dim))
    dtype = dtype_code(q, "q", ATTN_DTYPES)
    cache_shape = (None, p.page_size, p.num_kv_heads, p.head_dim)
    expect(k_cache, "k_cache", shape=cache_shape, dtype=q.dtype, device=q.device)
    expect(v_cache, "v_cache", shape=tuple(k_cache.shape), dtype=q.dtype, device=q.device)
    if p.qo_indptr.device != q.device:
        raise ValueError(f"plan is on {p.qo_indptr.device}, q on {q.device}")
    if out is None:
        out = torch.empty_like(q)
    else:
        expect(out, "out", shape=tuple(q.shape), dtype=q.dtype, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(p.head_dim)
    aligned16(q, out, k_cache, v_cache)
    launch_stream = stream(q.device)
    common = (p.qo_indptr.data_ptr(), p.kv_page_indptr.data_ptr(), p.kv_page_indices.data_ptr(),
              p.kv_last_page_len.data_ptr())
    if p.num_decode:
        check(
            kernels.paged_decode_attention(
                dtype, q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *common,
                p.decode_req.data_ptr(), p.num_decode, p.num_chunks, p.chunk_tokens,
                ptr(p.part_o), ptr(p.part_lse), ptr(p.mask), ptr(p.mask_indptr), p.page_size,
                p.num_q_heads, p.num_kv_heads, p.head_dim, scale, launch_stream,
            ),
            "paged_decode_attention",
        )
    if p.num_work:
        check(
            kernels.paged_prefill_attention(
                dtype, q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *common,
                p.work_req.data_ptr(), p.work_tile.data_ptr(), p.num_work, ptr(p.mask),
                ptr(p.mask_indptr), p.page_size, p.num_q_heads, p.num_kv_heads, p.head_dim, scale, launch_stream,
            ),
            "paged_prefill_attention",
        )
    return out
