"""The attention backend interface: plan once per batch, run once per layer.

The transformer's layer loop (pie.engine.transformer) calls, per batch, `plan(batch)` and then, per
layer, `attend(plan, layer, q, k, v)`, which applies RoPE to q and k at the batch's positions, writes
k and v into the layer's paged KV cache at the batch's write slots, and attends every input token over
its request's sequence. A backend also names the non-attention ops whose numerics go with it (`ops`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from pie.engine.config import ModelConfig
from pie.engine.kv_cache import PagedKVCache
from pie.engine.layer_ops import LayerOps
from pie.engine.ragged_batch import RaggedBatch


class AttentionBackend(ABC):
    """Attention over `cache` for a model of `config` (see the module doc)."""

    name: ClassVar[str]  # the registry's name of the backend ("torch", "cuda")

    def __init__(self, config: ModelConfig, cache: PagedKVCache, ops: LayerOps):
        self.config = config
        self.cache = cache
        self.ops = ops  # norms and linear layers of the layer loop on this backend
        self.device = cache.k.device
        self.scale = config.softmax_scale
        self.inv_freq = config.rope.inverse_frequencies(config.head_dim).to(self.device)  # (D/2,) float32 of config.rope (one table for every layer)

    @abstractmethod
    def plan(self, batch: RaggedBatch) -> Any:
        """This backend's plan of the batch (index tensors on the device, RoPE tables, who attends what),
        read by `attend` in every layer."""

    @abstractmethod
    def attend(self, plan: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (N, Hq, D), k, v: (N, Hkv, D) of the batch's input tokens, before RoPE (views of the fused
        qkv projection may be strided). Rotates q and k, writes k and v into layer `layer` of the cache
        at the batch's write slots, and returns the attention output (N, Hq, D), contiguous."""
