"""The batch loop: one thread that takes batches from the scheduler and runs them.

It waits in `Scheduler.take` with the GIL released, hands the batch's payloads to the handler of the
batch's kind (for forward passes, pie.control.handlers.ForwardHandler over the model runner), and
resolves every command's future with its result or its own error. Python sees batches, never single
calls.

>>> loop = BatchLoop(scheduler, forward_handlers(runner))              # doctest: +SKIP
>>> with loop:                                                         # doctest: +SKIP
...     queue.submit_forward(command, limits).result()
"""

from __future__ import annotations

import bisect
import logging
import threading
import traceback
from typing import Any, Callable, Mapping, Protocol, Sequence, Union

from pie.control._control import Batch, Scheduler

log = logging.getLogger(__name__)

# Upper bounds of the batch-size histogram every loop keeps (pie_batch_size in docs/metrics.md).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class BatchHandler(Protocol):
    """What runs one kind of command (pie.control.handlers has those of the model runner).

    `execute` returns one result per payload, in order. It may raise an exception with a
    `request_index` attribute (like pie.engine.batch.BatchError) to reject one payload; that command
    fails with the message and the others are run again without it.

    A handler may also have `execute_batch(batch)`, given the whole Batch first (it reads the payloads
    itself, e.g. in C++, with no Python object per command). It returns one result per payload, or None
    when it wrote every command's results into the command itself (each completes with no result). If it
    raises, the batch runs through `execute` as above, which attributes the failure.
    """

    def execute(self, payloads: list[Any]) -> Sequence[Any]: ...


Handler = Union[BatchHandler, Callable[[list[Any]], Sequence[Any]]]


class BatchLoop:
    """Runs batches from `scheduler` on `handlers[batch.kind]` on one thread (or step by step)."""

    def __init__(self, scheduler: Scheduler, handlers: Mapping[int, Handler], *, name: str = "pie-batch-loop",
                 poll_interval: float = 0.05):
        self.scheduler = scheduler
        self._execute: dict[int, Callable[[list[Any]], Sequence[Any]]] = {
            int(kind): (handler.execute if hasattr(handler, "execute") else handler)
            for kind, handler in handlers.items()
        }
        self._execute_batch: dict[int, Callable[[Batch], Sequence[Any] | None]] = {
            int(kind): handler.execute_batch for kind, handler in handlers.items() if hasattr(handler, "execute_batch")
        }
        self._name = name
        self._poll_interval = poll_interval
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.num_batches = 0
        self.num_commands = 0
        self.batch_sizes: list[int] = []  # size of every batch run, in order (for tests and benchmarks)
        self.record_batch_sizes = False
        # kind -> batches per size bucket (BATCH_SIZE_BUCKETS, then larger), and the sum of their sizes:
        # what pie_batch_size reports (one increment per batch)
        self.batch_size_counts: dict[int, list[int]] = {}
        self.batch_size_sums: dict[int, int] = {}

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "BatchLoop":
        if self._thread is not None:
            raise RuntimeError("the batch loop is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the thread after the batch it is running; the scheduler stays usable."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the batch loop did not stop within {timeout} s")
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "BatchLoop":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set() and not self.scheduler.stopped:
            self.run_once(self._poll_interval)

    # ---- one batch --------------------------------------------------------------------------
    def run_once(self, timeout: float | None = None) -> Batch | None:
        """Takes one batch (waiting up to `timeout`), runs it and resolves its futures."""
        batch = self.scheduler.take(timeout)
        if batch is None:
            return None
        self.run_batch(batch)
        return batch

    def run_batch(self, batch: Batch) -> None:
        n = len(batch)
        self.num_batches += 1
        self.num_commands += n
        if self.record_batch_sizes:
            self.batch_sizes.append(n)
        kind = batch.kind
        counts = self.batch_size_counts.get(kind)
        if counts is None:
            counts = self.batch_size_counts[kind] = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
            self.batch_size_sums[kind] = 0
        counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, n)] += 1
        self.batch_size_sums[kind] += n
        try:
            execute = self._execute.get(batch.kind)
            if execute is None:
                batch.fail_unresolved(f"no handler for command kind {batch.kind}")
                return
            if not self._run_whole(batch):
                self._run_on(execute, batch)
        except BaseException as error:  # the loop survives; every future learns what happened
            # the traceback as text: a log record that kept the exception would keep its frames, and with
            # them the batch's commands and the pages they pin, for as long as a handler keeps records
            log.error("batch loop: batch of kind %d failed\n%s", batch.kind, traceback.format_exc())
            batch.fail_unresolved(f"engine error: {type(error).__name__}: {error}")
            if not isinstance(error, Exception):
                raise
        finally:
            batch.finish()

    def _run_whole(self, batch: Batch) -> bool:
        """The handler's execute_batch over the whole batch; False when it has none or it raised (then the
        batch runs through execute, which attributes the failure to its command)."""
        execute_batch = self._execute_batch.get(batch.kind)
        if execute_batch is None:
            return False
        try:
            results = execute_batch(batch)
        except Exception:
            return False
        if results is None:  # the results are in the commands
            batch.complete_all()
            return True
        if len(results) != len(batch):
            return False
        batch.complete(results, list(range(len(batch))))
        return True

    @staticmethod
    def _run_on(execute: Callable[[list[Any]], Sequence[Any]], batch: Batch) -> None:
        """Runs the batch; a failure the handler attributes to one command (`request_index`) fails that
        command and the rest run again. A failure it cannot attribute, in a batch of several commands
        (from many instances), runs each command alone: one tenant's bad command fails only itself."""
        payloads = batch.payloads
        indices = list(range(len(payloads)))
        while indices:
            try:
                results = execute([payloads[i] for i in indices])
            except Exception as error:
                bad = getattr(error, "request_index", None)
                if isinstance(bad, int) and 0 <= bad < len(indices):
                    batch.set_error(indices[bad], f"{type(error).__name__}: {error}")
                    del indices[bad]
                    continue
                if len(indices) == 1:
                    raise
                log.warning("batch loop: a batch of %d commands failed (%s: %s); running them one at a time",
                            len(indices), type(error).__name__, error)
                BatchLoop._run_alone(execute, batch, indices)
                return
            if len(results) != len(indices):
                raise RuntimeError(f"the handler returned {len(results)} results for {len(indices)} commands")
            batch.complete(results, indices)
            return

    @staticmethod
    def _run_alone(execute: Callable[[list[Any]], Sequence[Any]], batch: Batch, indices: list[int]) -> None:
        """Each command of `indices` in a batch of its own (re-running one that already ran in the failed
        batch writes the same K/V again: its inputs are the same)."""
        payloads = batch.payloads
        for i in indices:
            try:
                results = execute([payloads[i]])
                if len(results) != 1:
                    raise RuntimeError(f"the handler returned {len(results)} results for 1 command")
            except Exception as error:
                batch.set_error(i, f"engine error: {type(error).__name__}: {error}")
                continue
            batch.complete(results, [i])
