"""Python launchers of the CPU kernels in pie._ext._kernels_cpu: they check shapes and dtypes,
allocate outputs, and turn error codes into exceptions."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pie._ext import _kernels_cpu
from pie.engine.quantized import QUANT_TYPES, QuantizedWeight

_ERRORS = {1: "bad argument", 2: "runs do not add up to the row length", 3: "a run is negative"}


class MaskError(ValueError):
    def __init__(self, row: int, message: str):
        super().__init__(f"row {row}: {message}")
        self.row = row


def expand_brle(rows: Sequence[Sequence[int]], row_len: int) -> np.ndarray:
    """Expand BRLE rows (runs alternating may-attend / hidden, starting with may-attend) into a
    (len(rows), row_len) bool array.

    >>> expand_brle([[2, 3, 1]], 6).astype(int).tolist()
    [[1, 1, 0, 0, 0, 1]]
    """
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    try:
        runs = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))
    except (TypeError, ValueError, OverflowError) as e:
        raise MaskError(0, f"runs must be integers ({e})") from None
    out = np.empty((len(rows), row_len), dtype=np.uint8)
    err, bad_row = _kernels_cpu.expand_brle(runs.ctypes.data, offsets.ctypes.data, len(rows), row_len,
                                            out.ctypes.data)
    if err:
        raise MaskError(bad_row, f"{_ERRORS.get(err, f'error {err}')} ({row_len})")
    return out.view(np.bool_)


def _cpu_has_avx2() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or capability.startswith("AVX512")


HAS_AVX2 = _cpu_has_avx2()  # the linear and decode-attention kernels are AVX2 + FMA code
_LINEAR_KERNELS = {torch.float32: _kernels_cpu.linear_f32, torch.bfloat16: _kernels_cpu.linear_bf16} if HAS_AVX2 else {}
# Up to how many rows the streaming kernel beats torch: fp32 BLAS wins beyond decode sizes; bf16
# matmul without native bf16 arithmetic (AVX2) is slower than the kernel at every size.
_LINEAR_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 1 << 62}
LINEAR_MAX_ROWS = 8  # decode-sized batches: every dtype's linear layers run in the kernel up to here

_skinny_linear_enabled = True


def set_skinny_linear(enabled: bool) -> None:
    """Turns the streaming linear kernel on or off (off: torch for every shape; for comparisons)."""
    global _skinny_linear_enabled
    _skinny_linear_enabled = enabled


def linear_kernel_max_rows(dtype) -> int:
    """Batches of at most this many rows run their linear layers in the streaming kernel (0: never)."""
    return _LINEAR_MAX_ROWS.get(dtype, 0) if _skinny_linear_enabled and HAS_AVX2 else 0


def skinny_linear_supported(x, w) -> bool:
    """Whether `linear` runs x (M, K) @ w (N, K)^T in the streaming kernel (CPU, contiguous, few rows)."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= linear_kernel_max_rows(x.dtype)
            and w.dtype == x.dtype and x.device.type == "cpu" and w.is_contiguous())


# Between decode sizes and large batches, BLAS here computes y^T = w @ x^T 10-25% faster than
# y = x @ w^T (w streams as the row-major operand), and a large w (the LM head) faster still in row
# chunks that stay in cache: 19 ms instead of 30-34 ms for (32, 576) @ (49152, 576)^T.
_TRANSPOSED_MAX_ROWS = 64
_TRANSPOSED_CHUNK_ROWS = 4096


def _linear_transposed(x, w, bias):
    """x: (M, K) float32, w: (N, K) -> (M, N), through y^T = w @ x^T in row chunks of w."""
    n = w.shape[0]
    y_t = torch.empty((n, x.shape[0]), dtype=x.dtype)
    xt = x.t()
    for start in range(0, n, _TRANSPOSED_CHUNK_ROWS):
        torch.mm(w[start:start + _TRANSPOSED_CHUNK_ROWS], xt, out=y_t[start:start + _TRANSPOSED_CHUNK_ROWS])
    y = y_t.t().contiguous()
    return y if bias is None else y.add_(bias)


def linear(x, w, bias=None):
    """y = x @ w.T + bias, like torch.nn.functional.linear; on the CPU, x of at most
    `linear_kernel_max_rows(x.dtype)` rows goes to the streaming kernel, anything else to torch.

    x: (M, K); w: (N, K) contiguous; bias: (N,) or None. Returns (M, N) in x's dtype.

    >>> import torch
    >>> x, w = torch.randn(2, 40), torch.randn(24, 40)
    >>> torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
    True

    w may be a QuantizedWeight (GGUF blocks): then `quantized_linear` multiplies.
    """
    if isinstance(w, QuantizedWeight):
        return quantized_linear(x, w, bias)
    if not skinny_linear_supported(x, w):
        if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] <= _TRANSPOSED_MAX_ROWS:
            return _linear_transposed(x, w, bias)
        return torch.nn.functional.linear(x, w, bias)
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or (bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype)):
        raise ValueError(f"linear: x {tuple(x.shape)}, w {tuple(w.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    y = torch.empty((m, n), dtype=x.dtype)
    bias_ptr = 0 if bias is None else bias.contiguous().data_ptr()
    err = _LINEAR_KERNELS[x.dtype](x.data_ptr(), w.data_ptr(), bias_ptr, y.data_ptr(), m, n, k)
    if err:
        raise ValueError(f"linear: kernel error {err} for x {tuple(x.shape)}, w {tuple(w.shape)}")
    return y


# Instruction sets of the quantized linear kernel (csrc/kernels/cpu/quantized_linear.h: QuantIsa), and those
# this CPU runs (best last); `quantized_linear(..., isa=...)` forces one (tests).
QUANTIZED_ISA_IDS = {"avx2": 1, "avx512": 2}
QUANTIZED_ISAS = [name for name, i in QUANTIZED_ISA_IDS.items()
                  if HAS_AVX2 and _kernels_cpu.quantized_isas() & (1 << i)]


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                     isa: str | None = None) -> torch.Tensor:
    """y = x @ dequant(w).T + bias with w kept packed (GGUF blocks), on the CPU.

    x: (M, K) any float dtype (computed in float32, x quantized to int16 per block of 32 for integer
    dot products: |y - x @ dequant(w).T| <= sum_k |dequant(w)[n, k]| * s_k / 2 plus fp32 rounding, s_k
    the scale amax / 32767 of x's block holding k). w: QuantizedWeight (N, K). bias: (N,) or None.
    Returns (M, N) in x's dtype. isa: one of QUANTIZED_ISAS (None: the best). Without AVX2, or off
    the CPU, w is dequantized and torch multiplies.

    >>> import numpy as np, gguf
    >>> from pie.engine.quantized import QuantizedWeight
    >>> w = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    >>> qw = QuantizedWeight(torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)), "Q8_0", (5, 64))
    >>> x = torch.randn(2, 64)
    >>> bool((quantized_linear(x, qw) - x @ qw.dequantize().T).abs().max() < 1e-3)
    True
    """
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(f"quantized_linear: x {tuple(x.shape)}, w {w.shape}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    if not QUANTIZED_ISAS or x.device.type != "cpu" or w.device.type != "cpu":
        return torch.nn.functional.linear(x, w.dequantize(x.dtype).to(x.device), bias)
    if isa is not None and isa not in QUANTIZED_ISAS:
        raise ValueError(f"quantized_linear: instruction set {isa!r} not available here ({', '.join(QUANTIZED_ISAS)})")
    xf = x.float().contiguous()
    bf = None if bias is None else bias.float().contiguous()
    y = torch.empty((x.shape[0], n), dtype=torch.float32)
    if x.shape[0]:
        err = _kernels_cpu.quantized_linear(QUANT_TYPES[w.qtype][0], xf.data_ptr(), w.data.data_ptr(),
                                            0 if bf is None else bf.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                                            QUANTIZED_ISA_IDS[isa] if isa else 0)
        if err:
            raise ValueError(f"quantized_linear: kernel error {err} for x {tuple(x.shape)}, {w.qtype} w {w.shape}")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def decode_attention_supported(dtype, device) -> bool:
    return HAS_AVX2 and dtype in (torch.float32, torch.bfloat16) and torch.device(device).type == "cpu"


def decode_attention(q, k_cache, v_cache, kv_indptr, kv_slots, q_rows, scale: float, out) -> None:
    """Attention of one query row per request over its cache slots, in place (no gather).

    q, out: (N, Hq, D); k_cache, v_cache: (slots, Hkv, D), all contiguous, fp32 or bf16.
    kv_indptr: (R + 1,) int64; kv_slots: (kv_indptr[-1],) int64; q_rows: (R,) int64.
    Writes out[q_rows[r]] for every request r.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.dtype != q.dtype or not t.is_contiguous() or t.dim() != 3:
            raise ValueError(f"decode_attention: {name} must be a contiguous 3-d {q.dtype} tensor")
    for name, t in (("kv_indptr", kv_indptr), ("kv_slots", kv_slots), ("q_rows", q_rows)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"decode_attention: {name} must be a contiguous int64 tensor")
    r = q_rows.numel()
    if kv_indptr.numel() != r + 1 or k_cache.shape != v_cache.shape or q.shape != out.shape:
        raise ValueError("decode_attention: shapes do not fit")
    err = _kernels_cpu.decode_attention(q.dtype == torch.bfloat16, q.data_ptr(), k_cache.data_ptr(),
                                        v_cache.data_ptr(), kv_indptr.data_ptr(), kv_slots.data_ptr(),
                                        q_rows.data_ptr(), r, k_cache.shape[0], q.shape[1], k_cache.shape[1],
                                        q.shape[2], float(scale), out.data_ptr())
    if err:
        raise ValueError(f"decode_attention: kernel error {err} (a slot out of range or a bad size)")
