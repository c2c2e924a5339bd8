"""Samplers: frequencies match the target distribution; filters never yield excluded tokens;
seeds reproduce draws; the other outputs (top-k distribution, logprobs, raw logits)."""

import math

import pytest
import torch

from pie.engine.batch import Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.engine.sampling import Sampling, check_sampler

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])


def draw_many(sampler, n=12000, logits=LOGITS):
    s = Sampling(seed=123)
    rows = logits.expand(n, -1).contiguous()
    return torch.tensor(s(rows, [sampler] * n))


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    n = counts.sum().item()
    expected = probs * n
    support = expected > 0
    stat = (((counts[support] - expected[support]) ** 2) / expected[support]).sum().item()
    dof = int(support.sum().item()) - 1
    # 99.9% quantile of chi-square via Wilson-Hilferty
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_frequencies_match_softmax(temperature):
    tokens = draw_many(Sample(temperature=temperature))
    counts = torch.bincount(tokens, minlength=8).float()
    assert chi_square_ok(counts, torch.softmax(LOGITS / temperature, -1))


def test_frequencies_catch_a_wrong_distribution():
    tokens = draw_many(Sample(temperature=1.0))
    counts = torch.bincount(tokens, minlength=8).float()
    assert not chi_square_ok(counts, torch.softmax(LOGITS / 0.8, -1))


def test_top_k_top_p_min_p_exclude_and_renormalise():
    probs = torch.softmax(LOGITS, -1)
    order = probs.argsort(descending=True)
    # top-k 3: only the three most likely, in proportion
    tokens = draw_many(Sample(top_k=3))
    allowed = set(order[:3].tolist())
    assert set(tokens.tolist()) <= allowed
    target = torch.zeros(8)
    target[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
    assert chi_square_ok(torch.bincount(tokens, minlength=8).float(), target)
    # top-p 0.6: the smallest prefix of the ranking with mass >= 0.6
    cum = probs[order].cumsum(0)
    k = int((cum < 0.6).sum().item()) + 1
    assert set(draw_many(Sample(top_p=0.6)).tolist()) == set(order[:k].tolist())
    # min-p 0.3: tokens with prob >= 0.3 * max
    keep = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert set(draw_many(Sample(min_p=0.3)).tolist()) == keep
    # combined: the intersection
    both = set(draw_many(Sample(top_k=4, min_p=0.3, temperature=0.9)).tolist())
    assert both <= keep & set(order[:4].tolist())
    # top-p after top-k uses the mass of the kept tokens: top-4 renormalised, then 0.7 of it (3 tokens by the unnormalised mass, 2 by the kept mass)
    top4 = probs[order[:4]] / probs[order[:4]].sum()
    k = int((top4.cumsum(0) < 0.7).sum().item()) + 1
    assert k == 2
    assert set(draw_many(Sample(top_k=4, top_p=0.7)).tolist()) == set(order[:k].tolist())


def test_seed_reproduces_and_is_independent_of_the_batch():
    s = Sampling()
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    samplers = [Sample(temperature=1.0, seed=i) for i in range(5)]
    a = s(logits, samplers)
    b = Sampling()(logits, samplers)
    assert a == b
    # the same row alone, or among other rows, draws the same token
    for i in range(5):
        assert Sampling()(logits[i:i + 1], [samplers[i]]) == [a[i]]
    # different seeds give different draws (over many rows, with near-uniform logits)
    flat = torch.zeros(64, 1000)
    draws = Sampling()(flat, [Sample(seed=i) for i in range(64)])
    assert len(set(draws)) > 40


def test_greedy_topk_logprobs_raw():
    s = Sampling()
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS, LOGITS])
    out = s(logits, [Greedy(), Sample(temperature=0), TopKDistribution(k=3), Logprobs((0, 5))])
    assert out[0] == 0 and out[1] == 7
    ids, ps = out[2]
    assert ids == torch.softmax(LOGITS, -1).topk(3).indices.tolist()
    assert ps == pytest.approx(torch.softmax(LOGITS, -1).topk(3).values.tolist())
    assert out[3] == pytest.approx(torch.log_softmax(LOGITS, -1)[[0, 5]].tolist())
    [raw] = s(LOGITS[None], [RawLogits()])
    assert torch.equal(raw, LOGITS)


def test_bad_sampler_parameters_are_reported():
    assert "top_p" in check_sampler(Sample(top_p=0.0), 10)
    assert "temperature" in check_sampler(Sample(temperature=-1), 10)
    assert "min_p" in check_sampler(Sample(min_p=2), 10)
    assert "k must be" in check_sampler(TopKDistribution(k=0), 10)
    assert "outside the vocabulary" in check_sampler(Logprobs((10,)), 10)
    assert check_sampler(Sample(top_k=3, top_p=0.9, min_p=0.1), 10) is None


@pytest.mark.parametrize("top_k", [len(LOGITS), len(LOGITS) + 1, 2**31 - 1])
def test_a_top_k_past_the_vocabulary_keeps_every_token(top_k):
    """As the CUDA sampler: top-k >= vocabulary filters nothing (it once raised inside torch.topk, failing
    every other request of the batch)."""
    counts = torch.bincount(draw_many(Sample(top_k=top_k)), minlength=len(LOGITS))
    assert chi_square_ok(counts, torch.softmax(LOGITS, -1))
