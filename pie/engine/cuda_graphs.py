"""CUDA graphs of decode steps: the one transformer forward captured on the CUDA attention backend.

A decode batch (every request one token, default mask, no input embeddings) replays the graph of its
(batch bucket, KV-length bucket), captured on first use; a batch is padded to its bucket with requests
that read page 0 and write nowhere (slot -1 is skipped by the append kernel). A step refills two
pinned host buffers with numpy, copies each to the device once, and replays. Batches without a
bucket (too many requests, a sequence past the largest KV bucket or the sliding window) run eagerly.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pie.engine import cuda_ops
from pie.engine.attention.cuda import CudaAttention, CudaAttentionPlan
from pie.engine.ragged_batch import RaggedBatch
from pie.engine.transformer import Transformer

# Decode batches are padded up to one of these sizes for graph replay; larger batches run eagerly.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MIN_GRAPH_KV_BUCKET = 256  # KV-length buckets are powers of two from here


@dataclass(frozen=True)
class DecodeGraph:
    """One captured decode step of `bucket` requests. Its inputs live in two device buffers, filled
    from two pinned host buffers by one copy each per replay:
    meta (int32): [qo_indptr (B+1) | kv_page_indptr (B+1) | kv_last_page_len (B) | positions (B) |
    kv_page_indices (page_capacity)]; ids (int64): [token_ids (B) | write_slots (B)]. The plan's and
    the graph's tensors are views into them."""

    graph: torch.cuda.CUDAGraph
    bucket: int
    meta: torch.Tensor  # device int32
    meta_host: torch.Tensor  # pinned int32, same length
    ids: torch.Tensor  # device int64 (2B,)
    ids_host: torch.Tensor  # pinned int64 (2B,)
    copied: torch.cuda.Event  # recorded after the last copies: the host buffers are free again once it completes
    plan: CudaAttentionPlan
    logits: torch.Tensor  # (B, V) float32, written by each replay
    page_capacity: int


class DecodeGraphs:
    """Captures and replays decode steps of `model` on `attention` (see the module doc)."""

    def __init__(self, model: Transformer, attention: CudaAttention, max_graph_batch: int = 128):
        self.model = model
        self.attention = attention
        self.device = attention.device
        self.batch_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_graph_batch]
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._pool = None
        self.num_graph_replays = 0
        self.num_graph_captures = 0

    def _key(self, batch_size: int, max_kv: int) -> tuple[int, int] | None:
        """(batch bucket, KV-length bucket) of a decode batch, or None when it has none."""
        i = bisect.bisect_left(self.batch_sizes, batch_size)
        if i == len(self.batch_sizes):
            return None
        kv_bucket = MIN_GRAPH_KV_BUCKET
        while kv_bucket < max_kv:
            kv_bucket *= 2
        if kv_bucket > self.attention.cache.num_slots * 2:
            return None
        return self.batch_sizes[i], kv_bucket

    def forward(self, batch: RaggedBatch) -> torch.Tensor | None:
        """Logits (M, vocab) float32 of a decode batch's output rows, by replaying its bucket's graph
        (capturing it first); None when the batch has no bucket."""
        attention = self.attention
        config = attention.config
        b = batch.num_requests
        max_kv = max(batch.kv_lens)
        if config.sliding_window is not None and max_kv > config.sliding_window:
            return None  # the window becomes a mask: eager path
        key = self._key(b, max_kv)
        if key is None:
            return None
        attention.ensure_rope(max(batch.positions) + 1)
        entry = self._graphs.get(key)
        if entry is not None and entry.plan.rope_cos is not attention.rope_cos:
            self._graphs.clear()  # captured graphs read the tables they were captured with
            entry = None
        if entry is None:
            entry = self._capture(*key)
        bucket = entry.bucket
        pad = bucket - b
        counts = np.diff(batch.page_indptr)  # (b,) pages per request
        num_pages = len(batch.page_ids) + pad
        if num_pages > entry.page_capacity:
            return None
        entry.copied.synchronize()  # the previous replay's copies have left the host buffers
        meta = entry.meta_host.numpy()
        o = 2 * (bucket + 1)  # qo_indptr is fixed (one token each); kv_page_indptr follows it
        meta[bucket + 1] = 0
        np.cumsum(np.concatenate([counts, np.ones(pad, dtype=np.int64)]), out=meta[bucket + 2:o])
        meta[o:o + b] = batch.last_page_len
        meta[o + b:o + bucket] = 1
        meta[o + bucket:o + bucket + b] = batch.positions
        meta[o + bucket + b:o + 2 * bucket] = 0
        first_page = o + 2 * bucket
        meta[first_page:first_page + len(batch.page_ids)] = batch.page_ids
        meta[first_page + len(batch.page_ids):first_page + num_pages] = 0
        ids = entry.ids_host.numpy()
        ids[:b] = batch.token_ids
        ids[b:bucket] = 0
        ids[bucket:bucket + b] = batch.write_slots.numpy()
        ids[bucket + b:] = -1  # padding writes nowhere
        entry.meta[:first_page + num_pages].copy_(entry.meta_host[:first_page + num_pages], non_blocking=True)
        entry.ids.copy_(entry.ids_host, non_blocking=True)
        entry.copied.record()
        entry.graph.replay()
        self.num_graph_replays += 1
        rows = torch.tensor(batch.output_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return entry.logits[rows]  # a gather: a copy, safe from the next replay

    def _capture(self, bucket: int, kv_bucket: int) -> DecodeGraph:
        """Captures one decode step of `bucket` requests over sequences of at most kv_bucket tokens."""
        attention, dev = self.attention, self.device
        c, ps = attention.config, attention.cache.page_size
        split = cuda_ops.decode_split(bucket, kv_bucket, c.num_heads, c.num_kv_heads, c.head_dim, attention.num_sms)
        capacity = bucket * -(-kv_bucket // ps)
        first_page = 4 * bucket + 2
        meta_host = torch.zeros(first_page + capacity, dtype=torch.int32, pin_memory=True)
        meta_host[:bucket + 1] = torch.arange(bucket + 1, dtype=torch.int32)  # qo_indptr
        meta_host[bucket + 1:2 * bucket + 2] = torch.arange(bucket + 1, dtype=torch.int32)  # one page each
        meta_host[2 * bucket + 2:3 * bucket + 2] = 1  # last page lengths
        ids_host = torch.zeros(2 * bucket, dtype=torch.int64, pin_memory=True)
        ids_host[bucket:] = -1
        meta, ids = meta_host.to(dev), ids_host.to(dev)
        dummy = RaggedBatch(page_size=ps, token_ids=[0] * bucket, positions=[0] * bucket,
                            write_slots=torch.full((bucket,), -1, dtype=torch.int64), output_rows=[],
                            qo_lens=[1] * bucket, page_ids=np.zeros(bucket, dtype=np.int64),
                            page_indptr=np.arange(bucket + 1, dtype=np.int64), last_page_len=[1] * bucket,
                            masks=[None] * bucket)
        planned = attention.plan_paged(dummy, split=split)  # the schedule (decode_req, split, workspace) to keep
        o = 2 * bucket + 2
        paged = dataclasses.replace(planned, qo_indptr=meta[:bucket + 1], kv_page_indptr=meta[bucket + 1:o],
                                    kv_last_page_len=meta[o:o + bucket], kv_page_indices=meta[first_page:])
        plan = CudaAttentionPlan(paged=paged, positions=meta[o + bucket:o + 2 * bucket], write_slots=ids[bucket:],
                                 rope_cos=attention.rope_cos, rope_sin=attention.rope_sin)
        token_ids = ids[:bucket]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles, workspaces)
            self.model.forward(token_ids, attention, plan)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.forward(token_ids, attention, plan)  # (B, V) float32
        copied = torch.cuda.Event()
        copied.record()
        entry = DecodeGraph(graph=graph, bucket=bucket, meta=meta, meta_host=meta_host, ids=ids, ids_host=ids_host,
                            copied=copied, plan=plan, logits=logits, page_capacity=capacity)
        self._graphs[(bucket, kv_bucket)] = entry
        self.num_graph_captures += 1
        return entry
