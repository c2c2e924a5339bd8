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

Models whose layers differ are planned once per kind of layer: one schedule per distinct sliding
window (shared when no sequence of the batch is longer than the window), one cos/sin table per
distinct RoPE (Gemma 3's local and global layers). LongRoPE (Phi-3) rotates the rows of a request
whose sequence is longer than original_max_position_embeddings with the long factors, the others
with the short ones, as HF does for a sequence of that length. With attention logit soft-capping
(Gemma 2) attention runs in explicit matmuls (`scaled_attention`): neither SDPA nor the decode kernel
caps scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine.attention.base import AttentionBackend
from pie.engine.config import ModelConfig, RopeConfig
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
class AttentionSchedule:
    """Who attends what, for layers of one sliding window (or none)."""

    dense: list[DenseCausalSpan]
    groups: list[PaddedGroup]
    decode: DecodeGroup | None


@dataclass(frozen=True)
class TorchAttentionPlan:
    """One batch on the PyTorch backend; tensors on the model's device."""

    rope: list[tuple[torch.Tensor, torch.Tensor]]  # per distinct RoPE: (cos, sin), each (N, 1, D) model dtype
    write_slots: torch.Tensor  # (N,) int64 cache slots of each row's K/V
    schedules: dict[int | None, AttentionSchedule]  # by the layers' sliding window (None: no window)


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
        self.softcap = config.attn_logit_softcap
        self.layer_windows = [config.layer_window(i) for i in range(config.num_layers)]
        ropes = [config.layer_rope(i) for i in range(config.num_layers)]
        self.ropes = list(dict.fromkeys(ropes))  # distinct, in layer order
        self.layer_rope_index = [self.ropes.index(r) for r in ropes]
        d = config.head_dim
        # per distinct RoPE: (D/2,) float32 inverse frequencies, and longrope's long ones (else None)
        self.inv_freqs = [(r.inverse_frequencies(d).to(self.device),
                           r.inverse_frequencies(d, long=True).to(self.device) if r.kind == "longrope" else None)
                          for r in self.ropes]

    def plan(self, batch: RaggedBatch) -> TorchAttentionPlan:
        by_effective: dict[int | None, AttentionSchedule] = {}
        schedules: dict[int | None, AttentionSchedule] = {}
        for window in dict.fromkeys(self.layer_windows):
            # a window no sequence of the batch outgrows changes nothing: share the unwindowed schedule
            effective = window if window is not None and max(batch.kv_lens) > window else None
            if effective not in by_effective:
                by_effective[effective] = self._schedule(batch, effective)
            schedules[window] = by_effective[effective]
        positions = torch.tensor(batch.positions, dtype=torch.int64)
        write_slots = batch.write_slots
        if self.device.type != "cpu":  # the batch is described on the host
            positions = positions.to(self.device, non_blocking=True)
            write_slots = write_slots.to(self.device, non_blocking=True)
        rope = [self._cos_sin(batch, positions, r, *inv) for r, inv in zip(self.ropes, self.inv_freqs)]
        return TorchAttentionPlan(rope=rope, write_slots=write_slots, schedules=schedules)

    def _cos_sin(self, batch: RaggedBatch, positions: torch.Tensor, rope: RopeConfig, inv_freq: torch.Tensor,
                 long_inv_freq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N, 1, D) in the model dtype, of the batch's positions under `rope`."""
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (N, D/2)
        if long_inv_freq is not None:
            long_rows = np.repeat([rope.uses_long_factor(n) for n in batch.kv_lens], batch.qo_lens)  # (N,)
            if long_rows.any():
                is_long = torch.from_numpy(long_rows).to(self.device)[:, None]
                freqs = torch.where(is_long, positions.to(torch.float32)[:, None] * long_inv_freq[None, :], freqs)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, D)
        cos, sin = emb.cos(), emb.sin()
        if rope.attention_factor != 1.0:
            cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
        return cos.to(self.dtype), sin.to(self.dtype)

    def _schedule(self, batch: RaggedBatch, window: int | None) -> AttentionSchedule:
        """The batch's groups for layers with sliding window `window` (None: whole sequences)."""
        dense: list[DenseCausalSpan] = []
        decode: list[int] = []  # request indices
        singles: list[int] = []
        starts = batch.starts
        for r, (t, kv_len, mask) in enumerate(zip(batch.qo_lens, batch.kv_lens, batch.masks)):
            if mask is None and t == 1:
                decode.append(r)
            elif mask is None and kv_len == t and (window is None or kv_len <= window):
                dense.append(DenseCausalSpan(starts[r], starts[r] + t))
            else:
                singles.append(r)
        decode_group = None
        if decode and self.use_decode_kernel and self.softcap is None:  # the kernel does not cap scores
            decode_group = self._decode_group(batch, decode, window)
            decode = []
        groups = [self._padded_group(batch, rs, window) for rs in ([decode] if decode else []) + [[r] for r in singles]]
        if self.device.type != "cpu":
            groups = [g.to(self.device) for g in groups]
            decode_group = None if decode_group is None else decode_group.to(self.device)
        return AttentionSchedule(dense=dense, groups=groups, decode=decode_group)

    def _decode_group(self, batch: RaggedBatch, requests: list[int], window: int | None) -> DecodeGroup:
        """The one-token requests' cache slots (the last `window` of them, with a window)."""
        ps = batch.page_size
        if window is None:
            indptr, slots = batch.kv_slots(requests)
        else:
            slot_lists = [sequence_slots(batch.pages[r], batch.kv_lens[r], ps)[-window:] for r in requests]
            indptr = np.cumsum([0] + [len(s) for s in slot_lists], dtype=np.int64)
            slots = np.concatenate(slot_lists)
        return DecodeGroup(q_rows=torch.tensor([batch.starts[r] for r in requests], dtype=torch.int64),
                           kv_indptr=torch.from_numpy(indptr), kv_slots=torch.from_numpy(slots))

    def _padded_group(self, batch: RaggedBatch, requests: list[int], window: int | None) -> PaddedGroup:
        """The requests padded to the longest input (T_max) and sequence (L_max) among them."""
        ps = batch.page_size
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
        cos, sin = plan.rope[self.layer_rope_index[layer]]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]  # (slots, Hkv, D)
        k_cache[plan.write_slots] = k
        v_cache[plan.write_slots] = v
        schedule = plan.schedules[self.layer_windows[layer]]
        return paged_attention(q, k, v, k_cache, v_cache, schedule, self.scale, self.softcap)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, schedule: AttentionSchedule, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """
    q: (N, Hq, D) queries of the flattened batch; k, v: (N, Hkv, D) their fresh keys/values
    (already written to the cache); k_cache, v_cache: (slots, Hkv, D) one layer of the cache.
    softcap: attention scores -> softcap * tanh(scores / softcap) (the schedule has no decode group).
    Returns (N, Hq, D).
    """
    out = torch.empty_like(q)
    if schedule.decode is not None:
        if softcap is not None:
            raise ValueError("paged_attention: the decode kernel does not soft-cap scores")
        d = schedule.decode
        decode_attention(q.contiguous(), k_cache, v_cache, d.kv_indptr, d.kv_slots, d.q_rows, scale, out)
    group = q.shape[1] // k.shape[1]
    for span in schedule.dense:
        # 4-d inputs: torch picks its fused CPU kernel only for (B, H, T, D)
        qs = q[span.start:span.stop].transpose(0, 1)[None]  # (1, Hq, T, D)
        ks = _repeat_heads(k[span.start:span.stop], group).transpose(0, 1)[None]  # (1, Hq, T, D)
        vs = _repeat_heads(v[span.start:span.stop], group).transpose(0, 1)[None]
        o = scaled_attention(qs, ks, vs, scale, softcap, is_causal=True)
        out[span.start:span.stop] = o[0].transpose(0, 1)
    for grp in schedule.groups:
        qg = q[grp.q_index].transpose(1, 2)  # (G, Hq, T_max, D)
        kg = _repeat_heads(k_cache[grp.kv_index], group).transpose(1, 2)  # (G, Hq, L_max, D)
        vg = _repeat_heads(v_cache[grp.kv_index], group).transpose(1, 2)
        o = scaled_attention(qg, kg, vg, scale, softcap, mask=grp.mask)
        o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])  # (G * T_max, Hq, D)
        out[grp.rows] = o[grp.valid]
    return out


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None,
                     mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """softmax(cap(q k^T * scale) masked) v. q: (B, H, T, D); k, v: (B, H, L, D); mask: (B, 1, T, L) bool,
    True = may attend (every row attends somewhere), or is_causal (T == L). Returns (B, H, T, D).

    Without softcap this is torch's SDPA. With it, scores -> softcap * tanh(scores / softcap) before the
    mask, and the softmax runs in float32, as Gemma 2 computes them in HF's eager attention."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, L)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """(..., Hkv, D) -> (..., Hkv * group, D), each kv head repeated for the query heads that read it.
    (The CPU's fused SDPA kernels take equal head counts; with enable_gqa torch falls back to the
    unfused math path, about a third of a 512-token prefill here.)"""
    return x if group == 1 else x.repeat_interleave(group, dim=-2)
