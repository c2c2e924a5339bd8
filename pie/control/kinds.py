"""Command kinds: the scheduler batches only commands of the same kind together."""

from __future__ import annotations

from enum import IntEnum


class CommandKind(IntEnum):
    FORWARD = 0  # payload: pie.engine.batch.ForwardRequest; result: ForwardResult
    EMBED = 1  # payload and result defined by the embedding handler
    COPY_PAGES = 2  # payload: list of (src_page, dst_page) from PagePool.prepare_write; result: None
