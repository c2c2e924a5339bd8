"""The paged KV cache: one K and one V tensor per layer, carved into fixed-size pages.

Layout (per layer): k[layer], v[layer] are (num_pages * page_size, num_kv_heads, head_dim), so the
flat slot of token `o` of page `p` is `p * page_size + o`. Allocated once; kernels write into it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


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

    def copy_pages(self, src_pages: list[int], dst_pages: list[int], num_tokens: int | None = None) -> None:
        """Copy whole pages (or the first `num_tokens` tokens of each) src[i] -> dst[i], all layers."""
        n = self.page_size if num_tokens is None else num_tokens
        offsets = torch.arange(n)
        src = (torch.tensor(src_pages)[:, None] * self.page_size + offsets).flatten()
        dst = (torch.tensor(dst_pages)[:, None] * self.page_size + offsets).flatten()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def copy_spans(self, spans: list[tuple[int, int, int, int, int]]) -> None:
        """Runs the copies (src_page, src_offset, dst_page, dst_offset, count), all layers, one after
        another (a later span may read what an earlier one wrote)."""
        ps = self.page_size
        for src_page, src_off, dst_page, dst_off, count in spans:
            if count == 0:
                continue
            src = slice(src_page * ps + src_off, src_page * ps + src_off + count)
            dst = slice(dst_page * ps + dst_off, dst_page * ps + dst_off + count)
            self.k[:, dst] = self.k[:, src].clone() if src_page == dst_page else self.k[:, src]
            self.v[:, dst] = self.v[:, src].clone() if src_page == dst_page else self.v[:, src]


class PageAllocator:
    """A plain free list of page ids, for the built-in generate loop and tests.
    (The control layer's ref-counted pool replaces it under inferlets.)"""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: asked for {n} pages, {len(self._free)} free "
                              f"of {self.num_pages}; raise --kv-cache-mb or lower concurrency")
        pages = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
