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


def test_large_fp32_batches_fall_back_to_torch():
    x, w = torch.randn(65, 16), torch.randn(8, 16)
    assert not skinny_linear_supported(x, w) and not skinny_linear_supported(x[:LINEAR_MAX_ROWS + 1], w)
    assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("m", [9, 37, 130])
def test_bf16_kernel_serves_large_batches(m):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 576, generator=g).bfloat16(), torch.randn(1537, 576, generator=g).bfloat16()
    assert skinny_linear_supported(x, w)
    exact = F.linear(x.double(), w.double())
    assert ((linear(x, w).double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()


def test_non_contiguous_input_and_shape_errors():
    x = torch.randn(8, 3)[:, :2].T  # (2, 8) non-contiguous
    w = torch.randn(5, 8)
    assert torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        linear(torch.randn(1, 8), w, torch.randn(4))


def reference_decode(q, k_cache, v_cache, slot_lists, q_rows, scale):
    """Plain softmax attention per request, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    for row, slots in zip(q_rows, slot_lists):
        if len(slots) == 0:
            continue
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,lhd->hl", q[row].double(), k) * scale
        out[row] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 128), (8, 1, 72), (2, 2, 5)])
def test_decode_attention_matches_reference(dtype, tol, hq, hkv, d):
    from pie.engine.kernels import decode_attention

    g = torch.Generator().manual_seed(hq * 100 + d)
    num_slots = 300
    k_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
    lengths = [1, 0, 17, 250, 3]
    slot_lists = [torch.randperm(num_slots, generator=g)[:n] for n in lengths]
    q = torch.randn(7, hq, d, generator=g).to(dtype)
    q_rows = [6, 0, 2, 3, 5]
    out = torch.full_like(q, 7.0)
    indptr = torch.tensor([0] + lengths).cumsum(0)
    decode_attention(q, k_cache, v_cache, indptr, torch.cat(slot_lists), torch.tensor(q_rows), d ** -0.5, out)
    ref = reference_decode(q, k_cache, v_cache, slot_lists, q_rows, d ** -0.5)
    assert (out[q_rows].double() - ref[q_rows]).abs().max().item() <= tol
    assert (out[[1, 4]] == 7.0).all()  # rows of no request are untouched
    assert (out[0] == 0).all()  # a request with no slots attends to nothing


def test_decode_attention_rejects_bad_slots():
    from pie.engine.kernels import decode_attention

    q = torch.randn(1, 2, 8)
    cache = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="slot out of range"):
        decode_attention(q, cache, cache, torch.tensor([0, 2]), torch.tensor([3, 10]), torch.tensor([0]), 1.0,
                         torch.empty_like(q))
    with pytest.raises(ValueError, match="int64"):
        decode_attention(q, cache, cache, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3]),
                         torch.tensor([0]), 1.0, torch.empty_like(q))


@pytest.mark.parametrize("m,n", [(9, 4099), (33, 960), (64, 8193)])
def test_mid_sized_fp32_batches_through_the_transposed_product(m, n):
    g = torch.Generator().manual_seed(m + n)
    x, w, b = torch.randn(m, 576, generator=g), torch.randn(n, 576, generator=g), torch.randn(n, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    got = linear(x, w, b)
    assert got.shape == (m, n) and got.is_contiguous()
    assert (got.double() - ref).abs().max().item() <= 1e-4
