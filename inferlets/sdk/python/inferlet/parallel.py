"""Several contexts decoding together: their passes are in flight at once, so the server runs them in the
same batches, and the results are joined in order.

    branches = ctx.fork(4)
    texts = inferlet.gen_all(branches, "idea", max_tokens=32, temperature=0.8, seed=1)
"""

from __future__ import annotations

from typing import Optional, Sequence

import inferlet
from wit_world.imports import queues, types


def step_all(contexts: Sequence["inferlet.Context"], samplers: Sequence["inferlet.Sampler"]) -> list[list]:
    """One step of every context (`Context.step`), all submitted before any is waited on: one batch.
    Returns each context's outputs, one forward.Output per sampler (the same samplers for every context).

    >>> dists = inferlet.step_all(beams, [inferlet.top_k_distribution(4)])
    >>> best = [max(zip(d[0].values, d[0].ids)) for d in dists]
    """
    pending = [ctx.submit(samplers) for ctx in contexts]
    return [p.wait() for p in pending]


def gen_all(contexts: Sequence["inferlet.Context"], name: Optional[str] = None, max_tokens: int = 256, *,
            stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            min_p: float = 0.0, seed: Optional[int] = None, samplers: Optional[Sequence["inferlet.Sampler"]] = None,
            ignore_eos: bool = False, regex: Optional[str] = None) -> list[str]:
    """`gen` on every context at once: one generation stream each, on its own command queue, so the host
    decodes them in the same passes; returns the texts in order (and keeps each as its context's capture
    `name`). Context i draws with seed + i (a seed given), or with samplers[i].

    >>> a, b = ctx.fork(2)
    >>> inferlet.gen_all([a, b], "plan", max_tokens=24, temperature=0.7, seed=3)
    """
    if max_tokens <= 0:
        return [""] * len(contexts)
    if samplers is None:
        samplers = inferlet.samplers(len(contexts), temperature, seed, top_k=top_k, top_p=top_p, min_p=min_p)
    grammar = inferlet.Grammar.regex(regex) if regex is not None else None
    handles = [queues.create(types.Priority.NORMAL) for _ in contexts]
    matchers = [grammar.matcher() if grammar else None for _ in contexts]
    try:
        streams = [ctx.stream(max_tokens, s, stop, ignore_eos, matcher=m, queue=q)
                   for ctx, s, m, q in zip(contexts, samplers, matchers, handles)]
        texts = [stream.finish() for stream in streams]
    finally:
        for m in matchers:
            if m is not None:
                m.free()
        for q in handles:
            queues.destroy(q)
    if name is not None:
        for ctx, text in zip(contexts, texts):
            ctx.captures[name] = text
    return texts
