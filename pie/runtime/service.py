"""From forward commands (submitted by the C++ hot calls) to the model runner.

- `ForwardHandler`: the FORWARD handler of the control layer's engine loop (the default path:
  hot calls -> control queues -> batch scheduler -> engine loop -> ForwardHandler -> runner).
- `EngineService`: the fallback without the control layer: one thread drains the runtime's own C++ queue
  (`Host.take`, waiting without the GIL) and runs each batch as one `ModelRunner.execute`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pie.engine.batch import BatchError, ForwardRequest, Greedy, Logprobs, RawLogits, Sample, Sampler, TopKDistribution

log = logging.getLogger(__name__)


def to_sampler(spec: tuple) -> Sampler:
    """PendingCommand.outputs entry -> engine sampler."""
    _, kind, temperature, top_k, top_p, min_p, seed, token_ids, _ = spec
    if kind == 0:
        return Greedy()
    if kind == 1:
        return Sample(temperature, top_k, top_p, min_p, None if seed is None else seed & 0x7FFF_FFFF_FFFF_FFFF)
    if kind == 2:
        return TopKDistribution(top_k, temperature)
    if kind == 3:
        return Logprobs(tuple(token_ids))
    return RawLogits()


def to_output(spec: tuple, value: Any) -> tuple[list[int], list[float]]:
    """Engine sampler output -> WIT `output` (ids, values)."""
    kind = spec[1]
    if kind in (0, 1):
        return [int(value)], []
    if kind == 2:
        ids, probs = value
        return [int(i) for i in ids], [float(p) for p in probs]
    if kind == 3:
        return list(spec[7]), [float(v) for v in value]
    return [], value.float().tolist()


def to_request(c: Any, embeddings: Any = None) -> ForwardRequest:
    """PendingCommand -> ForwardRequest; `embeddings` (an EmbeddingTable) supplies input embeddings."""
    specs = c.outputs
    masks = [o[8] for o in specs]
    slots = c.embed_slots
    return ForwardRequest(token_ids=c.tokens, positions=c.positions, kv_page_ids=c.pages,
                          kv_last_page_len=c.last_page_len, mask=c.mask,
                          outputs=[(o[0], to_sampler(o)) for o in specs],
                          output_masks=masks if any(m is not None for m in masks) else None,
                          input_embeddings=None if slots is None else embeddings.read(slots))


class ForwardHandler:
    """Runs a batch of FORWARD payloads (addresses of the hot calls' commands) on the runner. A malformed
    request raises BatchError with its request_index: the engine loop fails that command alone."""

    def __init__(self, runner: Any, embeddings: Any = None):
        self.runner = runner
        self.embeddings = embeddings

    def execute(self, payloads: list) -> list:
        from pie._ext import _runtime

        commands = _runtime.commands_from_payloads(payloads)
        results = self.runner.execute([to_request(c, self.embeddings) for c in commands])
        for c, res in zip(commands, results):
            c.set_outputs([to_output(s, v) for s, v in zip(c.outputs, res.outputs)])
        return [None] * len(commands)


class CopyHandler:
    """Runs a batch of COPY_PAGES payloads (copy-on-write before a pass, kv.copy-tokens): every span of
    every command, in order, on the runner's KV cache."""

    def __init__(self, runner: Any):
        self.runner = runner

    def execute(self, payloads: list) -> list:
        from pie._ext import _runtime

        self.runner.cache.copy_spans(_runtime.copies_from_payloads(payloads))
        return [None] * len(payloads)


class EngineService:
    def __init__(self, runner: Any, host: Any, poll_interval: float = 0.1):
        self.runner = runner
        self.host = host
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_batches = 0
        self.num_commands = 0

    def start(self) -> "EngineService":
        self._thread = threading.Thread(target=self._loop, name="pie-engine-service", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.host.stop()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            commands = self.host.take(self.runner.max_batch_requests, self.runner.max_batch_tokens, self.poll_interval)
            if commands:
                self.run_batch(commands)

    def run_batch(self, commands: list) -> None:
        """Runs the commands as one forward pass; a malformed one fails alone and the rest run again."""
        live = list(commands)
        while live:
            try:
                results = self.runner.execute([to_request(c) for c in live])
            except BatchError as e:
                if 0 <= e.request_index < len(live) and e.field_name != "batch":
                    live.pop(e.request_index).fail(f"{e.field_name}: {str(e).split(': ', 2)[-1]}")
                    continue
                for c in live:
                    c.fail(str(e))
                return
            except Exception as e:  # the engine itself failed: every command of the batch learns why
                log.exception("forward pass failed")
                for c in live:
                    c.fail(f"the forward pass failed: {type(e).__name__}: {e}")
                return
            self.num_batches += 1
            self.num_commands += len(live)
            for c, res in zip(live, results):
                specs = c.outputs
                c.complete([to_output(s, v) for s, v in zip(specs, res.outputs)])
            return
