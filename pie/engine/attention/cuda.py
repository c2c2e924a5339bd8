"""The CUDA attention backend: our kernels (pie.engine.cuda_ops) on fp16/bf16 models with head_dim 64
or 128.

Per batch, `plan` makes one `PagedAttentionPlan` (`plan_attention`: decode kernel for one-token
requests, tiled prefill for the rest, BRLE masks expanded to bits on the device; a sliding window
becomes a mask for sequences longer than it), except for fresh causal prompts of at least
`min_sdpa_prefill_tokens` tokens, which are left out of it and attended by torch SDPA on K/V gathered
from their pages, packed into padded groups (pie.engine.attention.sdpa_prefill). Per layer, `attend`
runs `rope_append_kv` (RoPE of q and k fused with the paged-KV write), then `paged_attention`, then
the SDPA groups. Its layer ops are `CudaLayerOps` (RMSNorm kernels, cuBLAS).

The cache is PagedKVCache's, per layer (num_pages * page_size, Hkv, D), viewed here as
(num_pages, page_size, Hkv, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie.engine import cuda_ops
from pie.engine.attention.base import AttentionBackend
from pie.engine.attention.sdpa_prefill import SdpaPrefillGroup, plan_sdpa_prefill, sdpa_prefill_attention
from pie.engine.config import ModelConfig, UnsupportedModelError
from pie.engine.cuda_ops import PagedAttentionPlan
from pie.engine.kv_cache import PagedKVCache, sequence_slots
from pie.engine.layer_ops import CudaLayerOps
from pie.engine.ragged_batch import BrleRows, RaggedBatch

# Fresh causal requests at least this long run through SDPA; shorter ones fit one prefill tile of the
# kernel (PREFILL_TILE rows), where one launch for all of them beats a few torch ops per request.
MIN_SDPA_PREFILL_TOKENS = 128


def kernel_unsupported_features(config: ModelConfig) -> list[str]:
    """The model's features that the kernels (one RoPE table, one window for every layer, plain softmax)
    do not compute; the PyTorch backend computes them all."""
    features = []
    if config.attn_logit_softcap is not None:
        features.append("attention logit soft-capping")
    windows = {config.layer_window(i) for i in range(config.num_layers)}
    if len(windows) > 1:
        features.append("sliding windows on some layers only")
    if config.local_rope is not None:
        features.append("a separate RoPE for the sliding-window layers")
    if config.rope.kind == "longrope" or config.rope.attention_factor != 1.0:
        features.append("LongRoPE scaling (per-sequence factors, scaled cos/sin)")
    return features


def cuda_unsupported_reason(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the CUDA backend cannot run this model here, or None when it can."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    reason = cuda_ops.unavailable_reason()
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the CUDA kernels take float16 or bfloat16)"
    if config.head_dim not in (64, 128):
        return f"head_dim {config.head_dim} (the CUDA kernels take 64 or 128)"
    features = kernel_unsupported_features(config)
    if features:
        return f"the CUDA kernels do not compute {', '.join(features)} ({config.architecture})"
    return None


@dataclass(frozen=True)
class CudaAttentionPlan:
    """One batch on the CUDA backend; tensors on the device."""

    paged: PagedAttentionPlan  # the kernels' schedule (the stand-in's plan in tests)
    positions: torch.Tensor  # (N,) int32 RoPE positions
    write_slots: torch.Tensor  # (N,) int64 flat cache slots (-1: no write)
    rope_cos: torch.Tensor  # (P, D/2) float32 table covering every position of the batch
    rope_sin: torch.Tensor  # (P, D/2) float32
    sdpa_groups: tuple[SdpaPrefillGroup, ...] = ()  # requests `paged` excludes, attended by SDPA


class CudaAttention(AttentionBackend):
    """Attention through pie's CUDA kernels (see the module doc).

    kernels: the module providing the kernel functions (pie.engine.cuda_ops); tests on machines
    without a GPU substitute a PyTorch stand-in to check the plumbing.
    min_sdpa_prefill_tokens: fresh causal requests this long or longer run through SDPA
    (None: every request through the kernels).
    """

    name = "cuda"

    def __init__(self, config: ModelConfig, cache: PagedKVCache, *, kernels=cuda_ops,
                 min_sdpa_prefill_tokens: int | None = MIN_SDPA_PREFILL_TOKENS):
        features = kernel_unsupported_features(config)
        if features:
            raise UnsupportedModelError(f"the CUDA attention backend does not compute {', '.join(features)} "
                                        f"({config.architecture}); use the PyTorch backend (cuda_kernels=False)")
        super().__init__(config, cache, CudaLayerOps(kernels))
        self.kernels = kernels
        self.min_sdpa_prefill_tokens = min_sdpa_prefill_tokens
        # multiprocessors, which size the decode kernel's split-KV chunks (off a GPU, with the stand-in: an H100's)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 132)
        self.rope_cos = self.rope_sin = torch.empty(0)
        self.ensure_rope(max(config.max_position_embeddings, cache.num_slots))
        self.num_sdpa_prefill_requests = 0

    def ensure_rope(self, num_positions: int) -> None:
        """Grows the (P, D/2) float32 cos/sin tables (by doubling) to cover positions < num_positions.
        Angles are pos * inv_freq in float32, as HF computes them. Growing replaces both tensors."""
        if num_positions <= self.rope_cos.shape[0]:
            return
        rows = max(num_positions, 2 * self.rope_cos.shape[0])
        pos = torch.arange(rows, dtype=torch.float32, device=self.device)
        angles = pos[:, None] * self.inv_freq[None, :].float()  # (P, D/2)
        self.rope_cos, self.rope_sin = angles.cos().contiguous(), angles.sin().contiguous()

    def paged_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V caches as (num_pages, page_size, Hkv, D) views."""
        c, cache = self.config, self.cache
        shape = (cache.num_pages, cache.page_size, c.num_kv_heads, c.head_dim)
        return cache.k[layer].view(shape), cache.v[layer].view(shape)

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, batch: RaggedBatch) -> CudaAttentionPlan:
        if batch.positions:
            self.ensure_rope(max(batch.positions) + 1)
        sdpa_requests = self._sdpa_requests(batch)
        sdpa_groups = self._plan_sdpa(batch, sdpa_requests) if sdpa_requests else []
        self.num_sdpa_prefill_requests += len(sdpa_requests)
        paged = self.plan_paged(batch, exclude=sdpa_requests)
        return CudaAttentionPlan(
            paged=paged,
            positions=torch.tensor(batch.positions, dtype=torch.int32).to(self.device, non_blocking=True),
            write_slots=batch.write_slots.to(self.device, torch.int64, non_blocking=True),
            rope_cos=self.rope_cos, rope_sin=self.rope_sin, sdpa_groups=tuple(sdpa_groups))

    def plan_paged(self, batch: RaggedBatch, **options) -> PagedAttentionPlan:
        """`plan_attention` of the batch (sliding windows as masks); options go to plan_attention
        (exclude, split for CUDA graphs)."""
        c = self.config
        qo_indptr = [0]
        for n in batch.qo_lens:
            qo_indptr.append(qo_indptr[-1] + n)
        masks = batch.masks
        if c.sliding_window is not None:
            masks = self._sliding_window_masks(batch)
        has_masks = any(m is not None for m in masks)
        return self.kernels.plan_attention(
            qo_indptr, batch.page_indptr.tolist(), batch.page_ids.tolist(), batch.last_page_len,
            page_size=self.cache.page_size, num_q_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, masks=masks if has_masks else None, device=self.device,
            num_sms=self.num_sms, **options)

    def _sliding_window_masks(self, batch: RaggedBatch) -> list[BrleRows | None]:
        """BRLE rows for requests whose sequence is longer than the sliding window (else their mask)."""
        window = self.config.sliding_window
        masks = list(batch.masks)
        for r, (qo_len, kv_len) in enumerate(zip(batch.qo_lens, batch.kv_lens)):
            if masks[r] is not None or kv_len <= window:
                continue
            rows = []
            for i in range(qo_len):
                query = kv_len - qo_len + i  # sequence index of input token i
                first = max(0, query - window + 1)
                rows.append([0, first, query - first + 1, kv_len - query - 1])
            masks[r] = rows
        return masks

    def _sdpa_requests(self, batch: RaggedBatch) -> list[int]:
        """Requests for SDPA: default mask, KV sequence exactly its input tokens (within the sliding
        window), at least min_sdpa_prefill_tokens of them."""
        if self.min_sdpa_prefill_tokens is None:
            return []
        window = self.config.sliding_window
        chosen = []
        for r, (qo_len, kv_len, mask) in enumerate(zip(batch.qo_lens, batch.kv_lens, batch.masks)):
            if (mask is None and qo_len == kv_len and qo_len >= max(2, self.min_sdpa_prefill_tokens)
                    and (window is None or kv_len <= window)):
                chosen.append(r)
        return chosen

    def _plan_sdpa(self, batch: RaggedBatch, requests: list[int]) -> list[SdpaPrefillGroup]:
        ps = batch.page_size
        return plan_sdpa_prefill(
            [batch.starts[r] for r in requests], [batch.qo_lens[r] for r in requests],
            [sequence_slots(batch.pages[r], batch.qo_lens[r], ps) for r in requests], self.device)

    # ---- per layer --------------------------------------------------------------------------
    def attend(self, plan: CudaAttentionPlan, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.paged_cache(layer)
        q = self.kernels.rope_append_kv(q.contiguous(), k, v, plan.positions, plan.rope_cos, plan.rope_sin,
                                        k_cache, v_cache, plan.write_slots)  # attention reads q dense
        out = self.kernels.paged_attention(q, k_cache, v_cache, plan.paged, sm_scale=self.scale)  # (N, Hq, D)
        if plan.sdpa_groups:  # their rows of out are unwritten until here
            sdpa_prefill_attention(q, self.cache.k[layer], self.cache.v[layer], plan.sdpa_groups, self.scale, out)
        return out
