"""The control plane: however an instance ends, its queues, futures, pages and slots are released."""

from __future__ import annotations

import pytest

from pie.control import (
    CommandCancelled,
    CommandKind,
    ControlPlane,
    InstanceTerminated,
    SchedulerConfig,
)

from control_fakes import EchoRequest, FakeRunner


@pytest.fixture
def plane():
    told = []
    plane = ControlPlane.for_runner(FakeRunner(num_pages=32), SchedulerConfig(policy="eager"), num_embed_slots=8,
                                    on_terminate=lambda i, m: told.append((i, m)))
    plane.told = told
    yield plane
    plane.stop()
    plane.kv_pages.check_invariants()
    plane.embed_slots.check_invariants()


def busy_instance(plane, num_pages=4):
    """An instance holding pages, an embedding slot, a pending command and an export."""
    instance = plane.open_instance()
    queue = plane.create_queue(instance)
    handles = plane.kv_pages.allocate(instance, num_pages)
    plane.kv_pages.export_pages(instance, f"prefix-{instance}", handles[:1])
    plane.embed_slots.allocate(instance, 1)
    future = queue.submit(CommandKind.FORWARD, EchoRequest(instance))
    return instance, queue, future


def assert_released(plane, instance, *, kv_pages_in_use=0):
    stats = plane.stats()
    assert instance not in stats["kv_pages"]["instances"] or stats["kv_pages"]["instances"][instance]["terminated"]
    assert stats["kv_pages"]["num_used"] == kv_pages_in_use
    assert stats["embed_slots"]["num_used"] == 0
    assert stats["scheduler"]["num_pending"] == 0
    assert f"prefix-{instance}" not in plane.kv_pages.export_names()


@pytest.mark.parametrize("how", ["normally", "trap", "client gone"])
def test_every_way_of_ending_releases_everything(plane, how):
    instance, queue, future = busy_instance(plane)
    if how == "trap":
        plane.terminate_instance(instance, "guest trapped: unreachable")
        with pytest.raises(InstanceTerminated, match="guest trapped"):
            plane.kv_pages.allocate(instance, 1)
        assert plane.told == [(instance, f"instance {instance} terminated: guest trapped: unreachable")]
    plane.end_instance(instance, how)
    with pytest.raises(CommandCancelled, match=f"instance {instance}"):
        future.result(1)
    assert queue.closed
    assert_released(plane, instance)
    assert plane.stats()["live_instances"] == []


def test_pool_exhaustion_terminates_the_newest_and_cancels_its_futures(plane):
    old, old_queue, _ = busy_instance(plane, num_pages=20)
    new, _, new_future = busy_instance(plane, num_pages=10)
    assert plane.kv_pages.stats()["num_free"] == 2
    plane.kv_pages.allocate(old, 5)  # needs 3 more than free: the newest instance goes
    assert [i for i, _ in plane.told] == [new]
    with pytest.raises(CommandCancelled, match="KV page pool is exhausted"):
        new_future.result(1)
    with pytest.raises(ValueError, match=f"instance {new} terminated"):
        plane.create_queue(new)
    assert plane.embed_slots.stats()["instances"][new]["terminated"]
    # The older instance is untouched and keeps running.
    with plane:
        assert old_queue.submit(CommandKind.FORWARD, EchoRequest("still here")).result(5) == ("done", "still here")
    plane.end_instance(new)
    plane.end_instance(old)
    assert_released(plane, new)
    assert_released(plane, old)


def test_persistent_exports_outlive_their_owner_on_purpose(plane):
    instance = plane.open_instance()
    handles = plane.kv_pages.allocate(instance, 3)
    plane.kv_pages.export_pages(instance, "shared-system-prompt", handles[:2], persistent=True)
    plane.end_instance(instance)
    assert plane.kv_pages.export_names() == ["shared-system-prompt"]
    assert plane.kv_pages.stats()["num_used"] == 2
    plane.kv_pages.unexport("shared-system-prompt")
    assert plane.kv_pages.stats()["num_used"] == 0
