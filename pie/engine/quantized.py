"""GGUF quantized weights kept packed: `QuantizedWeight` holds a linear layer's raw GGUF blocks and
dequantizes them in PyTorch (the reference of the CPU kernels, and the CUDA path at load).

Block layouts (ggml), per row of K values; a row is K / block_values blocks back to back, and fp16
fields are little-endian IEEE half:
- Q8_0 (32 values, 34 bytes): d fp16, q int8[32];                       w = d * q
- Q4_0 (32 values, 18 bytes): d fp16, qs u8[16];                        w = d * (q - 8)
- Q4_1 (32 values, 20 bytes): d fp16, m fp16, qs u8[16];                w = d * q + m
  (Q4_0/Q4_1: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble)
- Q4_K (256 values, 144 bytes): d fp16, dmin fp16, scales u8[12], qs u8[128]; 8 sub-blocks of 32 with
  6-bit scale sc and min mn packed in `scales`; w = d * sc * q - dmin * mn. Values 64c .. 64c + 31 are
  the low nibbles of qs[32c .. 32c + 31] (sub-block 2c), values 64c + 32 .. 64c + 63 their high nibbles.
- Q6_K (256 values, 210 bytes): ql u8[128], qh u8[64], scales int8[16], d fp16; 16 sub-blocks of 16;
  w = d * scale * (q - 32) with q 6 bits: 4 low bits from ql, 2 high bits from qh (see `_dequant_q6_k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# type name -> (GGML type id, values per block, bytes per block)
QUANT_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian halves -> (...) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) packed nibbles -> (..., 2n): the low nibbles, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, 0:2]) [:, None] * b[:, 2:].view(torch.int8).float()


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, 0:2])[:, None] * (_low_high(b[:, 2:]).float() - 8)


def _dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, 0:2])[:, None] * _low_high(b[:, 4:]).float() + _f16(b[:, 2:4])[:, None]


def k4_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's packed (B, 12) scales -> (B, 8) 6-bit scales and (B, 8) 6-bit mins, per sub-block j:
    j < 4: sc = s[j] & 63, mn = s[j + 4] & 63; j >= 4: the low 4 bits in s[j + 4] (scale: low nibble,
    min: high nibble) and the top 2 bits in the top bits of s[j - 4] (scale) and s[j] (min)."""
    s = scales.long()
    sc_lo, mn_lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], 1).float(), torch.cat([mn_lo, mn_hi], 1).float()


def _dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = k4_scales_mins(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()  # (B, sub-block, 32)
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * mn[:, :, None]).reshape(-1, 256)


def _dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    # Per half h (128 values): ql[64h .. 64h + 63], qh[32h .. 32h + 31]; for l < 32, the four values
    # 128h + 32t + l (t = 0..3) take the low 4 bits from ql[64h + l] low, ql[64h + 32 + l] low,
    # ql[64h + l] high, ql[64h + 32 + l] high nibble and the top 2 bits from bits 2t of qh[32h + l].
    ql = b[:, 0:128].reshape(-1, 2, 2, 32).long()  # (B, half, 2, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32).long()
    sc = b[:, 192:208].view(torch.int8).float()  # (B, 16): one per 16 values, in value order
    d = _f16(b[:, 208:210])
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # (B, half, t, 32)
    high = torch.cat([(qh >> 0) & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], dim=2)
    q = ((low | (high << 4)) - 32).float().reshape(-1, 16, 16)
    return (d[:, None, None] * sc[:, :, None] * q).reshape(-1, 256)


_DEQUANT = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q4_K": _dequant_q4_k,
            "Q6_K": _dequant_q6_k}


def dequantize_blocks(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """data: (..., B * block_bytes) uint8 rows of blocks -> (..., B * block_values) float32."""
    _, values, nbytes = QUANT_TYPES[qtype]
    lead = data.shape[:-1]
    blocks = data.reshape(-1, nbytes)
    return _DEQUANT[qtype](blocks).reshape(*lead, -1)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear layer's weight w (N, K) as raw GGUF blocks: data (N, K / block_values * block_bytes)
    uint8, row n holding w[n]'s blocks. `pie.engine.kernels.linear` multiplies by it on the CPU without
    unpacking it to memory; elsewhere it is dequantized (`dequantize`).

    >>> import numpy as np, gguf
    >>> w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    >>> raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    >>> qw = QuantizedWeight(torch.from_numpy(raw), "Q8_0", (3, 64))
    >>> float((qw.dequantize() - torch.from_numpy(w)).abs().max()) < 0.02
    True
    """

    data: torch.Tensor  # (N, row_bytes) uint8, contiguous
    qtype: str  # a key of QUANT_TYPES
    shape: tuple[int, int]  # (N, K) of the dense weight

    def __post_init__(self):
        if self.qtype not in QUANT_TYPES:
            raise ValueError(f"quantized weight type {self.qtype!r} is not supported ({', '.join(QUANT_TYPES)})")
        _, values, nbytes = QUANT_TYPES[self.qtype]
        n, k = self.shape
        if k % values or self.data.dtype != torch.uint8 or tuple(self.data.shape) != (n, k // values * nbytes):
            raise ValueError(f"{self.qtype} weight of shape {self.shape}: K must be a multiple of {values} and "
                             f"data ({n}, {k // values * nbytes}) uint8, got {tuple(self.data.shape)} "
                             f"{self.data.dtype}")
        if not self.data.is_contiguous():
            object.__setattr__(self, "data", self.data.contiguous())

    @property
    def dtype(self) -> str:
        return self.qtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight."""
        return dequantize_blocks(self.data, self.qtype).reshape(self.shape).to(dtype)

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The weight of rows w[index] (a row permutation or selection), still packed."""
        return QuantizedWeight(self.data[index].contiguous(), self.qtype, (len(index), self.shape[1]))

    def to(self, device=None, dtype=None) -> "QuantizedWeight | torch.Tensor":
        """Packed on the CPU (the kernels take any activation dtype); elsewhere dense in `dtype`: our
        CUDA path has no quantized matmul yet, so CUDA models dequantize their GGUF weights at load."""
        if device is None or torch.device(device).type == "cpu":
            return self
        return self.dequantize(dtype or torch.float32).to(device)

    def contiguous(self) -> "QuantizedWeight":
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.cat of weights along rows (the layer loader fuses q/k/v and gate/up this way): packed
        when every part is a QuantizedWeight of one type and K, else dense float32."""
        kwargs = kwargs or {}
        if func is not torch.cat or kwargs.get("dim", args[1] if len(args) > 1 else 0) != 0:
            return NotImplemented
        parts = list(args[0])
        first = parts[0]
        if all(isinstance(p, QuantizedWeight) and p.qtype == first.qtype and p.shape[1] == first.shape[1]
               for p in parts):
            return QuantizedWeight(torch.cat([p.data for p in parts]), first.qtype,
                                   (sum(p.shape[0] for p in parts), first.shape[1]))
        return torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p.float() for p in parts])
