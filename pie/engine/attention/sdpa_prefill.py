"""Fresh causal prefill through torch's scaled_dot_product_attention, on the CUDA path.

A request whose KV sequence is exactly its input tokens, with the default (causal) mask, needs no
paged attention: its keys and values are the ones this pass writes. The CUDA attention backend
(pie.engine.attention.cuda) takes such requests out of the kernel plan (plan_attention's `exclude`)
and attends them here, with SDPA's fused kernels (flash / cuDNN on Hopper), which run prefill faster
than pie's tiled paged kernel. Prefill over a cached prefix, custom masks and decode stay with pie's
kernels.

Requests are packed into padded groups, one SDPA call per group per layer. Padding goes at the end
of each request: under the causal mask a real query row i sees keys 0..i only, so padded keys are
never seen by real rows, and padded query rows are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_PADDING = 0.25  # a group's padded tokens stay within this fraction of its real tokens


@dataclass(frozen=True)
class SdpaPrefillGroup:
    """G requests attended by one SDPA call, each padded to the group's longest, T.

    rows: (G, T) int64 rows of the flattened batch, per request in sequence order (padding repeats
    the request's first row); slots: (G, T) int64 cache slots of the same tokens' keys and values
    (padding: the first token's slot); real: (num_real,) int64 positions of the real entries among
    the G * T, None when nothing is padded (an index, not a bool mask: no device sync); out_rows:
    (num_real,) int64 their batch rows. All on the device."""

    rows: torch.Tensor
    slots: torch.Tensor
    real: torch.Tensor | None
    out_rows: torch.Tensor


def plan_sdpa_prefill(starts: Sequence[int], lengths: Sequence[int], slots: Sequence[np.ndarray],
                      device: torch.device, max_padding: float = MAX_PADDING) -> list[SdpaPrefillGroup]:
    """Groups of fresh causal requests: request i's tokens are batch rows starts[i]..+lengths[i],
    its keys/values at slots[i] ((lengths[i],) int64). Longest first; a request joins the current
    group while the group's padding stays within `max_padding` of its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    for i in order:
        if packs:
            pack = packs[-1]
            longest = lengths[pack[0]]
            real = sum(lengths[j] for j in pack) + lengths[i]
            if longest * (len(pack) + 1) - real <= max_padding * real:
                pack.append(i)
                continue
        packs.append([i])
    groups = []
    for pack in packs:
        longest = lengths[pack[0]]
        rows = np.empty((len(pack), longest), dtype=np.int64)
        slot_rows = np.empty((len(pack), longest), dtype=np.int64)
        valid = np.zeros((len(pack), longest), dtype=bool)
        for g, i in enumerate(pack):
            n = lengths[i]
            rows[g, :n] = np.arange(starts[i], starts[i] + n)
            rows[g, n:] = starts[i]
            slot_rows[g, :n] = slots[i]
            slot_rows[g, n:] = slots[i][0]
            valid[g, :n] = True
        real = np.flatnonzero(valid)
        groups.append(SdpaPrefillGroup(
            rows=torch.from_numpy(rows).to(device),
            slots=torch.from_numpy(slot_rows).to(device),
            real=None if valid.all() else torch.from_numpy(real).to(device),
            out_rows=torch.from_numpy(rows.reshape(-1)[real]).to(device)))
    return groups


def sdpa_prefill_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                           groups: list[SdpaPrefillGroup], scale: float, out: torch.Tensor) -> None:
    """Writes the groups' rows of out (N, Hq, D) from q (N, Hq, D) and one layer's cache viewed per
    slot, k_slots / v_slots (num_slots, Hkv, D); grouped-query heads through enable_gqa."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    gqa = num_heads != k_slots.shape[1]
    for g in groups:
        qg = q[g.rows].transpose(1, 2)  # (G, Hq, T, D)
        kg = k_slots[g.slots].transpose(1, 2)  # (G, Hkv, T, D)
        vg = v_slots[g.slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(-1, num_heads, head_dim)  # (G * T, Hq, D)
        out[g.out_rows] = o if g.real is None else o[g.real]
