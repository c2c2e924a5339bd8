"""A stand-in for pie.engine.cuda_ops built on pie.engine.cuda_ops.reference: the same functions and
keyword arguments, PyTorch ops on any device and dtype. With it, the CUDA attention backend's plumbing
(pie.engine.attention.cuda: plans, residual stream, cache writes, masks, sampling dispatch) is checked
on machines without a GPU; the kernels themselves are checked against the same references in
test_cuda_kernels.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie.engine.cuda_ops import reference as ref


@dataclass
class ReferencePlan:
    qo_indptr: torch.Tensor  # (R+1,) int64
    kv_page_indptr: torch.Tensor  # (R+1,) int64
    kv_page_indices: torch.Tensor  # (P,) int64
    kv_last_page_len: torch.Tensor  # (R,) int64
    masks: list | None
    exclude: list[int]  # requests the caller attends itself (their rows come back NaN, as a check)


def plan_attention(qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, *, page_size, num_q_heads,
                   num_kv_heads, head_dim, masks=None, device=None, num_sms=None, split=None, page_capacity=None,
                   reuse=None, use_decode_kernel=True, exclude=None) -> ReferencePlan:
    def t(x):
        return torch.as_tensor(x, dtype=torch.int64).reshape(-1)

    return ReferencePlan(t(qo_indptr), t(kv_page_indptr), t(kv_page_indices), t(kv_last_page_len), masks,
                         list(exclude or []))


def paged_attention(q, k_cache, v_cache, plan: ReferencePlan, *, sm_scale=None, out=None):
    """The kernels leave excluded requests' rows unwritten; here they are NaN, so a caller that
    forgets to fill them fails every comparison."""
    result = ref.paged_attention(q, k_cache, v_cache, plan.qo_indptr, plan.kv_page_indptr, plan.kv_page_indices,
                                 plan.kv_last_page_len, plan.masks, sm_scale)
    for r in plan.exclude:
        result[plan.qo_indptr[r]:plan.qo_indptr[r + 1]] = float("nan")
    return result


rope_append_kv = ref.rope_append_kv
fused_add_rms_norm = ref.fused_add_rms_norm
argmax = ref.argmax


def rms_norm(x, weight, eps, out=None):
    return ref.rms_norm(x, weight, eps)


def sample(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, generator=None):
    return ref.sample(logits, temperature, top_k, top_p, min_p, seeds.tolist())
