"""Fakes for the control-layer tests: a model runner with the engine's interface and no model."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class FakeBatchError(ValueError):
    """Like pie.engine.batch.BatchError: names the request index."""

    def __init__(self, request_index: int, message: str):
        super().__init__(f"request {request_index}: {message}")
        self.request_index = request_index


@dataclass(frozen=True)
class EchoRequest:
    tag: object
    bad: bool = False  # the runner rejects it with FakeBatchError


class FakeRunner:
    """ModelRunner's interface (execute, validate, batch limits) over EchoRequests: the result of a
    request is ("done", tag). Records every batch it ran."""

    def __init__(self, page_size: int = 4, num_pages: int = 64, max_batch_requests: int = 1024,
                 max_batch_tokens: int = 1 << 20):
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.batches: list[list[object]] = []
        self._lock = threading.Lock()

    def validate(self, request: EchoRequest, index: int = 0) -> None:
        if request.bad:
            raise FakeBatchError(index, f"tag {request.tag!r} is bad")

    def execute(self, requests: list[EchoRequest]) -> list[tuple[str, object]]:
        for index, request in enumerate(requests):
            self.validate(request, index)
        with self._lock:
            self.batches.append([r.tag for r in requests])
        return [("done", r.tag) for r in requests]

    @property
    def tags_run(self) -> list[object]:
        return [tag for batch in self.batches for tag in batch]
