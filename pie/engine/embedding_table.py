"""Input-embedding slots: a table of `num_slots` rows, one token's input embedding each, that forward
passes read instead of token ids (ForwardRequest.input_embeddings; the inferlet API's
`forward-pass.input-embeddings`). The model runner owns it, as it owns the KV cache.

Slots are accounted by the control layer's embedding-slot pool (a PagePool with page size 1: handles
are per instance, released when it ends), as KV pages are; this table holds their contents. A slot is
written only by the instance that holds it, before it submits a pass reading it.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch


class EmbeddingTable:
    def __init__(self, num_slots: int, hidden_size: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_slots = num_slots
        self.hidden_size = hidden_size
        self._rows: torch.Tensor | None = None  # (num_slots, hidden_size), allocated at first write
        self._dtype = dtype
        self._device = device
        self._lock = threading.Lock()

    def _table(self) -> torch.Tensor:
        with self._lock:
            if self._rows is None:
                self._rows = torch.zeros(self.num_slots, self.hidden_size, dtype=self._dtype, device=self._device)
            return self._rows

    def write(self, slots: Sequence[int], values: torch.Tensor) -> None:
        """values: (len(slots), hidden_size). Physical slot ids."""
        if values.shape != (len(slots), self.hidden_size):
            raise ValueError(f"{tuple(values.shape)} embeddings for {len(slots)} slots of width {self.hidden_size}")
        self._table()[torch.tensor(list(slots), dtype=torch.int64)] = values.to(self._dtype)

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """(len(slots), hidden_size) copy of the rows."""
        return self._table()[torch.tensor(list(slots), dtype=torch.int64)]
