"""The PyTorch attention backend (CPU, and CUDA devices without our kernels): the reference for every
other backend.

Plan once per batch, run once per layer: `plan` turns the ragged batch into index tensors (which cache
slots each request reads, which query rows belong to it, its mask) and the batch's RoPE tables;
`attend` then costs a few tensor ops per layer, whatever the number of requests.

Requests are grouped so that padding stays small:
- all single-token requests with the default mask go to the in-place decode kernel
  (`pie.engine.kernels.decode_attention`, C++ over the cache slots) when the CPU and dtype have one,
  or else share one padded group,
- a request whose sequence is exactly its new tokens with the default mask runs dense and causal on
  the fresh K/V, without touching the cache (plain prefill),
- every other request forms a group of its own (prefill over cached context, custom masks), run by
  SDPA on its gathered slots with its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine.attention.base import AttentionBackend
from pie.engine.config import ModelConfig
from pie.engine.kernels import decode_attention, decode_attention_supported, expand_brle
from pie.engine.kv_cache import PagedKVCache, sequence_slots
from pie.engine.layer_ops import LayerOps
from pie.engine.ragged_batch import RaggedBatch


@dataclass(frozen=True)
class DenseCausalSpan:
    start: int  # first row of the request in the flattened batch
    stop: int  # one past its last row


@dataclass(frozen=True)
class PaddedGroup:
    q_index: torch.Tensor  # (G, T_max) int64 rows of the flattened batch (padding: row 0)
    kv_index: torch.Tensor  # (G, L_max) int64 cache slots (padding: slot 0, never attended)
    mask: torch.Tensor  # (G, 1, T_max, L_max) bool, True = may attend
    valid: torch.Tensor  # (G * T_max,) bool, which padded query rows are real
    rows: torch.Tensor  # (num_valid,) int64 rows of the flattened batch, in padded order

    def to(self, device: torch.device) -> PaddedGroup:
        return PaddedGroup(*(t.to(device) for t in (self.q_index, self.kv_index, self.mask, self.valid, self.rows)))


@dataclass(frozen=True)
class DecodeGroup:
    """Single-token requests for the in-place decode kernel (pie.engine.kernels.decode_attention)."""

    q_rows: torch.Tensor  # (R,) int64 rows of the flattened batch
    kv_indptr: torch.Tensor  # (R + 1,) int64 offsets into kv_slots
    kv_slots: torch.Tensor  # (kv_indptr[-1],) int64 cache slots each row attends to, in order

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(*(t.to(device) for t in (self.q_rows, self.kv_indptr, self.kv_slots)))


@dataclass(frozen=True)
class TorchAttentionPlan:
    """One batch on the PyTorch backend; tensors on the model's device."""

    cos: torch.Tensor  # (N, 1, D) model dtype, RoPE of each row's position
    sin: torch.Tensor  # (N, 1, D)
    write_slots: torch.Tensor  # (N,) int64 cache slots of each row's K/V
    dense: list[DenseCausalSpan]
    groups: list[PaddedGroup]
    decode: DecodeGroup | None


def default_mask(num_tokens: int, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """(T, kv_len) bool: input token i sits at sequence index kv_len - T + i and sees j <= that
    (and, with a sliding window w, only j > that - w)."""
    query_pos = torch.arange(kv_len - num_tokens, kv_len)[:, None]
    key_pos = torch.arange(kv_len)[None, :]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PyTorchAttention(AttentionBackend):
    """Attention in PyTorch ops (SDPA) and the CPU decode kernel (see the module doc).

    use_decode_kernel: one-token requests run the C++ decode kernel (default: where the CPU and the
    cache dtype have it); settable, for comparisons.
    """

    name = "torch"

    def __init__(self, config: ModelConfig, cache: PagedKVCache):
        super().__init__(config, cache, LayerOps())
        self.dtype = cache.k.dtype
        self.use_decode_kernel = decode_attention_supported(self.dtype, self.device)

    def plan(self, batch: RaggedBatch) -> TorchAttentionPlan:
        window = self.config.sliding_window
        kv_lens, starts = batch.kv_lens, batch.starts
        dense: list[DenseCausalSpan] = []
        decode: list[int] = []  # request indices
        singles: list[int] = []
        for r, (t, kv_len, mask) in enumerate(zip(batch.qo_lens, kv_lens, batch.masks)):
            if mask is None and t == 1:
                decode.append(r)
            elif mask is None and kv_len == t and (window is None or kv_len <= window):
                dense.append(DenseCausalSpan(starts[r], starts[r] + t))
            else:
                singles.append(r)
        decode_group = None
        if decode and self.use_decode_kernel:
            decode_group = self._decode_group(batch, decode)
            decode = []
        groups = [self._padded_group(batch, rs) for rs in ([decode] if decode else []) + [[r] for r in singles]]
        positions = torch.tensor(batch.positions, dtype=torch.int64)
        write_slots = batch.write_slots
        if self.device.type != "cpu":  # the batch is described on the host
            positions = positions.to(self.device, non_blocking=True)
            write_slots = write_slots.to(self.device, non_blocking=True)
            groups = [g.to(self.device) for g in groups]
            decode_group = None if decode_group is None else decode_group.to(self.device)
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return TorchAttentionPlan(cos=emb.cos().to(self.dtype), sin=emb.sin().to(self.dtype),
                                  write_slots=write_slots, dense=dense, groups=groups, decode=decode_group)

    def _decode_group(self, batch: RaggedBatch, requests: list[int]) -> DecodeGroup:
        """The one-token requests' cache slots (the last sliding_window of them, with a window)."""
        window, ps = self.config.sliding_window, batch.page_size
        if window is None:
            indptr, slots = batch.kv_slots(requests)
        else:
            slot_lists = [sequence_slots(batch.pages[r], batch.kv_lens[r], ps)[-window:] for r in requests]
            indptr = np.cumsum([0] + [len(s) for s in slot_lists], dtype=np.int64)
            slots = np.concatenate(slot_lists)
        return DecodeGroup(q_rows=torch.tensor([batch.starts[r] for r in requests], dtype=torch.int64),
                           kv_indptr=torch.from_numpy(indptr), kv_slots=torch.from_numpy(slots))

    def _padded_group(self, batch: RaggedBatch, requests: list[int]) -> PaddedGroup:
        """The requests padded to the longest input (T_max) and sequence (L_max) among them."""
        ps, window = batch.page_size, self.config.sliding_window
        g = len(requests)
        t_max = max(batch.qo_lens[r] for r in requests)
        l_max = max(batch.kv_lens[r] for r in requests)
        q_index = torch.zeros(g, t_max, dtype=torch.int64)
        kv_index = torch.zeros(g, l_max, dtype=torch.int64)
        mask = torch.zeros(g, 1, t_max, l_max, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padded query rows attend to one slot, so they stay finite
        valid = torch.zeros(g, t_max, dtype=torch.bool)
        for i, r in enumerate(requests):
            t, kv_len, start, rows = batch.qo_lens[r], batch.kv_lens[r], batch.starts[r], batch.masks[r]
            q_index[i, :t] = torch.arange(start, start + t)
            kv_index[i, :kv_len] = torch.from_numpy(sequence_slots(batch.pages[r], kv_len, ps))
            mask[i, 0, :t, :] = False
            mask[i, 0, :t, :kv_len] = (default_mask(t, kv_len, window) if rows is None
                                       else torch.from_numpy(expand_brle(rows, kv_len)))
            valid[i, :t] = True
        valid = valid.flatten()
        return PaddedGroup(q_index=q_index, kv_index=kv_index, mask=mask, valid=valid, rows=q_index.flatten()[valid])

    def attend(self, plan: TorchAttentionPlan, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        q = q * plan.cos + rotate_half(q) * plan.sin
        k = k * plan.cos + rotate_half(k) * plan.sin
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]  # (slots, Hkv, D)
        k_cache[plan.write_slots] = k
        v_cache[plan.write_slots] = v
        return paged_attention(q, k, v, k_cache, v_cache, plan, self.scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, plan: TorchAttentionPlan, scale: float) -> torch.Tensor:
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
