"""Custom attention masks (BRLE rows): a token hidden by the mask has no effect on the rows it is
hidden from; the expansion kernel against a Python reference."""

import random

import numpy as np
import pytest
import torch

from pie.engine.batch import ForwardRequest, RawLogits
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.kernels import MaskError, expand_brle
from pie.engine.runner import ModelRunner
from tiny_models import tiny_hf_model


def brle(row: list[bool]) -> list[int]:
    """Python reference encoder: runs alternate may-attend / hidden, starting with may-attend."""
    runs, value, n = [], True, 0
    for b in row:
        if b == value:
            n += 1
        else:
            runs.append(n)
            value, n = b, 1
    runs.append(n)
    return runs


def test_expand_brle_matches_reference_on_random_rows():
    rng = random.Random(0)
    for row_len in (0, 1, 7, 64, 333):
        rows = [[rng.random() < 0.6 for _ in range(row_len)] for _ in range(rng.randint(1, 9))]
        got = expand_brle([brle(r) for r in rows], row_len)
        assert got.shape == (len(rows), row_len)
        assert np.array_equal(got, np.array(rows, dtype=bool).reshape(len(rows), row_len))


def test_expand_brle_errors_name_the_row():
    with pytest.raises(MaskError) as e:
        expand_brle([[2, 1], [1, 1, 1, 1]], 3)
    assert e.value.row == 1
    with pytest.raises(MaskError) as e:
        expand_brle([[3], [2, -1, 2]], 3)
    assert e.value.row == 1
    with pytest.raises(MaskError):
        expand_brle([[1, 1]], 3)  # sums to 2, not 3


@pytest.fixture(scope="module")
def runner():
    hf, cfg = tiny_hf_model("qwen3")
    return ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=32, page_size=4))


def run(runner, ids, positions, pages, mask=None):
    n = len(ids)
    used = -(-n // 4)
    [res] = runner.execute([ForwardRequest(ids, positions, pages[:used], n - (used - 1) * 4, mask=mask,
                                           outputs=[(i, RawLogits()) for i in range(n)])])
    return torch.stack(res.outputs)


def test_hidden_tokens_have_no_effect(runner):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 211, (12,), generator=gen).tolist()
    hidden = {3, 4}
    rows = []
    for i in range(12):
        rows.append(brle([j <= i and not (i >= 5 and j in hidden) for j in range(12)]))
    masked = run(runner, ids, list(range(12)), [0, 1, 2], mask=rows)
    # the same tokens without the hidden ones, keeping their positions: rows 5.. must agree
    kept = [j for j in range(12) if j not in hidden]
    plain = run(runner, [ids[j] for j in kept], kept, [4, 5, 6])
    for out_row, j in enumerate(kept):
        if j >= 5:
            assert (masked[j] - plain[out_row]).abs().max().item() <= 1e-4
    # changing a hidden token changes nothing for the rows it is hidden from, but changes the rows that see it
    other = list(ids)
    other[3] = (ids[3] + 1) % 211
    masked2 = run(runner, other, list(range(12)), [8, 9, 10], mask=rows)
    assert torch.allclose(masked2[5:], masked[5:], atol=1e-5)
    assert not torch.allclose(masked2[3:5], masked[3:5], atol=1e-3)


def test_causal_mask_written_out_equals_default(runner):
    ids = torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(8)).tolist()
    default = run(runner, ids, list(range(9)), [12, 13, 14])
    explicit = run(runner, ids, list(range(9)), [15, 16, 17], mask=[[i + 1, 8 - i] for i in range(9)])
    assert (default - explicit).abs().max().item() <= 1e-5
