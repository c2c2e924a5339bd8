"""The transformer forward on CUDA devices, through the kernels of pie.engine.cuda_kernels.

`Transformer.forward` (PyTorch ops) stays the reference; this path runs the same weights and the same
paged cache with:
- one attention plan per batch (`plan_attention`), used by every layer;
- RoPE of q and k fused with the K/V append into the paged cache (`rope_append_kv`);
- paged attention over ragged requests (decode kernel for one-token requests, tiled prefill for the
  rest, custom BRLE masks on the device), except fresh causal prefill of at least
  `min_sdpa_prefill_tokens` tokens, which runs through torch SDPA (pie.engine.sdpa_prefill);
- the residual add fused into RMSNorm (`fused_add_rms_norm`): x + residual is rounded to the model
  dtype before the norm, as HF does;
- cuBLAS (torch) for the linear layers.

Decode batches (every request one token, default mask, no input embeddings) replay CUDA graphs:
one graph per (batch bucket, KV-length bucket), captured on first use; a batch is padded to its bucket
with requests that read page 0 and write nowhere (slot -1 is skipped by the append kernel).

Cache layout is PagedKVCache's: per layer (num_pages * page_size, Hkv, D), viewed here as
(num_pages, page_size, Hkv, D).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine import cuda_kernels
from pie.engine.config import ModelConfig
from pie.engine.kv_cache import PagedKVCache, sequence_slots
from pie.engine.transformer import Transformer, rms_norm as torch_rms_norm
from pie.engine.sdpa_prefill import SdpaPrefillGroup, plan_sdpa_prefill, sdpa_prefill_attention

# Decode batches are padded up to one of these sizes for graph replay; larger batches run eagerly.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MIN_GRAPH_KV_BUCKET = 256  # KV-length buckets are powers of two from here
# Fresh causal requests at least this long run through SDPA; shorter ones fit one prefill tile of the
# kernel (PREFILL_TILE rows), where one launch for all of them beats a few torch ops per request.
MIN_SDPA_PREFILL_TOKENS = 128


def cuda_forward_unsupported(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the CUDA kernel path cannot run this model here, or None when it can."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    reason = cuda_kernels.unavailable_reason()
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the CUDA kernels take float16 or bfloat16)"
    if config.head_dim not in (64, 128):
        return f"head_dim {config.head_dim} (the CUDA kernels take 64 or 128)"
    return None


@dataclass
class BatchLayout:
    """The ragged batch as the kernels see it (CPU values; flattened rows in request order).

    token_ids, positions, write_slots: (N,) per input token; write_slots may hold -1 (no write).
    output_rows: (M,) rows whose logits are wanted. pages[r], last_page_len[r]: request r's KV
    sequence. masks[r]: None (causal) or its BRLE rows. embed_rows / embed_values: rows replaced by
    input embeddings ((E,) and (E, hidden)), or None.
    """

    token_ids: list[int]
    positions: list[int]
    write_slots: torch.Tensor
    output_rows: list[int]
    qo_lens: list[int]
    pages: list[Sequence[int]]
    last_page_len: list[int]
    masks: list[Sequence[Sequence[int]] | None]
    embed_rows: torch.Tensor | None = None
    embed_values: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        """Every request one token, default masks, no input embeddings: replayable as a graph."""
        return (all(n == 1 for n in self.qo_lens) and all(m is None for m in self.masks)
                and self.embed_rows is None)

    def kv_lens(self, page_size: int) -> list[int]:
        """Each request's KV sequence length: its full pages plus its last page's tokens."""
        return [(len(p) - 1) * page_size + last for p, last in zip(self.pages, self.last_page_len)]


@dataclass
class _DecodeGraph:
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
    plan: cuda_kernels.AttentionPlan
    logits: torch.Tensor  # (B, V) float32, written by each replay
    page_capacity: int


class CudaForward:
    """Runs `Transformer`'s weights over `PagedKVCache` with the CUDA kernels (see module doc).

    kernels: the module providing the kernel functions (pie.engine.cuda_kernels); tests on machines
    without a GPU substitute a PyTorch stand-in to check the plumbing.
    min_sdpa_prefill_tokens: fresh causal requests this long or longer run through SDPA
    (None: every request through the kernels).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, *, use_graphs: bool = True,
                 max_graph_batch: int = 128, kernels=cuda_kernels,
                 min_sdpa_prefill_tokens: int | None = MIN_SDPA_PREFILL_TOKENS):
        self.model = model
        self.cache = cache
        self.config = model.config
        self.kernels = kernels
        self.device = model.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graph_batch_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_graph_batch]
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = None
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 132)
        self._rope_rows = 0
        self.cos = self.sin = torch.empty(0)
        self._ensure_rope(max(self.config.max_position_embeddings, cache.num_slots))
        self.min_sdpa_prefill_tokens = min_sdpa_prefill_tokens
        self.num_graph_replays = 0
        self.num_graph_captures = 0
        self.num_sdpa_prefill_requests = 0

    # ---- tables -----------------------------------------------------------------------------
    def _ensure_rope(self, num_positions: int) -> None:
        """(P, D/2) float32 cos/sin tables covering positions < num_positions (grown by doubling).
        Angles are pos * inv_freq in float32, as HF computes them."""
        if num_positions <= self._rope_rows:
            return
        rows = max(num_positions, 2 * self._rope_rows)
        pos = torch.arange(rows, dtype=torch.float32, device=self.device)
        angles = pos[:, None] * self.model.inv_freq[None, :].float()  # (P, D/2)
        self.cos, self.sin = angles.cos().contiguous(), angles.sin().contiguous()
        self._rope_rows = rows
        self._graphs.clear()  # captured graphs point at the old tables

    def _cache_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, cache = self.config, self.cache
        shape = (cache.num_pages, cache.page_size, c.num_kv_heads, c.head_dim)
        return cache.k[layer].view(shape), cache.v[layer].view(shape)

    # ---- planning ---------------------------------------------------------------------------
    def _sliding_window_masks(self, batch: BatchLayout) -> list:
        """BRLE rows for requests whose sequence is longer than the sliding window (else their mask)."""
        window = self.config.sliding_window
        masks = list(batch.masks)
        for r, (qo_len, kv_len) in enumerate(zip(batch.qo_lens, batch.kv_lens(self.cache.page_size))):
            if masks[r] is not None or kv_len <= window:
                continue
            rows = []
            for i in range(qo_len):
                query = kv_len - qo_len + i  # sequence index of input token i
                first = max(0, query - window + 1)
                rows.append([0, first, query - first + 1, kv_len - query - 1])
            masks[r] = rows
        return masks

    def _sdpa_requests(self, batch: BatchLayout) -> list[int]:
        """Requests for SDPA: default mask, KV sequence exactly its input tokens (within the sliding
        window), at least min_sdpa_prefill_tokens of them."""
        if self.min_sdpa_prefill_tokens is None:
            return []
        window = self.config.sliding_window
        chosen = []
        for r, (qo_len, kv_len, mask) in enumerate(zip(batch.qo_lens, batch.kv_lens(self.cache.page_size),
                                                       batch.masks)):
            if (mask is None and qo_len == kv_len and qo_len >= max(2, self.min_sdpa_prefill_tokens)
                    and (window is None or kv_len <= window)):
                chosen.append(r)
        return chosen

    def _plan_sdpa(self, batch: BatchLayout, requests: list[int]) -> list[SdpaPrefillGroup]:
        starts = np.cumsum([0] + batch.qo_lens[:-1]).tolist()
        ps = self.cache.page_size
        return plan_sdpa_prefill(
            [starts[r] for r in requests], [batch.qo_lens[r] for r in requests],
            [sequence_slots(batch.pages[r], batch.qo_lens[r], ps) for r in requests], self.device)

    def plan(self, batch: BatchLayout, **kwargs) -> cuda_kernels.AttentionPlan:
        c = self.config
        qo_indptr = [0]
        for n in batch.qo_lens:
            qo_indptr.append(qo_indptr[-1] + n)
        page_indptr = [0]
        for p in batch.pages:
            page_indptr.append(page_indptr[-1] + len(p))
        masks = batch.masks
        if c.sliding_window is not None:
            masks = self._sliding_window_masks(batch)
        has_masks = any(m is not None for m in masks)
        return self.kernels.plan_attention(
            qo_indptr, page_indptr, [p for pages in batch.pages for p in pages], batch.last_page_len,
            page_size=self.cache.page_size, num_q_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, masks=masks if has_masks else None, device=self.device,
            num_sms=self._num_sms, **kwargs)

    # ---- forward ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: BatchLayout) -> torch.Tensor:
        """Logits (M, vocab) float32 on the device for batch.output_rows; writes the batch's K/V."""
        if batch.positions:
            self._ensure_rope(max(batch.positions) + 1)
        if self.use_graphs and batch.is_decode:
            graphed = self._forward_graphed(batch)
            if graphed is not None:
                return graphed
        dev = self.device
        sdpa_requests = self._sdpa_requests(batch)
        sdpa_groups = self._plan_sdpa(batch, sdpa_requests) if sdpa_requests else []
        self.num_sdpa_prefill_requests += len(sdpa_requests)
        plan = self.plan(batch, exclude=sdpa_requests)
        token_ids = torch.tensor(batch.token_ids, dtype=torch.int64).to(dev, non_blocking=True)
        positions = torch.tensor(batch.positions, dtype=torch.int32).to(dev, non_blocking=True)
        slots = batch.write_slots.to(dev, torch.int64, non_blocking=True)
        embeds = None
        if batch.embed_rows is not None:
            embeds = (batch.embed_rows.to(dev), batch.embed_values.to(dev, self.model.dtype))
        hidden = self._layers(token_ids, positions, slots, plan, embeds, sdpa_groups)  # (N, H), final-normed
        rows = torch.tensor(batch.output_rows, dtype=torch.int64).to(dev, non_blocking=True)
        return F.linear(hidden[rows], self.model.lm_head).float()

    def _layers(self, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                plan: cuda_kernels.AttentionPlan, embeds=None,
                sdpa_groups: Sequence[SdpaPrefillGroup] = ()) -> torch.Tensor:
        """token_ids (N,) int64, positions (N,) int32, slots (N,) int64 on the device -> (N, H) hidden
        states after the final norm. sdpa_groups: the requests `plan` excludes, attended by SDPA.
        Only device work: capturable in a CUDA graph."""
        k_ops, c, m = self.kernels, self.config, self.model
        n = token_ids.shape[0]
        eps = c.rms_norm_eps
        residual = m.embed[token_ids]  # (N, H), a fresh tensor: updated in place below
        if embeds is not None:
            residual[embeds[0]] = embeds[1]
        h = k_ops.rms_norm(residual, m.layers[0].input_norm, eps)
        for li, lw in enumerate(m.layers):
            qkv = F.linear(h, lw.qkv, lw.qkv_bias)  # (N, (Hq + 2 Hkv) D)
            q = qkv[:, :c.q_size].contiguous().view(n, c.num_heads, c.head_dim)  # attention reads q dense
            k = qkv[:, c.q_size:c.q_size + c.kv_size].view(n, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim)
            if lw.q_norm is not None:  # Qwen3: per-head norm before RoPE (rare; torch ops)
                q = torch_rms_norm(q, lw.q_norm, eps).contiguous()
                k = torch_rms_norm(k, lw.k_norm, eps).contiguous()
            k_cache, v_cache = self._cache_views(li)
            q = k_ops.rope_append_kv(q, k, v, positions, self.cos, self.sin, k_cache, v_cache, slots)
            attn = k_ops.paged_attention(q, k_cache, v_cache, plan, sm_scale=m.scale)  # (N, Hq, D)
            if sdpa_groups:  # their rows of attn are unwritten until here
                sdpa_prefill_attention(q, self.cache.k[li], self.cache.v[li], sdpa_groups, m.scale, attn)
            o = F.linear(attn.view(n, c.q_size), lw.o)
            h, residual = k_ops.fused_add_rms_norm(o, residual, lw.post_attention_norm, eps)
            gate, up = F.linear(h, lw.gate_up).chunk(2, dim=-1)
            mlp = F.linear(F.silu(gate) * up, lw.down)
            next_norm = m.layers[li + 1].input_norm if li + 1 < len(m.layers) else m.norm
            h, residual = k_ops.fused_add_rms_norm(mlp, residual, next_norm, eps)
        return h

    # ---- CUDA graphs for decode -------------------------------------------------------------
    def _graph_key(self, batch_size: int, max_kv: int) -> tuple[int, int] | None:
        i = bisect.bisect_left(self.graph_batch_sizes, batch_size)
        if i == len(self.graph_batch_sizes):
            return None
        kv_bucket = MIN_GRAPH_KV_BUCKET
        while kv_bucket < max_kv:
            kv_bucket *= 2
        if kv_bucket > self.cache.num_slots * 2:
            return None
        return self.graph_batch_sizes[i], kv_bucket

    def _forward_graphed(self, batch: BatchLayout) -> torch.Tensor | None:
        """Replays the decode graph of the batch's bucket (capturing it first); None when the batch
        has no bucket (too many requests, a sequence past the largest KV bucket, a sliding window)."""
        ps = self.cache.page_size
        b = len(batch.qo_lens)
        max_kv = max(batch.kv_lens(ps))
        if self.config.sliding_window is not None and max_kv > self.config.sliding_window:
            return None  # the window becomes a mask: eager path
        key = self._graph_key(b, max_kv)
        if key is None:
            return None
        entry = self._graphs.get(key) or self._capture(*key)
        bucket = entry.bucket
        pad = bucket - b
        counts = [len(p) for p in batch.pages]
        num_pages = sum(counts) + pad
        if num_pages > entry.page_capacity:
            return None
        entry.copied.synchronize()  # the previous replay's copies have left the host buffers
        meta = entry.meta_host.numpy()
        o = 2 * (bucket + 1)  # qo_indptr is fixed (one token each); kv_page_indptr follows it
        meta[bucket + 1] = 0
        np.cumsum(counts + [1] * pad, out=meta[bucket + 2:o])
        meta[o:o + b] = batch.last_page_len
        meta[o + b:o + bucket] = 1
        meta[o + bucket:o + bucket + b] = batch.positions
        meta[o + bucket + b:o + 2 * bucket] = 0
        first_page = o + 2 * bucket
        meta[first_page:first_page + num_pages] = [p for pages in batch.pages for p in pages] + [0] * pad
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

    def _capture(self, bucket: int, kv_bucket: int) -> _DecodeGraph:
        """Captures one decode step of `bucket` requests over sequences of at most kv_bucket tokens."""
        c, dev, ps = self.config, self.device, self.cache.page_size
        split = cuda_kernels.decode_split(bucket, kv_bucket, c.num_heads, c.num_kv_heads, c.head_dim,
                                          self._num_sms)
        capacity = bucket * -(-kv_bucket // ps)
        first_page = 4 * bucket + 2
        meta_host = torch.zeros(first_page + capacity, dtype=torch.int32, pin_memory=True)
        meta_host[:bucket + 1] = torch.arange(bucket + 1, dtype=torch.int32)  # qo_indptr
        meta_host[bucket + 1:2 * bucket + 2] = torch.arange(bucket + 1, dtype=torch.int32)  # one page each
        meta_host[2 * bucket + 2:3 * bucket + 2] = 1  # last page lengths
        ids_host = torch.zeros(2 * bucket, dtype=torch.int64, pin_memory=True)
        ids_host[bucket:] = -1
        meta, ids = meta_host.to(dev), ids_host.to(dev)
        dummy = BatchLayout(token_ids=[0] * bucket, positions=[0] * bucket,
                            write_slots=torch.full((bucket,), -1, dtype=torch.int64), output_rows=[],
                            qo_lens=[1] * bucket, pages=[[0]] * bucket, last_page_len=[1] * bucket,
                            masks=[None] * bucket)
        planned = self.plan(dummy, split=split)  # the schedule (decode_req, split, workspace) to keep
        o = 2 * bucket + 2
        plan = dataclasses.replace(planned, qo_indptr=meta[:bucket + 1], kv_page_indptr=meta[bucket + 1:o],
                                   kv_last_page_len=meta[o:o + bucket], kv_page_indices=meta[first_page:])
        positions = meta[o + bucket:o + 2 * bucket]
        token_ids, write_slots = ids[:bucket], ids[bucket:]
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles, workspaces)
            self._layers(token_ids, positions, write_slots, plan)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            hidden = self._layers(token_ids, positions, write_slots, plan)
            logits = F.linear(hidden, self.model.lm_head).float()
        copied = torch.cuda.Event()
        copied.record()
        entry = _DecodeGraph(graph=graph, bucket=bucket, meta=meta, meta_host=meta_host, ids=ids, ids_host=ids_host,
                             copied=copied, plan=plan, logits=logits, page_capacity=capacity)
        self._graphs[(bucket, kv_bucket)] = entry
        self.num_graph_captures += 1
        return entry
