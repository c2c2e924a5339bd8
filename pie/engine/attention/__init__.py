"""Attention backends of the transformer forward: plan once per batch, run once per layer
(`base.AttentionBackend`).

- "torch" (`pytorch.PyTorchAttention`): PyTorch ops, SDPA and the CPU decode kernel; the reference,
  and what runs on the CPU and on CUDA devices the kernels do not cover;
- "cuda" (`cuda.CudaAttention`): pie's CUDA kernels (pie.engine.cuda_ops) with SDPA for fresh
  prompts; imported only when chosen.

>>> name, why_not_cuda = select_attention_backend(model_config, EngineConfig())  # doctest: +SKIP
>>> attention = create_attention_backend(name, model_config, cache)              # doctest: +SKIP
"""

from __future__ import annotations

import torch

from pie.engine.attention.base import AttentionBackend
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.kv_cache import PagedKVCache

BACKENDS = ("torch", "cuda")


def select_attention_backend(model_config: ModelConfig, engine_config: EngineConfig) -> tuple[str, str | None]:
    """The backend for this model on the configured device, and why the CUDA backend was passed over
    on a CUDA device (None when it was chosen, or the device is not a CUDA device)."""
    device = torch.device(engine_config.device)
    if device.type != "cuda":
        return "torch", None
    if not engine_config.cuda_kernels:
        return "torch", "turned off (EngineConfig.cuda_kernels=False)"
    from pie.engine.attention.cuda import cuda_unsupported_reason

    reason = cuda_unsupported_reason(model_config, engine_config.torch_dtype, device)
    return ("torch", reason) if reason else ("cuda", None)


def create_attention_backend(name: str, config: ModelConfig, cache: PagedKVCache, **options) -> AttentionBackend:
    """The backend called `name` over `cache`; options go to its constructor."""
    if name == "torch":
        from pie.engine.attention.pytorch import PyTorchAttention

        return PyTorchAttention(config, cache, **options)
    if name == "cuda":
        from pie.engine.attention.cuda import CudaAttention

        return CudaAttention(config, cache, **options)
    raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "BACKENDS", "create_attention_backend", "select_attention_backend"]
