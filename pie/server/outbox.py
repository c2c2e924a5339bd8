"""The bridge from instance threads to the asyncio loop: a bounded queue per client.

An instance's output and log arrive on its own thread (inside its `runtime.send` host call). They are
queued for one consumer coroutine (a websocket connection's writer, or an HTTP request's handler) with
`loop.call_soon_threadsafe`. At most `capacity` such events wait; a further one makes its instance's
thread wait for room, up to `stall_s` seconds, after which the put fails and the caller terminates that
instance (a slow client). Other clients, the loop and the engine never wait. Control events (responses,
`done`) are never blocked: at most one per request or instance; `num_control` counts those waiting, so
that a connection stops reading requests while too many of its replies are unread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

POLL_S = 0.05


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int, stall_s: float):
        self.loop = loop
        self.capacity = capacity
        self.stall_s = stall_s
        self._slots = threading.Semaphore(capacity)
        self._queue: asyncio.Queue[tuple[Any, bool]] = asyncio.Queue()
        self.closed = False
        self.num_control = 0  # control events queued, not yet taken (loop thread only)

    def put_from_thread(self, event: Any) -> bool:
        """From an instance thread: queues `event`, waiting for room up to stall_s. False if no room came
        in time or the outbox is closed (the client is gone)."""
        deadline = time.monotonic() + self.stall_s
        while True:  # short waits, so that close() needs no wake-up
            if self.closed:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._slots.acquire(timeout=min(left, POLL_S)):
                break
        if self.closed:
            return False
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, (event, True))
        except RuntimeError:  # the loop is closed
            return False
        return True

    def post_from_thread(self, event: Any) -> None:
        """From any thread, never waits (control events)."""
        try:
            self.loop.call_soon_threadsafe(self.put, event)
        except RuntimeError:
            pass

    def put(self, event: Any) -> None:
        """From the loop thread, never waits (control events)."""
        self.num_control += 1
        self._queue.put_nowait((event, False))

    async def get(self) -> Any:
        event, counted = await self._queue.get()
        if counted:
            self._slots.release()
        else:
            self.num_control -= 1
        return event

    def qsize(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """No more events are taken; instance threads waiting for room return within POLL_S."""
        self.closed = True
