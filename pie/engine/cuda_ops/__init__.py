"""CUDA kernels of the inference layer, one module per kernel file of csrc/kernels/cuda/:

- `attention` (attention.cu): `plan_attention` once per batch, `paged_attention` once per layer;
- `rope_norm` (rope_norm.cu): `rope_append_kv` (RoPE fused with the paged-KV write), `rms_norm`,
  `fused_add_rms_norm`;
- `sampling` (sampling.cu): `softmax`, `logsumexp`, `logprobs`, `argmax`, `sample`, `top_k_distribution`;
- `reference`: a PyTorch reference of every op above, with the same semantics (tests/cuda compares them);
- `_lib`: loading `pie._ext._kernels_cuda`, error codes, streams, argument checks.

Each launcher validates shapes, dtypes and devices, allocates its outputs, and calls the kernel on
the current CUDA stream. The module imports without the compiled kernels; `unavailable_reason` says why
they cannot run.

Example
-------
>>> from pie.engine import cuda_ops
>>> cuda_ops.available()  # doctest: +SKIP
True
"""

from pie.engine.cuda_ops._lib import CudaKernelsUnavailable, available, unavailable_reason
from pie.engine.cuda_ops.attention import (PREFILL_TILE, PagedAttentionPlan, decode_split, paged_attention,
                                           plan_attention)
from pie.engine.cuda_ops.rope_norm import fused_add_rms_norm, rms_norm, rope_append_kv
from pie.engine.cuda_ops.sampling import (MAX_TOP_K_DISTRIBUTION, argmax, logprobs, logsumexp, sample, softmax,
                                          top_k_distribution)

__all__ = [
    "CudaKernelsUnavailable",
    "available",
    "unavailable_reason",
    "PREFILL_TILE",
    "PagedAttentionPlan",
    "decode_split",
    "plan_attention",
    "paged_attention",
    "rope_append_kv",
    "rms_norm",
    "fused_add_rms_norm",
    "MAX_TOP_K_DISTRIBUTION",
    "softmax",
    "logsumexp",
    "logprobs",
    "argmax",
    "sample",
    "top_k_distribution",
]
