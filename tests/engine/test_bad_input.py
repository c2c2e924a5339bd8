"""Malformed batches raise a BatchError naming the request and the field, and the runner stays
usable for the next batch."""

import pytest
import torch

from pie.engine.batch import BatchError, ForwardRequest, Greedy, RawLogits, Sample
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.runner import ModelRunner
from tiny_models import tiny_hf_model


@pytest.fixture(scope="module")
def tiny():
    hf, cfg = tiny_hf_model("llama")
    return ModelConfig.from_hf(cfg), hf.state_dict()


@pytest.fixture(scope="module")
def runner(tiny):
    return ModelRunner(*tiny, EngineConfig(num_pages=8, page_size=4))


def good(ids=(5, 6, 7)):
    return ForwardRequest(list(ids), list(range(len(ids))), [0], len(ids), outputs=[(len(ids) - 1, RawLogits())])


BAD = {
    "page out of range": (dict(kv_page_ids=[0, 8], kv_last_page_len=1, token_ids=[1] * 5, positions=list(range(5))),
                          "kv_page_ids", "page id 8"),
    "lengths differ": (dict(positions=[0, 1]), "positions", "2 positions for 3 tokens"),
    "token >= vocab": (dict(token_ids=[5, 211, 7]), "token_ids", "token id 211"),
    "negative token": (dict(token_ids=[5, -1, 7]), "token_ids", "token id -1"),
    "empty": (dict(token_ids=[], positions=[], outputs=[]), "token_ids", "empty request"),
    "mask rows": (dict(mask=[[3], [3]]), "mask", "2 rows for 3 tokens"),
    "mask runs": (dict(mask=[[1, 2], [2, 1], [2, 2]]), "mask", "row 2"),
    "last page len": (dict(kv_last_page_len=5), "kv_last_page_len", "not in [1, 4]"),
    "sequence too short": (dict(kv_last_page_len=2), "kv_page_ids", "fewer than the 3 input tokens"),
    "output index": (dict(outputs=[(3, Greedy())]), "outputs", "input index 3"),
    "sampler": (dict(outputs=[(0, Sample(top_p=1.5))]), "outputs", "top_p"),
    "write slot": (dict(write_slots=[0, 1, 32]), "write_slots", "slot 32"),
    "no pages": (dict(kv_page_ids=[]), "kv_page_ids", "no KV pages"),
    "negative position": (dict(positions=[0, -1, 2]), "positions", "position -1 is negative"),
    "position past the model": (dict(positions=[0, 1, 2**32 - 1]), "positions", f"position {2**32 - 1} is past"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_named_and_runner_survives(runner, case):
    changes, field, words = BAD[case]
    [before] = runner.execute([good()])
    req = good()
    for k, v in changes.items():
        setattr(req, k, v)
    with pytest.raises(BatchError) as e:
        runner.execute([good((1, 2)), req])
    assert e.value.request_index == 1
    assert e.value.field_name == field
    assert words in str(e.value) and "request 1" in str(e.value)
    [after] = runner.execute([good()])
    assert torch.equal(before.outputs[0], after.outputs[0])


def test_batch_limits(tiny):
    small = ModelRunner(*tiny, EngineConfig(num_pages=8, page_size=4, max_batch_tokens=4))
    with pytest.raises(BatchError, match="max_batch_tokens"):
        small.execute([good(), good((1, 2))])
    assert small.execute([good()])[0].outputs

