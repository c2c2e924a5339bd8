"""State shared between the instances of one runtime: the key-value store and publish/subscribe topics
(the `kv-store` and `messaging` interfaces). Both are cold calls (Python, behind the shim).

Both are partitioned by client (the id an instance was launched with: a server gives each connection and
each HTTP request its own; the Runtime API launches everything as client 0): an instance reads, lists and
receives only what instances of its own client wrote or broadcast. Both are bounded (StoreLimits); a call
that would pass a bound fails with one line naming the limit and changes nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pie.runtime.instance import Instance


class LimitReached(ValueError):
    """A call would pass a configured bound; the message names the bound and its configuration key."""


@dataclass(frozen=True)
class StoreLimits:
    kv_store_keys: int = 10_000  # keys one client may hold in the key-value store
    kv_store_bytes: int = 64 << 20  # UTF-8 bytes of keys + values one client may hold
    kv_store_total_bytes: int = 512 << 20  # the same, all clients together
    messaging_queue_messages: int = 1024  # unread messages one subscription holds; a broadcast to a full
    # one fails (and reaches no subscriber)
    messaging_queue_bytes: int = 16 << 20  # unread bytes one subscription holds
    messaging_subscriptions: int = 256  # subscriptions one instance holds at once

    def __post_init__(self) -> None:
        for name in ("kv_store_keys", "kv_store_bytes", "kv_store_total_bytes", "messaging_queue_messages",
                     "messaging_queue_bytes", "messaging_subscriptions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (lone surrogates counted as encoded): what every bound here counts."""
    return len(text.encode("utf-8", "surrogatepass"))


class KeyValueStore:
    """client -> {key: value}; sizes counted in UTF-8 bytes of key + value."""

    def __init__(self, limits: StoreLimits = StoreLimits()) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._data: dict[int, dict[str, str]] = {}
        self._bytes: dict[int, int] = {}  # client -> bytes held
        self._total_bytes = 0

    def get(self, key: str, client: int = 0) -> str | None:
        with self._lock:
            return self._data.get(client, {}).get(key)

    def set(self, key: str, value: str, client: int = 0) -> None:
        lim = self.limits
        with self._lock:
            data = self._data.setdefault(client, {})
            old = data.get(key)
            delta = utf8_size(key) + utf8_size(value) - (0 if old is None else utf8_size(key) + utf8_size(old))
            held = self._bytes.get(client, 0)
            if old is None and len(data) >= lim.kv_store_keys:
                raise LimitReached(f"the client's key-value store holds {len(data)} keys, its limit "
                                   f"(kv_store_keys = {lim.kv_store_keys})")
            if held + delta > lim.kv_store_bytes:
                raise LimitReached(f"the client's key-value store would hold {held + delta} bytes, over its limit "
                                   f"(kv_store_bytes = {lim.kv_store_bytes})")
            if self._total_bytes + delta > lim.kv_store_total_bytes:
                raise LimitReached(f"the server's key-value store would hold {self._total_bytes + delta} bytes, "
                                   f"over its limit (kv_store_total_bytes = {lim.kv_store_total_bytes})")
            data[key] = value
            self._bytes[client] = held + delta
            self._total_bytes += delta

    def delete(self, key: str, client: int = 0) -> bool:
        with self._lock:
            data = self._data.get(client)
            if data is None or key not in data:
                return False
            freed = utf8_size(key) + utf8_size(data.pop(key))
            self._bytes[client] -= freed
            self._total_bytes -= freed
            if not data:
                del self._data[client], self._bytes[client]
            return True

    def list_keys(self, prefix: str, client: int = 0) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data.get(client, {}) if k.startswith(prefix))

    def end_client(self, client: int) -> None:
        """The client is gone: what it stored goes with it."""
        with self._lock:
            data = self._data.pop(client, None)
            if data is not None:
                self._total_bytes -= self._bytes.pop(client)

    def usage(self, client: int = 0) -> tuple[int, int]:
        """(keys, bytes) the client holds."""
        with self._lock:
            return len(self._data.get(client, {})), self._bytes.get(client, 0)


class _Subscription:
    """The unread messages of one subscription, bounded in count and bytes; a condition to wait on."""

    def __init__(self, topic: tuple[int, str]) -> None:
        self.topic = topic  # (client, topic name)
        self.messages: deque[str] = deque()
        self.num_bytes = 0
        self.ready = threading.Condition(threading.Lock())


class Broker:
    """Topics (per client) -> subscriptions. A subscription belongs to one instance (its handle is private to
    it) and holds the messages broadcast on its topic after it was made, in order."""

    def __init__(self, limits: StoreLimits = StoreLimits()) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._topics: dict[tuple[int, str], dict[tuple[int, int], _Subscription]] = {}
        self._subs: dict[tuple[int, int], _Subscription] = {}  # (instance, handle) -> ...
        self._per_instance: dict[int, int] = {}  # instance -> subscriptions it holds
        self._handles = itertools.count(1)

    def broadcast(self, topic: str, message: str, client: int = 0) -> None:
        """Every subscriber of the topic gets the message, or (one of them is full) none does."""
        lim = self.limits
        size = utf8_size(message)
        with self._lock:
            targets = list(self._topics.get((client, topic), {}).items())
            for (instance_id, handle), sub in targets:  # check all first: all or nothing
                with sub.ready:
                    if len(sub.messages) >= lim.messaging_queue_messages:
                        raise LimitReached(f"subscription {handle} of instance {instance_id} has "
                                           f"{len(sub.messages)} unread messages, its limit "
                                           f"(messaging_queue_messages = {lim.messaging_queue_messages})")
                    if sub.num_bytes + size > lim.messaging_queue_bytes:
                        raise LimitReached(f"subscription {handle} of instance {instance_id} would hold "
                                           f"{sub.num_bytes + size} unread bytes, over its limit "
                                           f"(messaging_queue_bytes = {lim.messaging_queue_bytes})")
            for _, sub in targets:
                with sub.ready:
                    sub.messages.append(message)
                    sub.num_bytes += size
                    sub.ready.notify()

    def subscribe(self, instance_id: int, topic: str, client: int = 0) -> int:
        with self._lock:
            held = self._per_instance.get(instance_id, 0)
            if held >= self.limits.messaging_subscriptions:
                raise LimitReached(f"the instance holds {held} subscriptions, its limit "
                                   f"(messaging_subscriptions = {self.limits.messaging_subscriptions})")
            handle = next(self._handles)
            sub = _Subscription((client, topic))
            self._topics.setdefault((client, topic), {})[(instance_id, handle)] = sub
            self._subs[(instance_id, handle)] = sub
            self._per_instance[instance_id] = held + 1
        return handle

    def _sub(self, instance_id: int, handle: int) -> _Subscription:
        with self._lock:
            sub = self._subs.get((instance_id, handle))
        if sub is None:
            raise ValueError(f"s: {handle} is not a subscription of this instance")
        return sub

    def receive(self, inst: "Instance", handle: int) -> str:
        """Blocks (in slices, to notice a termination) until a message or the instance's deadline."""
        sub = self._sub(inst.id, handle)
        with sub.ready:
            while not sub.messages:
                left = inst.state.seconds_left  # -1: no deadline
                if left != -1.0 and left <= 0:
                    raise TimeoutError("the instance's deadline passed while waiting for a message")
                if inst.state.terminated:
                    raise RuntimeError("the instance was terminated")
                sub.ready.wait(0.1 if left < 0 else min(left, 0.1))
            message = sub.messages.popleft()
            sub.num_bytes -= utf8_size(message)
            return message

    def unsubscribe(self, instance_id: int, handle: int) -> None:
        sub = self._sub(instance_id, handle)
        with self._lock:
            if self._subs.pop((instance_id, handle), None) is None:
                return
            topic = self._topics[sub.topic]
            topic.pop((instance_id, handle), None)
            if not topic:
                del self._topics[sub.topic]
            self._per_instance[instance_id] -= 1
            if self._per_instance[instance_id] == 0:
                del self._per_instance[instance_id]

    def end_instance(self, instance_id: int) -> None:
        with self._lock:
            mine = [key for key in self._subs if key[0] == instance_id]
        for _, handle in mine:
            self.unsubscribe(instance_id, handle)

    def num_subscriptions(self) -> int:
        with self._lock:
            return len(self._subs)
