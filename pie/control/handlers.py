"""What the batch loop runs for each command kind, on the model runner.

- FORWARD: a batch of `ForwardCommand`s (built and checked by the runtime's forward.submit, or by a
  Python client through `CommandQueue.submit_forward`) runs as one `ModelRunner.run`; each command gets
  its results written into it, and then its future completes.
- COPY_PAGES: every span of every `PageCopyCommand`, in order, on the runner's KV cache.

`to_request` is the one conversion between the control layer's command and the engine's request. The
runner does not check the requests again: a command was checked once, when it was submitted.

>>> handlers = forward_handlers(runner)                                      # doctest: +SKIP
>>> plane = ControlPlane.for_runner(runner, handlers=handlers)               # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from pie.control._control import CommandKind, ForwardCommand, PageCopyCommand, Sampler, SamplerKind
from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, SamplerOutput, TopKDistribution

_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF  # a WIT seed is a u64; the engine's generators take int64

# SamplerKind -> the engine's sampler of a command's output
_TO_SAMPLER: dict[SamplerKind, Callable[[Sampler], Any]] = {
    SamplerKind.GREEDY: lambda s: Greedy(),
    SamplerKind.SAMPLE: lambda s: Sample(s.temperature, s.top_k, s.top_p, s.min_p,
                                         None if s.seed is None else s.seed & _SEED_MASK),
    SamplerKind.TOP_K_DISTRIBUTION: lambda s: TopKDistribution(s.top_k, s.temperature),
    SamplerKind.LOGPROBS: lambda s: Logprobs(tuple(s.token_ids)),
    SamplerKind.RAW_LOGITS: lambda s: RawLogits(),
}

_NO_VALUES: list[float] = []

# SamplerKind -> (ids, values) of the engine's output, as the command's OutputValue holds it
_TO_RESULT: dict[SamplerKind, Callable[[Sampler, SamplerOutput], tuple[list[int], Any]]] = {
    SamplerKind.GREEDY: lambda s, token: ([int(token)], _NO_VALUES),
    SamplerKind.SAMPLE: lambda s, token: ([int(token)], _NO_VALUES),
    SamplerKind.TOP_K_DISTRIBUTION: lambda s, dist: (dist[0], dist[1]),
    SamplerKind.LOGPROBS: lambda s, logprobs: (s.token_ids, logprobs),
    SamplerKind.RAW_LOGITS: lambda s, logits: ([], logits.float().numpy()),
}


def to_request(command: ForwardCommand, embeddings: Any = None) -> ForwardRequest:
    """The engine's request for a command; `embeddings` (the runner's EmbeddingTable) supplies the rows
    of its input-embedding slots."""
    outputs = command.outputs
    slots = command.embed_slots
    masks = [o.vocab_mask for o in outputs]
    return ForwardRequest(token_ids=command.token_ids, positions=command.positions,
                          kv_page_ids=command.kv_page_ids, kv_last_page_len=command.kv_last_page_len,
                          mask=command.mask,
                          outputs=[(o.index, _TO_SAMPLER[o.sampler.kind](o.sampler)) for o in outputs],
                          output_masks=masks if any(m is not None for m in masks) else None,
                          input_embeddings=None if slots is None else embeddings.read(slots))


def write_results(command: ForwardCommand, outputs: list[SamplerOutput]) -> None:
    """The engine's outputs of a command (one per output, in order) into the command."""
    command.set_results([_TO_RESULT[o.sampler.kind](o.sampler, value) for o, value in zip(command.outputs, outputs)])


class ForwardHandler:
    """Runs a batch of FORWARD commands on the runner and writes each command's results into it.
    `lock` serialises the runner among the batch loops that share it (one per control plane)."""

    def __init__(self, runner: Any, lock: threading.Lock | None = None):
        self.runner = runner
        self.lock = lock or threading.Lock()

    def execute(self, commands: list[ForwardCommand]) -> list[None]:
        requests = [to_request(c, self.runner.embeddings) for c in commands]
        with self.lock:
            results = self.runner.run(requests)
        for command, result in zip(commands, results):
            write_results(command, result.outputs)
        return [None] * len(commands)


class CopyHandler:
    """Runs a batch of COPY_PAGES commands: every span of every command, in order, on the KV cache."""

    def __init__(self, runner: Any, lock: threading.Lock | None = None):
        self.runner = runner
        self.lock = lock or threading.Lock()

    def execute(self, commands: list[PageCopyCommand]) -> list[None]:
        with self.lock:
            for command in commands:
                self.runner.cache.copy_spans(command.spans)
        return [None] * len(commands)


def forward_handlers(runner: Any, lock: threading.Lock | None = None) -> dict[CommandKind, Any]:
    """The handlers of a control plane serving a model runner (one lock for both: they share the cache)."""
    lock = lock or threading.Lock()
    return {CommandKind.FORWARD: ForwardHandler(runner, lock), CommandKind.COPY_PAGES: CopyHandler(runner, lock)}
