"""Attention over the paged KV cache, PyTorch path (the reference for every other backend).

Plan once per batch, run once per layer: `AttentionPlan` turns the ragged requests into index tensors
(which cache slots each request reads, which query rows belong to it, its mask); `paged_attention`
then costs a few tensor ops per layer, whatever the number of requests.

Requests are grouped so that padding stays small:
- all single-token requests with the default mask go to the in-place decode kernel when the
  backend has one, or else share one padded group,
- a request whose sequence is exactly its new tokens with the default mask runs dense and causal on
  the fresh K/V, without touching the cache (plain prefill),
- every other request forms a group of its own (prefill over cached context, custom masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pie.engine.kernels import decode_attention


@dataclass
class DenseCausalSpan:
    start: int  # first row of the request in the flattened batch
    stop: int  # one past its last row


@dataclass
class PaddedGroup:
    q_index: torch.Tensor  # (G, T_max) int64 rows of the flattened batch (padding: row 0)
    kv_index: torch.Tensor  # (G, L_max) int64 cache slots (padding: slot 0, never attended)
    mask: torch.Tensor  # (G, 1, T_max, L_max) bool, True = may attend
    valid: torch.Tensor  # (G * T_max,) bool, which padded query rows are real
    rows: torch.Tensor  # (num_valid,) int64 rows of the flattened batch, in padded order


@dataclass
class DecodeGroup:
    """Single-token requests for the in-place decode kernel (pie.engine.kernels.decode_attention)."""

    q_rows: torch.Tensor  # (R,) int64 rows of the flattened batch
    kv_indptr: torch.Tensor  # (R + 1,) int64 offsets into kv_slots
    kv_slots: torch.Tensor  # (kv_indptr[-1],) int64 cache slots each row attends to, in order


@dataclass
class AttentionPlan:
    dense: list[DenseCausalSpan]
    groups: list[PaddedGroup]
    decode: DecodeGroup | None = None

    def to(self, device: torch.device) -> "AttentionPlan":
        """The plan with its index and mask tensors on `device` (the model's, when not the CPU)."""
        groups = [PaddedGroup(*(t.to(device) for t in (g.q_index, g.kv_index, g.mask, g.valid, g.rows)))
                  for g in self.groups]
        decode = None if self.decode is None else DecodeGroup(
            *(t.to(device) for t in (self.decode.q_rows, self.decode.kv_indptr, self.decode.kv_slots)))
        return AttentionPlan(dense=self.dense, groups=groups, decode=decode)


@dataclass
class RequestLayout:
    """One request's place in the batch, after validation."""

    start: int  # first row in the flattened batch
    num_tokens: int  # T
    slots: torch.Tensor | None  # (kv_len,) int64 cache slots of its sequence, in order (None: not built)
    mask: torch.Tensor | None  # (T, kv_len) bool from its BRLE rows, or None for the default


def default_mask(num_tokens: int, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """(T, kv_len) bool: input token i sits at sequence index kv_len - T + i and sees j <= that
    (and, with a sliding window w, only j > that - w)."""
    query_pos = torch.arange(kv_len - num_tokens, kv_len)[:, None]
    key_pos = torch.arange(kv_len)[None, :]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def build_plan(layouts: list[RequestLayout], sliding_window: int | None,
               decode_kernel: bool = False) -> AttentionPlan:
    dense: list[DenseCausalSpan] = []
    decode: list[RequestLayout] = []
    singles: list[list[RequestLayout]] = []
    for lay in layouts:
        kv_len = lay.slots.numel()
        if lay.mask is None and lay.num_tokens == 1:
            decode.append(lay)
        elif lay.mask is None and kv_len == lay.num_tokens and (sliding_window is None or kv_len <= sliding_window):
            dense.append(DenseCausalSpan(lay.start, lay.start + lay.num_tokens))
        else:
            singles.append([lay])
    decode_group = None
    if decode and decode_kernel:
        slot_lists = [lay.slots if sliding_window is None else lay.slots[-sliding_window:] for lay in decode]
        indptr = torch.zeros(len(decode) + 1, dtype=torch.int64)
        indptr[1:] = torch.tensor([s.numel() for s in slot_lists]).cumsum(0)
        decode_group = DecodeGroup(q_rows=torch.tensor([lay.start for lay in decode], dtype=torch.int64),
                                   kv_indptr=indptr, kv_slots=torch.cat(slot_lists))
        decode = []
    groups = [_padded_group(g, sliding_window) for g in ([decode] if decode else []) + singles]
    return AttentionPlan(dense=dense, groups=groups, decode=decode_group)


def _padded_group(layouts: list[RequestLayout], sliding_window: int | None) -> PaddedGroup:
    g = len(layouts)
    t_max = max(lay.num_tokens for lay in layouts)
    l_max = max(lay.slots.numel() for lay in layouts)
    q_index = torch.zeros(g, t_max, dtype=torch.int64)
    kv_index = torch.zeros(g, l_max, dtype=torch.int64)
    mask = torch.zeros(g, 1, t_max, l_max, dtype=torch.bool)
    mask[:, :, :, 0] = True  # padded query rows attend to one slot, so they stay finite
    valid = torch.zeros(g, t_max, dtype=torch.bool)
    for i, lay in enumerate(layouts):
        t, kv_len = lay.num_tokens, lay.slots.numel()
        q_index[i, :t] = torch.arange(lay.start, lay.start + t)
        kv_index[i, :kv_len] = lay.slots
        mask[i, 0, :t, :] = False
        mask[i, 0, :t, :kv_len] = lay.mask if lay.mask is not None else default_mask(t, kv_len, sliding_window)
        valid[i, :t] = True
    valid = valid.flatten()
    return PaddedGroup(q_index=q_index, kv_index=kv_index, mask=mask, valid=valid, rows=q_index.flatten()[valid])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """
    q: (N, Hq, D) queries of the flattened batch; k, v: (N, Hkv, D) their fresh keys/values
    (already written to the cache); k_cache, v_cache: (slots, Hkv, D) one layer of the cache.
    Returns (N, Hq, D).
    """
    out = torch.empty_like(q)
    if plan.decode is not None:
        d = plan.decode
        decode_attention(q.contiguous(), k_cache, v_cache, d.kv_indptr, d.kv_slots, d.q_rows, scale, out)
    group = q.shape[1] // k.shape[1]
    for span in plan.dense:
        # 4-d inputs: torch picks its fused CPU kernel only for (B, H, T, D)
        qs = q[span.start:span.stop].transpose(0, 1)[None]  # (1, Hq, T, D)
        ks = _repeat_heads(k[span.start:span.stop], group).transpose(0, 1)[None]  # (1, Hq, T, D)
        vs = _repeat_heads(v[span.start:span.stop], group).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[span.start:span.stop] = o[0].transpose(0, 1)
    for grp in plan.groups:
        qg = q[grp.q_index].transpose(1, 2)  # (G, Hq, T_max, D)
        kg = _repeat_heads(k_cache[grp.kv_index], group).transpose(1, 2)  # (G, Hq, L_max, D)
        vg = _repeat_heads(v_cache[grp.kv_index], group).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=grp.mask, scale=scale)
        o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])  # (G * T_max, Hq, D)
        out[grp.rows] = o[grp.valid]
    return out


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """(..., Hkv, D) -> (..., Hkv * group, D), each kv head repeated for the query heads that read it.
    (The CPU's fused SDPA kernels take equal head counts; with enable_gqa torch falls back to the
    unfused math path, about a third of a 512-token prefill here.)"""
    return x if group == 1 else x.repeat_interleave(group, dim=-2)
