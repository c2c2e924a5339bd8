"""Python launchers of the CPU kernels in pie._ext._kernels_cpu: they check shapes and dtypes,
allocate outputs, and turn error codes into exceptions."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pie._ext import _kernels_cpu

_ERRORS = {1: "bad argument", 2: "runs do not add up to the row length", 3: "a run is negative"}


class MaskError(ValueError):
    def __init__(self, row: int, message: str):
        super().__init__(f"row {row}: {message}")
        self.row = row


def expand_brle(rows: Sequence[Sequence[int]], row_len: int) -> np.ndarray:
    """Expand BRLE rows (runs alternating may-attend / hidden, starting with may-attend) into a
    (len(rows), row_len) bool array.

    >>> expand_brle([[2, 3, 1]], 6).astype(int).tolist()
    [[1, 1, 0, 0, 0, 1]]
    """
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    try:
        runs = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))
    except (TypeError, ValueError, OverflowError) as e:
        raise MaskError(0, f"runs must be integers ({e})") from None
    out = np.empty((len(rows), row_len), dtype=np.uint8)
    err, bad_row = _kernels_cpu.expand_brle(runs.ctypes.data, offsets.ctypes.data, len(rows), row_len,
                                            out.ctypes.data)
    if err:
        raise MaskError(bad_row, f"{_ERRORS.get(err, f'error {err}')} ({row_len})")
    return out.view(np.bool_)
