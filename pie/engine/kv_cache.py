"""The paged KV cache: one K and one V tensor per layer, carved into fixed-size pages.

Layout (per layer): k[layer], v[layer] are (num_pages * page_size, num_kv_heads, head_dim), so the
flat slot of token `o` of page `p` is `p * page_size + o`. Allocated once; kernels write into it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def sequence_length(num_pages, last_page_len, page_size: int):
    """Tokens in a KV sequence of `num_pages` pages, all full but the last, which holds `last_page_len`
    (ints, or elementwise over arrays / tensors of them)."""
    return (num_pages - 1) * page_size + last_page_len


def sequence_slots(pages: Sequence[int], num_tokens: int, page_size: int) -> np.ndarray:
    """(num_tokens,) int64 flat cache slots of sequence positions 0..num_tokens-1 laid out over `pages`."""
    per_page = np.asarray(pages, dtype=np.int64)[:, None] * page_size + np.arange(page_size, dtype=np.int64)
    return per_page.reshape(-1)[:num_tokens]


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, Hkv, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, Hkv, D)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def copy_spans(self, spans) -> None:
        """Runs the copies, all layers, one after another (a later span may read what an earlier one
        wrote). Each span has src_page, src_offset, dst_page, dst_offset and count (pie.control.CopySpan)."""
        ps = self.page_size
        for span in spans:
            if span.count == 0:
                continue
            src = slice(span.src_page * ps + span.src_offset, span.src_page * ps + span.src_offset + span.count)
            dst = slice(span.dst_page * ps + span.dst_offset, span.dst_page * ps + span.dst_offset + span.count)
            same_page = span.src_page == span.dst_page  # the ranges may overlap: copy the source first
            self.k[:, dst] = self.k[:, src].clone() if same_page else self.k[:, src]
            self.v[:, dst] = self.v[:, src].clone() if same_page else self.v[:, src]
