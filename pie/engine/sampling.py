"""Turning logits rows into what each output asked for (pie.engine.batch samplers).

Draws are inverse-CDF: a row's token is chosen by one uniform number u, drawn from a generator
seeded with the sampler's seed when it has one, so a seeded draw depends on (seed, logits row) only,
never on the rest of the batch.

Vocabulary masks (ForwardRequest.output_masks) are applied before any sampler: a forbidden token's
logit becomes -inf, so it has probability 0 under every sampler, logprob -inf, and raw logit -inf.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pie.engine.batch import Greedy, Logprobs, RawLogits, Sample, Sampler, SamplerOutput, TopKDistribution


def check_sampler(sampler: Sampler, vocab_size: int) -> str | None:
    """Returns what is wrong with the sampler's parameters, or None."""
    if isinstance(sampler, Sample):
        if not sampler.temperature >= 0:
            return f"temperature must be >= 0, got {sampler.temperature}"
        if sampler.top_k < 0:
            return f"top_k must be >= 0, got {sampler.top_k}"
        if not 0 < sampler.top_p <= 1:
            return f"top_p must be in (0, 1], got {sampler.top_p}"
        if not 0 <= sampler.min_p <= 1:
            return f"min_p must be in [0, 1], got {sampler.min_p}"
    elif isinstance(sampler, TopKDistribution):
        if not 1 <= sampler.k <= vocab_size:
            return f"k must be in [1, {vocab_size}], got {sampler.k}"
        if not sampler.temperature > 0:
            return f"temperature must be > 0, got {sampler.temperature}"
    elif isinstance(sampler, Logprobs):
        bad = [t for t in sampler.token_ids if not 0 <= t < vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
    elif not isinstance(sampler, (Greedy, RawLogits)):
        return f"unknown sampler {sampler!r}"
    return None


def check_vocab_mask(runs: Sequence[int], vocab_size: int) -> np.ndarray:
    """Validates a BRLE run list over the vocabulary; returns it as an (R,) int64 array.

    Runs alternate allowed / forbidden, starting with allowed (a first run of 0 forbids token 0);
    they must add up to exactly vocab_size and allow at least one token. Raises ValueError saying
    what is wrong. Cost: the list -> array conversion (about 20 us for 500 runs)."""
    r = np.asarray(runs)
    if r.ndim != 1 or r.size == 0:
        raise ValueError("must be a non-empty list of run lengths")
    if r.dtype.kind not in "iu":  # floats, bools and out-of-range ints (object arrays) are refused
        raise ValueError(f"run lengths must be integers, got {r.dtype} values")
    if r.dtype.kind == "i" and (r < 0).any():
        raise ValueError(f"run {int(np.argmax(r < 0))} is negative")
    if (r > vocab_size).any():  # also keeps the int64 sum below from wrapping around
        raise ValueError(f"run {int(np.argmax(r > vocab_size))} is longer than the vocabulary size {vocab_size}")
    total = int(r.sum(dtype=np.int64))
    if total != vocab_size:
        raise ValueError(f"runs add up to {total}, not the vocabulary size {vocab_size}")
    if not r[::2].any():  # the allowed runs are the even-indexed ones
        raise ValueError("no token is allowed")
    return r.astype(np.int64, copy=False)


def expand_vocab_mask(runs: Sequence[int], vocab_size: int) -> np.ndarray:
    """BRLE run list -> (vocab_size,) bool array, True = allowed (validated as check_vocab_mask).

    >>> expand_vocab_mask([0, 2, 1, 1], 4).tolist()
    [False, False, True, False]
    """
    r = check_vocab_mask(runs, vocab_size)
    values = np.zeros(r.size, dtype=np.bool_)  # (R,) run i is allowed iff i is even
    values[::2] = True
    return np.repeat(values, r)


def vocab_mask_bias(masks: Sequence[np.ndarray], vocab_size: int) -> torch.Tensor:
    """(K, vocab_size) float32: 0 where allowed, -inf where forbidden, from K validated run arrays
    (check_vocab_mask). Adding it to logits forbids tokens without a branchy masked write
    (masked_fill with a scattered mask costs ~200 us a 49k row on CPU; the add ~10 us).

    All K rows come from one np.repeat: each row's runs add up to vocab_size, so the runs of all
    rows, concatenated, expand to the K rows back to back."""
    runs = np.concatenate(masks)  # (sum R_k,)
    forbidden = np.concatenate([np.arange(m.size) & 1 for m in masks]).astype(np.bool_)  # odd runs of each row
    values = np.where(forbidden, np.float32(-np.inf), np.float32(0))  # (sum R_k,) float32
    return torch.from_numpy(np.repeat(values, runs).reshape(len(masks), vocab_size))


def apply_vocab_masks(logits: torch.Tensor, rows: Sequence[int], bias: torch.Tensor) -> None:
    """In place: logits[rows[i]] += bias[i], i.e. -inf wherever output i's mask forbids a token
    (allowed logits are unchanged: x + 0 == x).

    logits: (M, V) float32; rows: K distinct row indices; bias: (K, V) float32 from
    vocab_mask_bias (any device)."""
    rows = list(rows)
    bias = bias.to(logits.device, logits.dtype)
    with torch.inference_mode():  # the model's logits are inference tensors: update them in this mode
        if rows == list(range(rows[0], rows[0] + len(rows))):  # one slice (e.g. every output masked)
            logits[rows[0]:rows[0] + len(rows)].add_(bias)
        else:  # a plain add per row is ~4x faster on CPU than index_add_
            for i, r in enumerate(rows):
                logits[r].add_(bias[i])


def seeded_uniform(seed: int) -> float:
    g = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand((), generator=g, dtype=torch.float64).item()


class Sampling:
    """Applies samplers to logits. Holds the generator used for unseeded draws."""

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def uniform(self, seed: int | None) -> float:
        if seed is not None:
            return seeded_uniform(seed)
        return torch.rand((), generator=self.generator, dtype=torch.float64).item()

    def __call__(self, logits: torch.Tensor, samplers: list[Sampler]) -> list[SamplerOutput]:
        """logits: (M, V) float32, one row per sampler."""
        out: list[SamplerOutput | None] = [None] * len(samplers)
        greedy = [i for i, s in enumerate(samplers)
                  if isinstance(s, Greedy) or (isinstance(s, Sample) and s.temperature == 0)]
        if greedy:
            every_row = len(greedy) == len(samplers)
            if logits.device.type == "cpu":  # numpy's argmax (first index on ties, as torch's): 4 us a 49k
                rows = logits.numpy()  # row on these CPUs, torch's 60-90 us; (M, V) view
                ids = (rows if every_row else rows[greedy]).argmax(axis=-1).tolist()
            else:
                ids = (logits if every_row else logits[greedy]).argmax(dim=-1).tolist()
            for i, t in zip(greedy, ids):
                out[i] = t
        drawn = [i for i, s in enumerate(samplers) if isinstance(s, Sample) and s.temperature > 0]
        if drawn:
            for i, t in zip(drawn, self._draw(logits[drawn], [samplers[i] for i in drawn])):
                out[i] = t
        dist = [i for i, s in enumerate(samplers) if isinstance(s, TopKDistribution)]
        if dist:  # one softmax + topk over all such rows (k = the largest asked), then each row's first k
            temps = torch.tensor([samplers[i].temperature for i in dist], dtype=torch.float32)
            probs = torch.softmax(logits[dist] / temps[:, None], dim=-1)
            p, ids = probs.topk(max(samplers[i].k for i in dist), dim=-1)
            p, ids = p.tolist(), ids.tolist()
            for row, i in enumerate(dist):
                k = samplers[i].k
                out[i] = (ids[row][:k], p[row][:k])
        lps = [i for i, s in enumerate(samplers) if isinstance(s, Logprobs)]
        if lps:
            lp = torch.log_softmax(logits[lps], dim=-1)
            for row, i in enumerate(lps):
                out[i] = lp[row, list(samplers[i].token_ids)].tolist()
        for i, s in enumerate(samplers):
            if isinstance(s, RawLogits):
                out[i] = logits[i].clone()
        return out  # type: ignore[return-value]

    def _draw(self, logits: torch.Tensor, samplers: list[Sample]) -> list[int]:
        """logits: (R, V); every sampler has temperature > 0."""
        temps = torch.tensor([s.temperature for s in samplers], dtype=torch.float32)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)  # (R, V)
        u = torch.tensor([self.uniform(s.seed) for s in samplers], dtype=torch.float64)
        filtered = any(s.top_k > 0 or s.top_p < 1 or s.min_p > 0 for s in samplers)
        if filtered:
            if all(s.top_k > 0 for s in samplers):  # only the top max(k) can be kept: no full sort
                # (R, K) each, descending; a top-k past the vocabulary keeps all (as the CUDA sampler)
                probs, order = probs.topk(min(max(s.top_k for s in samplers), probs.shape[1]), dim=-1)
            else:
                probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (R, V) each
            keep = torch.ones_like(probs, dtype=torch.bool)
            rank = torch.arange(probs.shape[1])[None, :]
            top_k = torch.tensor([s.top_k if s.top_k > 0 else probs.shape[1] for s in samplers])[:, None]
            keep &= rank < top_k
            # top-p applies to what top-k kept, renormalised (as HF's warpers chain them)
            top_p = torch.tensor([s.top_p for s in samplers], dtype=torch.float32)[:, None]
            kept = probs * keep
            before = (torch.cumsum(kept, dim=-1) - kept) / kept.sum(dim=-1, keepdim=True)  # mass ranked above
            keep &= (before < top_p) | (rank == 0)
            min_p = torch.tensor([s.min_p for s in samplers], dtype=torch.float32)[:, None]
            keep &= probs >= min_p * probs[:, :1]
            probs = probs * keep
        cdf = torch.cumsum(probs.double(), dim=-1)  # (R, V)
        target = (u * cdf[:, -1])[:, None]
        idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
        # u < 1 keeps idx inside the support; rounding at the very top is clamped to the last kept token
        last_kept = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
        idx = torch.minimum(idx, last_kept)
        if filtered:
            idx = order.gather(1, idx[:, None]).squeeze(1)
        return idx.tolist()
