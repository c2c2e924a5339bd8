"""State shared between the instances of one runtime: the key-value store and publish/subscribe topics
(the `kv-store` and `messaging` interfaces). Both are cold calls (Python, behind the shim)."""

from __future__ import annotations

import itertools
import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pie.runtime.instance import Instance


class KeyValueStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._data[key] = value

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def list_keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))


class Broker:
    """Topics -> subscriptions. A subscription belongs to one instance (its handle is private to it) and
    holds the messages broadcast on its topic after it was made, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: dict[str, dict[tuple[int, int], "queue.Queue[str]"]] = {}
        self._subs: dict[tuple[int, int], tuple[str, "queue.Queue[str]"]] = {}  # (instance, handle) -> ...
        self._handles = itertools.count(1)

    def broadcast(self, topic: str, message: str) -> None:
        with self._lock:
            targets = list(self._topics.get(topic, {}).values())
        for q in targets:
            q.put(message)

    def subscribe(self, instance_id: int, topic: str) -> int:
        handle = next(self._handles)
        q: "queue.Queue[str]" = queue.Queue()
        with self._lock:
            self._topics.setdefault(topic, {})[(instance_id, handle)] = q
            self._subs[(instance_id, handle)] = (topic, q)
        return handle

    def _queue(self, instance_id: int, handle: int) -> "queue.Queue[str]":
        with self._lock:
            entry = self._subs.get((instance_id, handle))
        if entry is None:
            raise ValueError(f"s: {handle} is not a subscription of this instance")
        return entry[1]

    def receive(self, inst: "Instance", handle: int) -> str:
        """Blocks (in slices, to notice a termination) until a message or the instance's deadline."""
        q = self._queue(inst.id, handle)
        while True:
            left = inst.state.seconds_left  # -1: no deadline
            if left != -1.0 and left <= 0:
                raise TimeoutError("the instance's deadline passed while waiting for a message")
            try:
                return q.get(timeout=0.1 if left < 0 else min(left, 0.1))
            except queue.Empty:
                if inst.state.terminated:
                    raise RuntimeError("the instance was terminated") from None

    def unsubscribe(self, instance_id: int, handle: int) -> None:
        self._queue(instance_id, handle)
        with self._lock:
            topic, _ = self._subs.pop((instance_id, handle))
            self._topics[topic].pop((instance_id, handle), None)
            if not self._topics[topic]:
                del self._topics[topic]

    def end_instance(self, instance_id: int) -> None:
        with self._lock:
            mine = [key for key in self._subs if key[0] == instance_id]
        for _, handle in mine:
            self.unsubscribe(instance_id, handle)
