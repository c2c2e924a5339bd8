"""What a torch runner does without pie's kernels: the baselines the CUDA benchmarks time pie's kernels
against (benchmarks/cuda/bench_kernels.py, benchmarks/suite/bench_cuda.py). Imports torch only."""

from __future__ import annotations

import torch


def torch_filtered_sample(logits, t, k, p):
    """What a torch runner does: temperature, top-k, top-p by sort + cumsum, multinomial."""
    x = logits / t
    kth = torch.topk(x, k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    cum = probs.cumsum(-1)
    probs = probs.masked_fill(cum - probs > p, 0.0)
    choice = torch.multinomial(probs, 1)
    return order.gather(1, choice)
