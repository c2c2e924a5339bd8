"""The page pool: refcounts, export / import, fork with copy-on-write, quotas, termination."""

from __future__ import annotations

import pytest

from pie.control import InstanceTerminated, InvalidHandle, PagePool, QuotaExceeded


def used(pool):
    return pool.stats()["num_used"]


def test_allocate_resolve_free_and_refcounts(pool):
    pool.add_instance(1)
    pool.add_instance(2)
    a = pool.allocate(1, 3)
    b = pool.allocate(2, 2)
    pages_a, pages_b = pool.resolve(1, a), pool.resolve(2, b)
    assert len(set(pages_a) | set(pages_b)) == 5
    assert all(pool.refcount(p) == 1 for p in pages_a + pages_b)
    assert used(pool) == 5 and pool.stats()["num_free"] == 11
    pool.free(1, a[:2])
    assert [pool.refcount(p) for p in pages_a] == [0, 0, 1]
    assert pool.handles(1) == [a[2]]
    assert pool.stats()["instances"][1]["num_handles"] == 1
    assert used(pool) == 3


def test_handles_are_private_to_their_instance(pool):
    pool.add_instance(7)
    pool.add_instance(8)
    pool.allocate(8, 4)
    [mine] = pool.allocate(7, 1)
    with pytest.raises(InvalidHandle, match="instance 7: KV page handle 12 is not held by this instance"):
        pool.resolve(7, [12])
    with pytest.raises(InvalidHandle, match="not held"):
        pool.free(7, [mine, 3])
    assert pool.handles(7) == [mine]  # the failed free changed nothing
    with pytest.raises(ValueError, match="handle 0 is listed twice"):
        pool.free(7, [mine, mine])
    with pytest.raises(InvalidHandle, match="instance 9: not registered"):
        pool.allocate(9, 1)
    with pytest.raises(ValueError, match="more than the pool's 16"):
        pool.allocate(7, 17)


def test_fork_shares_pages_and_copy_on_write_splits_only_what_is_written(pool):
    pool.add_instance(1)
    parent = pool.allocate(1, 3)  # two full pages and a partly filled last page
    pages = pool.resolve(1, parent)
    child = pool.fork(1, parent)
    assert pool.resolve(1, child) == pages
    assert [pool.refcount(p) for p in pages] == [2, 2, 2]
    assert used(pool) == 3

    # The child appends to its last page: it gets its own copy, the parent keeps the original.
    copies = pool.prepare_write(1, [child[2]])
    [(src, dst)] = copies
    assert src == pages[2] and dst not in pages
    assert pool.resolve(1, child) == pages[:2] + [dst]
    assert pool.refcount(pages[2]) == 1 and pool.refcount(dst) == 1
    # The parent now holds its last page alone: writing needs no copy.
    assert pool.prepare_write(1, [parent[2]]) == []
    assert used(pool) == 4
    pool.free(1, parent)
    assert [pool.refcount(p) for p in pages] == [1, 1, 0]


def test_export_import_and_unexport(pool):
    pool.add_instance(1)
    pool.add_instance(2)
    prefix = pool.allocate(1, 2)
    pages = pool.resolve(1, prefix)
    pool.export_pages(1, "system-prompt", prefix)
    assert pool.export_names() == ["system-prompt"]
    assert pool.stats()["num_exported"] == 2
    imported = pool.import_pages(2, "system-prompt")
    assert pool.resolve(2, imported) == pages
    assert [pool.refcount(p) for p in pages] == [3, 3]

    with pytest.raises(ValueError, match="already exists"):
        pool.export_pages(2, "system-prompt", imported)
    with pytest.raises(InvalidHandle, match="belongs to instance 1"):
        pool.unexport("system-prompt", 2)
    # Sharing is read-only: the importer writing gets a copy.
    [(src, dst)] = pool.prepare_write(2, [imported[1]])
    assert src == pages[1] and pool.refcount(pages[1]) == 2

    pool.free(1, prefix)  # the export keeps the pages
    assert [pool.refcount(p) for p in pages] == [2, 1]
    pool.unexport("system-prompt", 1)
    assert [pool.refcount(p) for p in pages] == [1, 0]
    with pytest.raises(InvalidHandle, match="no export named 'system-prompt'"):
        pool.import_pages(2, "system-prompt")


def test_exports_die_with_their_owner_unless_persistent(pool):
    pool.add_instance(1)
    pool.export_pages(1, "scratch", pool.allocate(1, 2))
    persistent_pages = pool.resolve(1, pool.allocate(1, 3))
    pool.export_pages(1, "cache", pool.handles(1)[2:], persistent=True)
    assert pool.end_instance(1) == 5
    assert pool.export_names() == ["cache"]
    assert used(pool) == 3 and all(pool.refcount(p) == 1 for p in persistent_pages)
    pool.add_instance(2)
    assert pool.resolve(2, pool.import_pages(2, "cache")) == persistent_pages
    pool.unexport("cache", 2)  # the owner is gone: anyone may drop it
    pool.end_instance(2)
    assert used(pool) == 0


def test_quotas_count_handles_and_refuse_without_side_effects(pool):
    pool.add_instance(1, quota=4)
    pool.add_instance(2)
    handles = pool.allocate(1, 3)
    with pytest.raises(QuotaExceeded, match="instance 1: quota of 4 KV pages exceeded \\(holds 3, asked for 2 more\\)"):
        pool.allocate(1, 2)
    with pytest.raises(QuotaExceeded):
        pool.fork(1, handles)
    pool.export_pages(2, "big", pool.allocate(2, 2))
    with pytest.raises(QuotaExceeded):
        pool.import_pages(1, "big")
    assert pool.handles(1) == handles and used(pool) == 5
    pool.allocate(1, 1)
    assert pool.stats()["instances"][1] == {"num_handles": 4, "quota": 4, "num_exports": 0, "terminated": False}


def test_exhaustion_terminates_the_newest_instance_and_nothing_else(pool, terminations):
    for instance in (1, 2, 3):
        pool.add_instance(instance)
    keep1 = pool.allocate(1, 6)
    keep2 = pool.allocate(2, 4)
    pool.allocate(3, 5)
    assert pool.stats()["num_free"] == 1
    before = pool.resolve(1, keep1), pool.resolve(2, keep2)

    got = pool.allocate(1, 3)  # instance 3 is the newest: it goes, 1 and 2 keep everything
    assert len(got) == 3
    assert [i for i, _ in terminations] == [3]
    assert "instance 3 terminated: the KV page pool is exhausted (instance 1 needed 3 KV pages, 1 free of 16)" \
        in terminations[0][1]
    assert (pool.resolve(1, keep1), pool.resolve(2, keep2)) == before
    with pytest.raises(InstanceTerminated, match="instance 3 terminated"):
        pool.allocate(3, 1)
    assert pool.stats()["instances"][3]["terminated"] and pool.stats()["num_terminations"] == 1
    assert pool.end_instance(3) == 0
    assert not pool.has_instance(3)


def test_exhaustion_terminates_the_requester_when_it_is_the_newest(pool, terminations):
    pool.add_instance(1)
    pool.add_instance(2)
    old = pool.allocate(1, 10)
    pool.allocate(2, 4)
    with pytest.raises(InstanceTerminated, match="instance 2 terminated: the KV page pool is exhausted"):
        pool.allocate(2, 5)
    assert [i for i, _ in terminations] == [2]
    assert len(pool.resolve(1, old)) == 10 and used(pool) == 10


def test_exhaustion_does_not_kill_newer_instances_that_could_not_free_enough(pool, terminations):
    pool.add_instance(1)
    pool.add_instance(2)
    pool.allocate(1, 12)
    shared = pool.allocate(2, 2)
    pool.export_pages(2, "kept", shared, persistent=True)  # survives instance 2: frees nothing
    pool.allocate(1, 2)
    with pytest.raises(InstanceTerminated, match="instance 1 terminated"):
        pool.allocate(1, 2)
    assert [i for i, _ in terminations] == [1]
    assert pool.handles(2) == shared


def test_copy_on_write_under_exhaustion_follows_the_same_policy(pool, terminations):
    pool.add_instance(1)
    pool.add_instance(2)
    h = pool.allocate(1, 8)
    pool.fork(1, h)
    pool.allocate(2, 8)
    assert pool.stats()["num_free"] == 0
    copies = pool.prepare_write(1, h[:2])
    assert len(copies) == 2 and [i for i, _ in terminations] == [2]


def test_embedding_slots_are_accounted_the_same_way():
    slots = PagePool(num_pages=4, page_size=1, resource="embedding slot")
    slots.add_instance(5, quota=2)
    slots.allocate(5, 2)
    with pytest.raises(QuotaExceeded, match="quota of 2 embedding slots"):
        slots.allocate(5, 1)
    with pytest.raises(InvalidHandle, match="embedding slot handle 9"):
        slots.free(5, [9])
    assert slots.end_instance(5) == 2 and slots.stats()["num_used"] == 0


# ---- pins: pages a queued or running command uses ----------------------------------------------

def test_a_freed_page_a_command_still_uses_is_never_handed_to_another_instance(pool, terminations):
    """The attack: instance 1 submits a pass over its pages, frees them at once and lets instance 2
    allocate everything. The pinned pages must not reach instance 2 before the pass is done."""
    pool.add_instance(1)
    pool.add_instance(2)
    mine = pool.allocate(1, 3)
    pinned = pool.resolve_pinned(1, mine)  # what forward.submit does for a pass
    pool.free(1, mine)
    assert pool.stats()["num_free"] == 13 and pool.stats()["num_pinned"] == 3
    theirs = pool.resolve(2, pool.allocate(2, 13))
    assert not set(theirs) & set(pinned.pages)
    with pytest.raises(InstanceTerminated, match="exhausted"):
        pool.allocate(2, 1)  # no newer instance to take from: the requester goes, the pinned pages stay
    assert [i for i, _ in terminations] == [2]
    pool.check_invariants()
    pinned.release()  # the pass is done: the pages come free
    assert pool.stats()["num_free"] == 16 and pool.stats()["num_pinned"] == 0


def test_pins_outlive_the_instance_and_are_not_holders(pool):
    pool.add_instance(1)
    handles = pool.allocate(1, 2)
    pinned = pool.resolve_pinned(1, handles)
    assert all(pool.refcount(p) == 1 for p in pinned.pages)  # copy-on-write sees one holder: no copy
    assert pool.prepare_write(1, handles) == []
    pool.end_instance(1)  # its pages are still in use by its pass
    assert pool.stats()["num_free"] == 14
    pool.check_invariants()
    del pinned  # dropping the pins releases them too
    assert pool.stats()["num_free"] == 16


def test_a_clients_instances_share_its_quota(pool):
    pool.add_instance(1, quota=5, client=7, client_quota=6)
    pool.add_instance(2, client=7, client_quota=6)
    pool.add_instance(3, client=8)  # another client: its own count, no quota
    pool.allocate(1, 4)
    with pytest.raises(QuotaExceeded, match="instance 1: quota of 5 KV pages exceeded"):
        pool.allocate(1, 2)  # its own quota first
    with pytest.raises(QuotaExceeded, match=r"instance 2: its client's quota of 6 KV pages exceeded \(its 2 instances "
                                            r"hold 4, asked for 3 more\)"):
        pool.allocate(2, 3)
    [h] = pool.allocate(2, 2)[:1]
    with pytest.raises(QuotaExceeded, match="client's quota"):
        pool.fork(2, [h])
    assert pool.stats()["clients"][7] == {"num_handles": 6, "quota": 6, "num_instances": 2, "num_export_pages": 0}
    pool.allocate(3, 8)  # other clients are not affected
    pool.end_instance(1)  # frees its share
    pool.allocate(2, 4)
    assert pool.stats()["clients"][7]["num_handles"] == 6
    pool.end_instance(2)
    assert 7 not in pool.stats()["clients"]
    pool.check_invariants()
