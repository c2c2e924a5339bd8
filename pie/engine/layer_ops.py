"""The non-attention ops of the transformer's layer loop, one set per attention backend.

The layer loop (pie.engine.transformer) is written once; where the two paths compute differently,
the difference is here:
- `LayerOps` (PyTorch, the reference): RMSNorm in float32 rounded as HF does, the residual add in
  the model dtype, linear layers through `pie.engine.kernels.linear` (an AVX2 streaming kernel for
  decode-sized CPU batches, torch otherwise);
- `CudaLayerOps`: our RMSNorm kernels (`fused_add_rms_norm` rounds x + residual to the model dtype
  before the norm, as HF does) and cuBLAS (torch) for the linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pie.engine.kernels import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., C). Normalised in float32, as HF does, then scaled by weight in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


class LayerOps:
    """PyTorch ops (CPU, and CUDA devices without our kernels). x, residual: (N, H) in the model dtype."""

    linear = staticmethod(linear)  # (M, K), (N, K) weight, optional (N,) bias -> (M, N)
    rms_norm = staticmethod(rms_norm)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x): the residual stream's next value and its norm."""
        residual = residual + x
        return rms_norm(residual, weight, eps), residual


class CudaLayerOps(LayerOps):
    """Our CUDA kernels (fp16/bf16). kernels: the module providing `rms_norm` and `fused_add_rms_norm`
    (pie.engine.cuda_ops, or a PyTorch stand-in in tests)."""

    linear = staticmethod(F.linear)

    def __init__(self, kernels):
        self.kernels = kernels

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: residual <- to_dtype(residual + x), x <- its norm. Returns (x, residual)."""
        return self.kernels.fused_add_rms_norm(x, residual, weight, eps)
