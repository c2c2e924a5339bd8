"""What the batch loop runs for each command kind, on the model runner.

- FORWARD: a batch of `ForwardCommand`s (built and checked by the runtime's forward.submit, by a
  generation stream, or by a Python client through `CommandQueue.submit_forward`) is packed into one
  RaggedBatch (`pack_forward`, in C++) and runs as one `ModelRunner.run_batch`; the engine's outputs are
  written back into the commands (`write_batch_outputs`, in C++), and then their futures complete.
- COPY_PAGES: every span of every `PageCopyCommand`, in order, on the runner's KV cache.

`pack_forward` is the one conversion between the control layer's commands and the engine's batch: one
call per batch, no Python work per command. The runner does not check the batch again: a command was
checked once, when it was submitted.

>>> handlers = forward_handlers(runner)                                      # doctest: +SKIP
>>> plane = ControlPlane.for_runner(runner, handlers=handlers)               # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from pie.control import _control
from pie.control._control import Batch, CommandKind, ForwardCommand, PageCopyCommand, Sampler, SamplerKind
from pie.engine.batch import Greedy, Logprobs, RawLogits, Sample, TopKDistribution
from pie.engine.ragged_batch import RaggedBatch

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


def pack_forward(commands: Sequence[ForwardCommand] | Batch, page_size: int, embeddings: Any = None) -> RaggedBatch:
    """The commands (a list, or a whole Batch read in place) as the engine's one ragged batch, rows command
    after command; `embeddings` (the runner's EmbeddingTable) supplies the rows of the commands'
    input-embedding slots."""
    fields = _control.pack_forward(commands, page_size, _GREEDY, _to_sampler)
    fields["write_slots"] = torch.from_numpy(fields["write_slots"])
    embed = fields.pop("embed_slots")
    if embed is not None:  # (first row, slots) per command that reads input embeddings
        fields["embed_rows"] = torch.cat([torch.arange(row, row + len(slots)) for row, slots in embed])
        fields["embed_values"] = torch.cat([embeddings.read(slots) for _, slots in embed])
    return RaggedBatch.from_fields(fields)


def _to_sampler(sampler: Sampler) -> Any:
    return _TO_SAMPLER[sampler.kind](sampler)


class ForwardHandler:
    """Runs a batch of FORWARD commands on the runner and writes each command's results into it.
    `lock` serialises the runner among the batch loops that share it (one per control plane)."""

    def __init__(self, runner: Any, lock: threading.Lock | None = None):
        self.runner = runner
        self.lock = lock or threading.Lock()

    def execute(self, commands: list[ForwardCommand]) -> list[None]:
        self.execute_batch(commands)
        return [None] * len(commands)

    def execute_batch(self, commands: list[ForwardCommand] | Batch) -> None:
        """A list of commands, or the whole Batch (the batch loop's fast path: its commands are read in
        place, no Python object is made per command). The results are written into the commands."""
        packed = pack_forward(commands, self.runner.page_size, self.runner.embeddings)
        with self.lock:
            outputs = self.runner.run_batch(packed)
        _control.write_batch_outputs(commands, outputs)


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
