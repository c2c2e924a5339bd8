"""Per-output vocabulary masks (ForwardRequest.output_masks): forbidden tokens get logit -inf before
every sampler. Each sampler kind is checked against a plain PyTorch reference computed from the
RawLogits of an unmasked run of the same tokens; malformed masks raise BatchError and the runner
stays usable."""

import math
import random

import numpy as np
import pytest
import torch

from pie.engine.batch import (BatchError, ForwardRequest, Greedy, Logprobs, RawLogits, Sample,
                              TopKDistribution)
from pie.engine.config import EngineConfig, ModelConfig
from pie.engine.runner import ModelRunner
from pie.engine.sampling import check_vocab_mask, expand_vocab_mask, vocab_mask_bias
from tiny_models import TINY, tiny_hf_model

V = TINY["vocab_size"]  # 211
PROMPT = [5, 17, 42, 99, 3]


def brle(allowed) -> list[int]:
    """Reference encoder: (V,) bools -> runs alternating allowed / forbidden, starting with allowed."""
    runs, value, n = [], True, 0
    for b in [bool(x) for x in allowed]:
        if b == value:
            n += 1
        else:
            runs.append(n)
            value, n = b, 1
    runs.append(n)
    return runs


def random_allowed(seed: int, p: float, vocab: int = V) -> torch.Tensor:
    """(vocab,) bool with about p of the tokens allowed, at least one."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(vocab, generator=g) < p
    allowed[torch.randint(0, vocab, (1,), generator=g)] = True
    return allowed


@pytest.fixture(scope="module")
def runner():
    hf, cfg = tiny_hf_model("llama", seed=3)
    return ModelRunner(ModelConfig.from_hf(cfg), hf.state_dict(), EngineConfig(num_pages=16, page_size=4))


def request(outputs, output_masks=None, ids=PROMPT, page=0):
    """One request over pages page, page + 1 as needed (page size 4, len(ids) <= 8); its outputs
    all at the last token."""
    n = len(ids)
    used = -(-n // 4)
    return ForwardRequest(list(ids), list(range(n)), list(range(page, page + used)), n - (used - 1) * 4,
                          outputs=[(n - 1, s) for s in outputs], output_masks=output_masks)


def reference_logits(runner, ids=PROMPT) -> torch.Tensor:
    """(V,) float32 logits of the last token, from an unmasked run."""
    [res] = runner.execute([request([RawLogits()], ids=ids)])
    return res.outputs[0]


def test_expand_vocab_mask_matches_reference():
    rng = random.Random(1)
    for vocab in (1, 2, 7, 211, 49152):
        for p in (0.0001, 0.3, 0.97):
            row = [rng.random() < p for _ in range(vocab)]
            row[rng.randrange(vocab)] = True
            runs = brle(row)
            got = expand_vocab_mask(runs, vocab)
            assert got.dtype == np.bool_ and got.shape == (vocab,)
            assert got.tolist() == row
    # a first run of 0 forbids token 0; trailing zero runs are allowed
    assert expand_vocab_mask([0, 1, 2, 1, 0], 4).tolist() == [False, True, True, False]
    assert expand_vocab_mask(np.array([3], dtype=np.uint32), 3).tolist() == [True] * 3


def test_bias_rows_equal_the_expanded_masks():
    rows = [random_allowed(s, p) for s, p in [(0, 0.5), (1, 0.01), (2, 0.99), (3, 0.3)]]
    rows[1][0] = False  # a leading forbidden run (first run 0)
    rows[2][0] = True
    bias = vocab_mask_bias([check_vocab_mask(brle(r), V) for r in rows], V)
    assert bias.shape == (4, V) and bias.dtype == torch.float32
    for r, b in zip(rows, bias):
        assert torch.equal(b == 0, r) and torch.isneginf(b[~r]).all()


@pytest.mark.parametrize("runs, words", [
    ([2, 2], "add up to 4, not the vocabulary size 5"),
    ([0, 5], "no token is allowed"),
    ([0, 2, 0, 3], "no token is allowed"),
    ([3, -1, 3], "run 1 is negative"),
    ([1.5, 3.5], "must be integers"),
    ([], "non-empty"),
    ([[5]], "non-empty list"),
    ([2**64, 5], "must be integers"),
    ([2**63, 2**63 + 5], "longer than the vocabulary"),
])
def test_expand_vocab_mask_errors(runs, words):
    with pytest.raises(ValueError, match=words):
        expand_vocab_mask(runs, 5)


def test_greedy_picks_the_argmax_among_allowed(runner):
    logits = reference_logits(runner)
    best = int(logits.argmax())
    for seed in range(6):
        allowed = random_allowed(seed, 0.2)
        allowed[best] = False  # so an ignored mask would be caught
        want = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        # greedy, and Sample with temperature 0 (which is greedy)
        [res] = runner.execute([request([Greedy(), Sample(temperature=0.0)], [brle(allowed)] * 2, page=2)])
        assert res.outputs == [want, want]
    # a mask allowing exactly one token forces it
    only = torch.zeros(V, dtype=torch.bool)
    only[7] = True
    [res] = runner.execute([request([Greedy()], [brle(only)], page=2)])
    assert res.outputs == [7]


def test_raw_logits_logprobs_and_top_k_distribution(runner):
    logits = reference_logits(runner)
    allowed = random_allowed(11, 0.05)
    n_allowed = int(allowed.sum())
    assert 3 <= n_allowed < 40
    ids = torch.nonzero(allowed).flatten().tolist()
    forbidden = torch.nonzero(~allowed).flatten()[:5].tolist()
    temperature = 0.8
    samplers = [RawLogits(), Logprobs(tuple(ids + forbidden)), TopKDistribution(n_allowed, temperature),
                TopKDistribution(n_allowed + 3)]
    [res] = runner.execute([request(samplers, [brle(allowed)] * len(samplers), page=4)])
    raw, lps, (top_ids, top_p), (wide_ids, wide_p) = res.outputs
    # raw: forbidden entries -inf, the others unchanged
    assert torch.isneginf(raw[~allowed]).all()
    assert torch.allclose(raw[allowed], logits[allowed], atol=1e-5)
    # logprobs: log_softmax over the allowed tokens only; forbidden ones -inf
    ref_lp = torch.log_softmax(logits[allowed], dim=-1)
    assert torch.allclose(torch.tensor(lps[:n_allowed]), ref_lp, atol=1e-5)
    assert all(x == -math.inf for x in lps[n_allowed:])
    # top-k distribution with k = #allowed: exactly the allowed tokens, softmax(logits / T) over them
    ref_p = torch.softmax(logits[allowed] / temperature, dim=-1)
    assert sorted(top_ids) == ids
    got = dict(zip(top_ids, top_p))
    assert torch.allclose(torch.tensor([got[i] for i in ids]), ref_p, atol=1e-6)
    assert abs(sum(top_p) - 1) < 1e-5
    # a k past the allowed count pads with forbidden tokens of probability 0
    assert set(wide_ids[:n_allowed]) == set(ids)
    assert all(p == 0 for p in wide_p[n_allowed:])
    assert not set(wide_ids[n_allowed:]) & set(ids)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at the 99.9% level (Wilson-Hilferty quantile) over the support of probs."""
    n = counts.sum().item()
    support = probs > 0
    expected = probs[support] * n
    stat = (((counts[support] - expected) ** 2) / expected).sum().item()
    dof = int(support.sum().item()) - 1
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit


def restricted_target(logits, allowed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """(V,) reference distribution: softmax over the allowed tokens, then top-k / top-p / min-p
    filters on it (top-p over the top-k-renormalised mass), renormalised."""
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")).double() / temperature, dim=-1)
    order = probs.argsort(descending=True, stable=True)
    keep = torch.zeros(V, dtype=torch.bool)
    k = top_k if top_k > 0 else V
    ranked = probs[order][:k]
    ranked = ranked / ranked.sum()
    before = ranked.cumsum(0) - ranked
    n_keep = int(((before < top_p) | (torch.arange(len(ranked)) == 0)).sum())
    keep[order[:n_keep]] = True
    keep &= probs >= min_p * probs.max()
    keep &= allowed
    target = probs * keep
    return (target / target.sum()).float()


@pytest.mark.parametrize("params", [dict(), dict(temperature=1.7), dict(top_k=4), dict(top_p=0.6),
                                    dict(min_p=0.25, temperature=0.9)])
def test_seeded_sample_never_yields_forbidden_and_matches_restricted_softmax(runner, params):
    logits = reference_logits(runner)
    # forbid the 3 most likely tokens and keep ~10 others, so the restricted distribution differs
    allowed = random_allowed(21, 0.06)
    allowed[logits.topk(3).indices] = False
    assert 5 <= int(allowed.sum()) <= 25
    n = 3000
    samplers = [Sample(seed=1000 + i, **params) for i in range(n)]
    [res] = runner.execute([request(samplers, [brle(allowed)] * n, page=6)])
    tokens = torch.tensor(res.outputs)
    assert allowed[tokens].all()
    target = restricted_target(logits, allowed, **params)
    counts = torch.bincount(tokens, minlength=V).float()
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(target).flatten().tolist())
    assert chi_square_ok(counts, target)
    # the unmasked distribution is rejected by the same test (the check has power)
    unrestricted = torch.softmax(logits.double() / params.get("temperature", 1.0), dim=-1).float()
    assert not chi_square_ok(counts, unrestricted)
    # seeded draws are reproducible, masks included
    [again] = runner.execute([request(samplers[:50], [brle(allowed)] * 50, page=6)])
    assert again.outputs == res.outputs[:50]


def test_mixed_batch_equals_requests_run_alone(runner):
    masks = [random_allowed(s, 0.1) for s in range(4)]
    ids_a, ids_b, ids_c = [1, 2, 3, 4, 5, 6], [9, 8, 7], [40, 41, 42, 43, 44, 45, 46, 47]

    def batch():
        a = request([Greedy(), RawLogits(), Sample(seed=5)], [brle(masks[0]), brle(masks[1]), brle(masks[2])],
                    ids=ids_a, page=8)
        b = request([Greedy(), RawLogits()], None, ids=ids_b, page=10)
        c = request([RawLogits(), Greedy(), Logprobs((0, 1, 2))], [None, brle(masks[3]), None], ids=ids_c, page=12)
        return [a, b, c]

    together = runner.execute(batch())
    alone = [runner.execute([r])[0] for r in batch()]
    for t, a in zip(together, alone):
        assert len(t.outputs) == len(a.outputs)
        for x, y in zip(t.outputs, a.outputs):
            if isinstance(x, torch.Tensor):
                finite = torch.isfinite(y)
                assert torch.equal(torch.isfinite(x), finite)
                assert torch.allclose(x[finite], y[finite], atol=1e-5)
            elif isinstance(x, list):
                assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
            else:
                assert x == y
    # the masked outputs respect their masks; the unmasked ones equal the unmasked reference
    assert masks[0][together[0].outputs[0]] and masks[2][together[0].outputs[2]]
    assert torch.isneginf(together[0].outputs[1][~masks[1]]).all()
    assert masks[3][together[2].outputs[1]]
    assert torch.isfinite(together[2].outputs[0]).all()
    assert torch.allclose(together[2].outputs[0], reference_logits(runner, ids_c), atol=1e-5)
    assert together[1].outputs[0] == int(reference_logits(runner, ids_b).argmax())
    # all-None masks are the same as no masks
    [none] = runner.execute([request([RawLogits()], [None], ids=ids_b, page=10)])
    assert torch.equal(none.outputs[0], runner.execute([request([RawLogits()], ids=ids_b, page=10)])[0].outputs[0])


BAD = {
    "wrong sum": ([[V - 1]], "output_masks[0]", f"add up to {V - 1}"),
    "too long": ([[V], [V, 1]], "output_masks[1]", f"add up to {V + 1}"),
    "nothing allowed": ([None, [0, V]], "output_masks[1]", "no token is allowed"),
    "negative run": ([[5, -1, V - 4]], "output_masks[0]", "negative"),
    "not integers": ([[float(V)]], "output_masks[0]", "integers"),
    "too few entries": ([], "output_masks", "0 masks for 1 outputs"),
    "too many entries": ([None, [V]], "output_masks", "2 masks for 1 outputs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_masks_raise_and_runner_survives(runner, case):
    masks, field, words = BAD[case]
    good = request([RawLogits()], ids=[3, 4], page=14)
    [before] = runner.execute([good])
    n_outputs = 2 if case in ("too long", "nothing allowed") else 1
    bad = request([Greedy()] * n_outputs, masks, page=12)
    with pytest.raises(BatchError) as e:
        runner.execute([good, bad])
    assert e.value.request_index == 1 and e.value.field_name == field
    assert words in str(e.value) and str(e.value).startswith(f"request 1: {field}: ")
    with pytest.raises(BatchError):
        runner.validate(bad, 1)
    [after] = runner.execute([good])
    assert torch.equal(before.outputs[0], after.outputs[0])
