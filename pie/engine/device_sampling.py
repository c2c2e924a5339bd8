"""Samplers applied to logits that stay on the CUDA device (pie.engine.cuda_ops).

Greedy and Sample rows run in the sampling kernels, so only the chosen ids cross to the host; the
other samplers (TopKDistribution, Logprobs, RawLogits) copy just their rows to the host and go
through `pie.engine.sampling.Sampling`, the reference semantics.

A seeded Sample row is drawn by the kernel's counter-based generator from (seed, logits row) alone,
as on the CPU path, but not with the same uniform number: the CPU and CUDA paths draw from the same
distribution, not the same token.
"""

from __future__ import annotations

import torch

from pie.engine import cuda_ops
from pie.engine.batch import Greedy, Sample, Sampler, SamplerOutput
from pie.engine.sampling import Sampling


class DeviceSampling:
    def __init__(self, host: Sampling, kernels=cuda_ops):
        self.host = host  # holds the generator for unseeded draws, and runs the host-side samplers
        self.kernels = kernels

    def __call__(self, logits: torch.Tensor, samplers: list[Sampler]) -> list[SamplerOutput]:
        """logits: (M, V) float32 on the device, one row per sampler."""
        out: list[SamplerOutput | None] = [None] * len(samplers)
        greedy = [i for i, s in enumerate(samplers)
                  if isinstance(s, Greedy) or (isinstance(s, Sample) and s.temperature == 0)]
        drawn = [i for i, s in enumerate(samplers) if isinstance(s, Sample) and s.temperature > 0]
        on_device = set(greedy) | set(drawn)
        rest = [i for i in range(len(samplers)) if i not in on_device]
        dev = logits.device
        pending: list[tuple[list[int], torch.Tensor]] = []
        if greedy:  # torch's argmax (first index on ties, as the kernel): measured faster on H100
            pending.append((greedy, self._rows(logits, greedy).argmax(dim=-1)))
        if drawn:
            ss = [samplers[i] for i in drawn]
            seeds = torch.tensor([s.seed if s.seed is not None else self._fresh_seed() for s in ss],
                                 dtype=torch.int64)
            ids = self.kernels.sample(
                self._rows(logits, drawn),
                temperature=torch.tensor([s.temperature for s in ss], dtype=torch.float32, device=dev),
                top_k=torch.tensor([s.top_k for s in ss], dtype=torch.int32, device=dev),
                top_p=torch.tensor([s.top_p for s in ss], dtype=torch.float32, device=dev),
                min_p=torch.tensor([s.min_p for s in ss], dtype=torch.float32, device=dev),
                seeds=seeds.to(dev))
            pending.append((drawn, ids))
        for rows, ids in pending:  # one host sync per kind, after every kernel was queued
            for i, t in zip(rows, ids.tolist()):
                out[i] = int(t)
        if rest:
            host_out = self.host(logits[rest].cpu(), [samplers[i] for i in rest])
            for i, value in zip(rest, host_out):
                out[i] = value
        return out  # type: ignore[return-value]

    @staticmethod
    def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return logits[rows[0]:rows[0] + len(rows)]  # a contiguous slice: no gather
        return logits[torch.tensor(rows, device=logits.device)]

    def _fresh_seed(self) -> int:
        """A seed from the host generator (so a runner seed makes unseeded draws reproducible)."""
        return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=self.host.generator))
