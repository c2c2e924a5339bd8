"""One forward pass flattened into one ragged batch: the model runner's one input. Built once per pass,
by the control layer's handler straight from its commands (pie.control.handlers.pack_forward, in C++) or
by `ModelRunner.flatten` from ForwardRequests; read by every attention backend (pie.engine.attention), by
the CUDA graphs of decode (pie.engine.cuda_graphs) and by the sampling of the output rows.

The N input tokens of the R requests are the rows of the batch, request after request: request r owns
rows starts[r] .. starts[r] + qo_lens[r]. Its KV sequence is its pages, all full but the last, which
holds last_page_len[r] tokens (pie.engine.batch explains the request semantics). The pages of every
request are one flat table: request r's are page_ids[page_indptr[r]:page_indptr[r + 1]].
Values are on the host (lists, numpy arrays and CPU tensors); each backend moves what it needs to its
device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dataclass_fields
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from pie.engine.batch import Sampler
from pie.engine.kv_cache import sequence_length

BrleRows = Sequence[Sequence[int]]  # one BRLE row per input token over the request's KV sequence


def last_slots(pages: Sequence[int], last_page_len: int, num_tokens: int, page_size: int) -> list[int]:
    """Flat cache slots (page * page_size + offset) of the last `num_tokens` positions of a sequence:
    where a request writes its input tokens' K/V by default."""
    kv_len = sequence_length(len(pages), last_page_len, page_size)
    return [pages[i // page_size] * page_size + i % page_size for i in range(kv_len - num_tokens, kv_len)]


@dataclass(frozen=True)
class RaggedBatch:
    """The flattened batch of one forward pass (see the module doc)."""

    page_size: int
    token_ids: list[int]  # (N,)
    positions: list[int]  # (N,) RoPE positions
    write_slots: torch.Tensor  # (N,) int64 flat cache slots each token's K/V is written to (-1: nowhere)
    output_rows: list[int]  # (M,) rows whose logits are wanted, in the order of the samplers
    qo_lens: list[int]  # (R,) input tokens per request, >= 1
    page_ids: np.ndarray  # (P,) int64 every request's KV pages, request after request, each in sequence order
    page_indptr: np.ndarray  # (R+1,) int64 request r's pages are page_ids[page_indptr[r]:page_indptr[r + 1]]
    last_page_len: list[int]  # (R,) tokens in each request's last page, 1..page_size
    masks: list[BrleRows | None]  # (R,) each request's BRLE mask rows, None = causal
    embed_rows: torch.Tensor | None = None  # (E,) int64 rows whose token embeddings are replaced, or None
    embed_values: torch.Tensor | None = None  # (E, hidden) their input embeddings
    samplers: Sequence[Sampler] = ()  # (M,) what each output row asks for, in the order of output_rows
    output_mask_rows: Sequence[int] = ()  # (K,) indices into samplers whose vocabulary is masked
    output_mask_runs: Sequence[Sequence[int]] = ()  # (K,) their BRLE runs over the vocabulary (allowed first)
    adapters: Sequence[int] | None = None  # (R,) each request's LoRA adapter (0: none), or None: no request has one

    @classmethod
    def from_fields(cls, fields: dict) -> "RaggedBatch":
        """The batch of `fields` (every field by name; embed_rows, embed_values and adapters may be left out), as
        RaggedBatch(**fields) makes it without __init__'s per-field work: a frozen dataclass sets each field
        through object.__setattr__, 2.3 us a batch against 0.45 us (AMD EPYC), paid once per forward pass.
        Raises TypeError for a missing or unknown field."""
        batch = object.__new__(cls)
        values = batch.__dict__
        values["embed_rows"] = values["embed_values"] = values["adapters"] = None
        values.update(fields)
        if values.keys() != _FIELD_NAMES:
            raise TypeError(f"RaggedBatch fields: missing {sorted(_FIELD_NAMES - values.keys())}, "
                            f"unknown {sorted(values.keys() - _FIELD_NAMES)}")
        return batch

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_requests(self) -> int:
        return len(self.qo_lens)

    @cached_property
    def starts(self) -> list[int]:
        """(R,) each request's first row."""
        starts, row = [], 0
        for n in self.qo_lens:
            starts.append(row)
            row += n
        return starts

    @cached_property
    def pages(self) -> list[np.ndarray]:
        """(R,) each request's KV pages in sequence order (views of page_ids)."""
        ids, bounds = self.page_ids, self.page_indptr.tolist()
        return [ids[bounds[r]:bounds[r + 1]] for r in range(len(bounds) - 1)]

    @cached_property
    def kv_lens(self) -> list[int]:
        """(R,) each request's KV sequence length (its input tokens included)."""
        counts = np.diff(self.page_indptr)
        return ((counts - 1) * self.page_size + np.asarray(self.last_page_len, dtype=np.int64)).tolist()

    def kv_slots(self, requests: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(kv_indptr (G+1,), slots (sum kv_len,)) int64: the flat cache slots of every position of the
        listed requests' sequences, request after request, in a few numpy operations for any G."""
        ps = self.page_size
        rs = np.asarray(requests, dtype=np.int64)
        lens = np.asarray(self.kv_lens, dtype=np.int64)[rs]  # (G,)
        indptr = np.zeros(len(rs) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        position = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], lens)  # in its sequence
        page = self.page_ids[np.repeat(self.page_indptr[rs], lens) + position // ps]
        return indptr, page * ps + position % ps

    @property
    def is_decode(self) -> bool:
        """Every request one token, default masks, no input embeddings, no adapters (replayable as a CUDA
        graph)."""
        return (self.embed_rows is None and self.adapters is None and all(n == 1 for n in self.qo_lens)
                and all(m is None for m in self.masks))


_FIELD_NAMES = frozenset(field.name for field in dataclass_fields(RaggedBatch))
