"""What the batch loop runs for each command kind, on the model runner.

- FORWARD: a batch of `ForwardCommand`s (built and checked by the runtime's forward.submit, or by a
  Python client through `CommandQueue.submit_forward`) runs as one `ModelRunner.run`; each command gets
  the engine's outputs written into it (`ForwardCommand.write_outputs`), and then its future completes.
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
from pie.engine.batch import ForwardRequest, Greedy, Logprobs, RawLogits, Sample, TopKDistribution

_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF  # a WIT seed is a u64; the engine's generators take int64

_GREEDY, _RAW_LOGITS = Greedy(), RawLogits()  # immutable: one of each serves every output

# SamplerKind -> the engine's sampler of a command's output
_TO_SAMPLER: dict[SamplerKind, Callable[[Sampler], Any]] = {
    SamplerKind.GREEDY: lambda s: _GREEDY,
    SamplerKind.SAMPLE: lambda s: Sample(s.temperature, s.top_k, s.top_p, s.min_p,
                                         None if s.seed is None else s.seed & _SEED_MASK),
    SamplerKind.TOP_K_DISTRIBUTION: lambda s: TopKDistribution(s.top_k, s.temperature),
    SamplerKind.LOGPROBS: lambda s: Logprobs(tuple(s.token_ids)),
    SamplerKind.RAW_LOGITS: lambda s: _RAW_LOGITS,
}


def to_request(command: ForwardCommand, embeddings: Any = None) -> ForwardRequest:
    """The engine's request for a command; `embeddings` (the runner's EmbeddingTable) supplies the rows
    of its input-embedding slots."""
    fields = command.request_fields()
    fields["outputs"] = [(index, _TO_SAMPLER[sampler.kind](sampler)) for index, sampler in fields["outputs"]]
    slots = fields.pop("embed_slots")
    return ForwardRequest(**fields, input_embeddings=None if slots is None else embeddings.read(slots))


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
            command.write_outputs(result.outputs)
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
                command.done()
        return [None] * len(commands)


def forward_handlers(runner: Any, lock: threading.Lock | None = None) -> dict[CommandKind, Any]:
    """The handlers of a control plane serving a model runner (one lock for both: they share the cache)."""
    lock = lock or threading.Lock()
    return {CommandKind.FORWARD: ForwardHandler(runner, lock), CommandKind.COPY_PAGES: CopyHandler(runner, lock)}
