"""What instances share (kv-store, messaging, exports) is partitioned by client and bounded; what one
instance keeps (its output, its inbox) and what the runtime keeps (compiled components) is bounded too.
Each test is an attack a hostile inferlet or client could make (docs/security.md)."""

from __future__ import annotations

import queue
import time

import pytest

from pie.runtime.shared import Broker, KeyValueStore, LimitReached, StoreLimits

A, B = 1, 2  # two clients


# ---- the key-value store ---------------------------------------------------------------------------------

def test_kv_store_clients_do_not_see_each_other():
    store = KeyValueStore()
    store.set("api-key", "alice's secret", A)
    assert store.get("api-key", B) is None and store.list_keys("", B) == [] and not store.delete("api-key", B)
    store.set("api-key", "bob's", B)
    assert store.get("api-key", A) == "alice's secret"
    store.end_client(A)
    assert store.get("api-key", A) is None and store.get("api-key", B) == "bob's"
    assert store.usage(A) == (0, 0)


def test_kv_store_bounds_keys_and_bytes_and_a_refused_set_changes_nothing():
    store = KeyValueStore(StoreLimits(kv_store_keys=3, kv_store_bytes=100, kv_store_total_bytes=150))
    for i in range(3):
        store.set(f"k{i}", "v", A)
    with pytest.raises(LimitReached, match=r"holds 3 keys, its limit \(kv_store_keys = 3\)"):
        store.set("k3", "v", A)
    store.set("k0", "replaced", A)  # replacing a key is not a new key
    with pytest.raises(LimitReached, match=r"kv_store_bytes = 100"):
        store.set("k1", "x" * 100, A)
    assert store.get("k1", A) == "v" and store.usage(A) == (3, 2 + 8 + 2 + 1 + 2 + 1)
    store.set("big", "é" * 40, B)  # 2 bytes a character: 83 bytes
    with pytest.raises(LimitReached, match=r"server's key-value store .* \(kv_store_total_bytes = 150\)"):
        store.set("k1", "x" * 60, A)  # within A's own bound, past the total
    store.delete("big", B)
    store.set("k1", "x" * 60, A)
    assert store.usage(B) == (0, 0)


# ---- messaging -------------------------------------------------------------------------------------------

def test_topics_are_per_client():
    broker = Broker()
    alice = broker.subscribe(10, "news", A)
    broker.broadcast("news", "from bob", B)
    broker.broadcast("news", "from alice", A)
    assert list(broker._sub(10, alice).messages) == ["from alice"]


def test_a_full_subscription_refuses_the_broadcast_for_every_subscriber():
    broker = Broker(StoreLimits(messaging_queue_messages=2, messaging_queue_bytes=10, messaging_subscriptions=2))
    reader = broker.subscribe(10, "t", A)
    broker.subscribe(11, "t", A)  # a slow reader: never reads
    broker.broadcast("t", "1", A)
    broker.broadcast("t", "2", A)
    broker._sub(10, reader).messages.clear()  # the reader keeps up; the slow one does not
    broker._sub(10, reader).num_bytes = 0
    with pytest.raises(LimitReached, match=r"subscription \d+ of instance 11 has 2 unread messages, its limit "
                                           r"\(messaging_queue_messages = 2\)"):
        broker.broadcast("t", "3", A)
    assert list(broker._sub(10, reader).messages) == []  # all or nothing
    broker.subscribe(12, "u", A)
    with pytest.raises(LimitReached, match="messaging_queue_bytes = 10"):
        broker.broadcast("u", "x" * 11, A)
    broker.subscribe(12, "v", A)
    with pytest.raises(LimitReached, match=r"holds 2 subscriptions, its limit \(messaging_subscriptions = 2\)"):
        broker.subscribe(12, "w", A)
    broker.end_instance(12)
    broker.end_instance(11)
    broker.end_instance(10)
    assert broker.num_subscriptions() == 0 and broker._topics == {}


# ---- through the runtime: a hostile guest ---------------------------------------------------------------

KV_GUEST = """
import sys
from wit_world.imports import kv_store
if sys.argv[1] == "write":
    kv_store.set("secret", "hunter2")
print(kv_store.get("secret"), kv_store.list_keys(""))
"""


def test_a_guest_reads_only_its_own_clients_store(runtime):
    try:
        assert runtime.run_source(KV_GUEST, ["write"], client=A).output == "hunter2 ['secret']\n"
        assert runtime.run_source(KV_GUEST, ["read"], client=A).output == "hunter2 ['secret']\n"
        assert runtime.run_source(KV_GUEST, ["read"], client=B).output == "None []\n"
        runtime.end_client(A)
        assert runtime.run_source(KV_GUEST, ["read"], client=A).output == "None []\n"
    finally:
        runtime.services.kv_store.end_client(A)


def test_a_guest_filling_the_store_gets_an_error_naming_the_limit(model):
    from pie.runtime import Runtime, RuntimeConfig

    guest = ("from wit_world.imports import kv_store\nfor i in range(10):\n"
             "    kv_store.set(str(i), 'v')\n    print(i)\n")
    with Runtime(model, RuntimeConfig(store=StoreLimits(kv_store_keys=4))) as rt:
        r = rt.run_source(guest, client=A)
        assert r.output == "0\n1\n2\n3\n"
        assert "kv-store.set" in r.error and "kv_store_keys = 4" in r.error, r.error
        assert rt.services.kv_store.usage(A) == (4, 8)


def test_a_flood_of_broadcasts_fails_once_the_subscriber_is_full(model):
    from pie.runtime import Runtime, RuntimeConfig

    listener = ("from wit_world.imports import messaging, runtime\nh = messaging.subscribe('t')\n"
                "print('subscribed', flush=True)\nruntime.receive()\n")
    flooder = ("from wit_world.imports import messaging\nfor i in range(100):\n"
               "    messaging.broadcast('t', 'x' * 100)\nprint('all sent')\n")
    with Runtime(model, RuntimeConfig(store=StoreLimits(messaging_queue_messages=8))) as rt:
        inst = rt.launch_source(listener, client=A)
        deadline = time.monotonic() + 30
        while "subscribed" not in "".join(inst.messages):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other = rt.run_source(flooder, client=B)  # another client's topic of the same name: no bound reached
        assert other.error is None and other.output == "all sent\n"
        r = rt.run_source(flooder, client=A)
        assert "messaging.broadcast" in r.error and "messaging_queue_messages = 8" in r.error, r.error
        inst.send("")
        assert inst.wait(30).error is None
        assert rt.services.broker.num_subscriptions() == 0


def test_kept_output_is_capped_and_a_launch_may_keep_none(model):
    from pie.runtime import Runtime, RuntimeConfig

    guest = "for i in range(200):\n    print('y' * 99, flush=True)\nprint('end')\n"
    with Runtime(model, RuntimeConfig(max_kept_output_bytes=5000)) as rt:
        r = rt.run_source(guest)
        assert r.error is not None and "max_kept_output_bytes" in r.error, r.error
        assert 4000 <= len(r.output) <= 5000 and "end" not in r.output
        seen = []
        inst = rt.launch_source(guest, keep_output=False, on_output=seen.append)
        r = inst.wait(60)
        assert r.error is None and r.output == ""
        assert "".join(seen).count("y" * 99) == 200 and "end" in "".join(seen)


def test_an_inbox_is_bounded(model):
    from pie.runtime import Runtime, RuntimeConfig

    sleeper = "from wit_world.imports import runtime\nprint('up', flush=True)\nruntime.receive()\n"
    with Runtime(model, RuntimeConfig(inbox_messages=3)) as rt:
        inst = rt.launch_source(sleeper)
        for _ in range(3):
            inst.send("m")
        with pytest.raises(queue.Full):
            inst.send("one too many")
        assert inst.wait(30).error is None  # it read one message and ended


def test_compiled_components_are_kept_least_recently_used_first(model):
    from pie.runtime import Runtime, RuntimeConfig
    from wat_guests import RUN_OK

    with Runtime(model, RuntimeConfig(max_cached_components=2)) as rt:
        runtime_component = rt.python_runtime()
        keys = []
        for i in range(4):  # four programs (a comment apart): four keys
            comp = rt.load_component(f"{RUN_OK};; program {i}\n".encode())
            keys.append(next(reversed(rt._components)))
            assert rt.launch_component(comp).wait(30).error is None
        assert len(set(keys)) == 4
        assert list(rt._components) == keys[2:]  # at most 2, the most recently used
        rt.load_component(f"{RUN_OK};; program 2\n".encode())  # used again: now the most recent
        assert list(rt._components) == [keys[3], keys[2]]
        assert rt.python_runtime() is runtime_component  # held apart from the LRU
        assert rt.run_source("print('still runs')").output == "still runs\n"
