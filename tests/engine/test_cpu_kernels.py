"""The skinny linear kernel against torch at awkward sizes, fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from pie.engine.kernels import LINEAR_MAX_ROWS, linear, skinny_linear_supported

SHAPES = [(1, 1, 1), (1, 7, 13), (2, 33, 100), (3, 49152, 576), (4, 1536, 576), (5, 577, 1536), (8, 111, 8),
          (LINEAR_MAX_ROWS, 960, 576)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_f32_matches_torch(m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    assert skinny_linear_supported(x, w)
    got = linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * (k ** 0.5) * 4


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_linear_bf16_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(n + k)
    x, w, b = (torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16(),
               torch.randn(n, generator=g).bfloat16())
    got = linear(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())
    assert got.dtype == torch.bfloat16
    # one rounding of an fp32 sum: within one bf16 ulp (2^-8 relative) of the exact value
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()


def test_larger_batches_fall_back_to_torch():
    x, w = torch.randn(LINEAR_MAX_ROWS + 1, 16), torch.randn(8, 16)
    assert not skinny_linear_supported(x, w)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_non_contiguous_input_and_shape_errors():
    x = torch.randn(8, 3)[:, :2].T  # (2, 8) non-contiguous
    w = torch.randn(5, 8)
    assert torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        linear(torch.randn(1, 8), w, torch.randn(4))
