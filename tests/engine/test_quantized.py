"""GGUF quantized weights: the PyTorch dequantizer against gguf's, and the quantized linear kernel on
every instruction set this CPU runs against the dequantized weights in float64."""

import numpy as np
import pytest
import torch

from pie.engine.kernels import QUANTIZED_ISA_IDS, QUANTIZED_ISAS, linear, quantized_linear
from pie.engine.quantized import QUANT_TYPES, QuantizedWeight, dequantize_blocks

# fp16 scale fields per type: (byte offset in the block, magnitude) - random bytes elsewhere
_SCALE_FIELDS = {"Q8_0": [(0, 0.02)], "Q4_0": [(0, 0.02)], "Q4_1": [(0, 0.02), (2, 0.1)],
                 "Q4_K": [(0, 0.002), (2, 0.002)], "Q6_K": [(208, 0.001)]}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    """A (n, k) weight of random valid blocks: random quants, finite random scales."""
    _, values, nbytes = QUANT_TYPES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // values, nbytes), dtype=np.uint8)
    for offset, scale in _SCALE_FIELDS[qtype]:
        halves = (rng.uniform(-1, 1, (n, k // values)) * scale).astype(np.float16)
        raw[:, :, offset:offset + 2] = halves.view(np.uint8).reshape(n, k // values, 2)
    return QuantizedWeight(torch.from_numpy(raw.reshape(n, -1)), qtype, (n, k))


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_dequantize_matches_gguf(qtype):
    import gguf
    from gguf.quants import dequantize

    type_id, values, nbytes = QUANT_TYPES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (7, 3 * nbytes), dtype=np.uint8)  # any bytes, inf/nan too
    with np.errstate(all="ignore"):
        ref = dequantize(raw, gguf.GGMLQuantizationType(type_id))
    ours = dequantize_blocks(torch.from_numpy(raw), qtype).numpy()
    assert ours.shape == ref.shape == (7, 3 * values)
    np.testing.assert_array_equal(ours, ref)  # the same float32 arithmetic: bit-equal, nan where gguf's is


def test_quantize_round_trip_and_row_concatenation():
    import gguf

    w = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    parts = [QuantizedWeight(torch.from_numpy(gguf.quants.quantize(w[a:b], gguf.GGMLQuantizationType.Q4_1)), "Q4_1",
                             (b - a, 64)) for a, b in [(0, 2), (2, 6)]]
    fused = torch.cat(parts)
    assert isinstance(fused, QuantizedWeight) and fused.shape == (6, 64)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert (fused.dequantize() - torch.from_numpy(w)).abs().max() < 0.5  # 4 bits over the block's range
    mixed = torch.cat([parts[0], torch.ones(1, 64)])  # a dense part: everything dense
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed[2], torch.ones(64))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight(torch.zeros(2, 20, dtype=torch.uint8), "Q4_1", (2, 40))


def quantized_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's int16 activations, dequantized, and their scale per value: per block of 32 (zero
    padded), s = amax / 32767, xq = round(x * 32767 / amax)."""
    m, k = x.shape
    kp = (k + 31) // 32 * 32
    xb = torch.nn.functional.pad(x, (0, kp - k)).view(m, -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    s = amax / 32767.0
    xq = torch.round(xb * inv).clamp(-32767, 32767)
    return (xq * s).view(m, kp)[:, :k], s.expand_as(xb).reshape(m, kp)[:, :k]


ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in QUANTIZED_ISAS, reason=f"this CPU lacks {isa}"))
        for isa in QUANTIZED_ISA_IDS]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_quantized_linear_matches_reference(isa, qtype, m):
    values = QUANT_TYPES[qtype][1]
    n, k = (37, 3 * values) if values == 32 else (29, 768)  # K = 96: not a multiple of the 64-value chunk
    qw = random_blocks(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x, bias = torch.randn(m, k, generator=g) * 3, torch.randn(n, generator=g)
    x[0, :5] = 0  # a partly zero block
    w = qw.dequantize().double()
    y = quantized_linear(x, qw, bias, isa=isa)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # 1. what the kernel computes: the dequantized weight times the int16-quantized x, up to fp32 rounding
    xq, s = quantized_x(x)
    exact = xq.double() @ w.T + bias.double()
    assert ((y.double() - exact).abs() <= 1e-5 * (xq.double().abs() @ w.abs().T + 1)).all()
    # 2. the stated tolerance against the fp32 product: |error| <= sum_k |w[n, k]| * s_k / 2 (+ rounding)
    ref = x.double() @ w.T + bias.double()
    bound = (s.double() / 2) @ w.abs().T
    assert ((y.double() - ref).abs() <= bound * 1.001 + 1e-4).all()


def test_linear_dispatches_quantized_weights_and_checks_shapes():
    qw = random_blocks("Q4_1", 8, 64)
    x = torch.randn(2, 64)
    assert torch.equal(linear(x, qw), quantized_linear(x, qw))
    assert linear(x.bfloat16(), qw).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        quantized_linear(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="not available"):
        quantized_linear(x, qw, isa="sse2")
