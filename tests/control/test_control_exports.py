"""The export policy of the page pool: a client's namespace, shared exports, quotas, persistence, eviction
under pressure, and what happens when a client ends (docs/security.md, "KV exports")."""

from __future__ import annotations

import time

import pytest

from pie.control import InstanceTerminated, InvalidHandle, PagePool, QuotaExceeded

ALICE, BOB = 7, 8  # two clients (server connections)


def exports(pool):
    return {(e["client"], e["name"]): e for e in pool.stats()["exports"]}


def test_a_private_export_is_invisible_to_other_clients(pool):
    pool.add_instance(1, client=ALICE)
    pool.add_instance(2, client=BOB)
    pool.export_pages(1, "secret", pool.allocate(1, 2), persistent=True)
    assert pool.export_names(1) == ["secret"] and pool.export_names(2) == []
    with pytest.raises(InvalidHandle, match="no export named 'secret'"):
        pool.import_pages(2, "secret")
    with pytest.raises(InvalidHandle, match="no export named 'secret'"):
        pool.unexport("secret", 2)
    # Bob may use the same name for his own: the names of two clients never meet.
    pool.export_pages(2, "secret", pool.allocate(2, 1), persistent=True)
    assert pool.resolve(1, pool.import_pages(1, "secret")) != pool.resolve(2, pool.import_pages(2, "secret"))
    assert sorted(exports(pool)) == [(ALICE, "secret"), (BOB, "secret")]  # the system sees both


def test_a_shared_export_is_seen_by_every_client_and_removed_only_by_its_own(pool):
    pool.add_instance(1, client=ALICE)
    pool.add_instance(2, client=BOB)
    pool.add_instance(3, client=ALICE)
    pages = pool.resolve(1, pool.allocate(1, 2))
    pool.export_pages(1, "system-prompt", pool.handles(1), persistent=True, shared=True)
    assert pool.export_names(2) == ["system-prompt"]
    assert pool.resolve(2, pool.import_pages(2, "system-prompt")) == pages
    with pytest.raises(ValueError, match="already exists"):  # Bob cannot shadow what he sees
        pool.export_pages(2, "system-prompt", pool.allocate(2, 1))
    with pytest.raises(InvalidHandle, match="belongs to instance 1"):
        pool.unexport("system-prompt", 2)
    pool.end_instance(1)  # persistent: stays, charged to Alice
    with pytest.raises(InvalidHandle, match="shared by another client"):
        pool.unexport("system-prompt", 2)
    pool.unexport("system-prompt", 3)  # any instance of the owner's client, once the owner has ended
    assert pool.export_names(2) == []


def test_an_export_ends_with_its_instance_unless_persistent(pool):
    pool.add_instance(1, client=ALICE)
    pool.export_pages(1, "scratch", pool.allocate(1, 2))
    pool.export_pages(1, "kept", pool.allocate(1, 3), persistent=True)
    pool.end_instance(1)
    assert list(exports(pool)) == [(ALICE, "kept")]
    assert pool.stats()["num_used"] == 3


def test_export_pages_count_toward_the_instance_and_client_quotas(pool):
    pool.add_instance(1, quota=6, client=ALICE, client_quota=8)
    pool.add_instance(2, client=ALICE, client_quota=8)
    handles = pool.allocate(1, 3)
    pool.export_pages(1, "a", handles, persistent=True)  # 3 handles + 3 exported pages = 6
    with pytest.raises(QuotaExceeded, match=r"instance 1: quota of 6 KV pages exceeded \(holds 3 and exports 3, "
                                            r"asked for 1 more\)"):
        pool.allocate(1, 1)
    pool.free(1, handles)  # the export still holds the pages: they stay charged
    with pytest.raises(QuotaExceeded, match="exports 3"):
        pool.allocate(1, 4)
    pool.allocate(1, 3)
    with pytest.raises(QuotaExceeded, match=r"its client's quota of 8 KV pages exceeded \(its 2 instances hold 3 "
                                            r"and exports 3, asked for 3 more\)"):
        pool.allocate(2, 3)
    pool.end_instance(1)  # the persistent export outlives it, still charged to the client
    assert pool.stats()["clients"][ALICE] == {"num_handles": 0, "quota": 8, "num_instances": 1,
                                              "num_export_pages": 3}
    with pytest.raises(QuotaExceeded, match="client's quota"):
        pool.allocate(2, 6)
    pool.allocate(2, 5)


def test_a_client_that_ends_drops_its_private_exports_and_leaves_its_shared_ones_ownerless(pool):
    pool.add_instance(1, client=ALICE)
    pool.add_instance(2, client=BOB)
    pool.export_pages(1, "mine", pool.allocate(1, 2), persistent=True)
    pool.export_pages(1, "ours", pool.allocate(1, 3), persistent=True, shared=True)
    pool.end_instance(1)
    pool.end_client(ALICE)
    assert list(exports(pool)) == [(ALICE, "ours")] and exports(pool)[ALICE, "ours"]["ownerless"]
    assert ALICE not in pool.stats()["clients"]
    assert pool.stats()["num_used"] == 3
    pool.unexport("ours", 2)  # ownerless: whoever sees it may remove it
    assert pool.stats()["num_used"] == 0
    with pytest.raises(ValueError, match="client 0"):
        pool.end_client(0)


def test_under_pressure_ownerless_exports_go_before_any_instance_least_recently_imported_first(pool, terminations):
    pool.add_instance(1, client=ALICE)
    pool.export_pages(1, "old", pool.allocate(1, 4), persistent=True, shared=True)
    pool.export_pages(1, "new", pool.allocate(1, 4), persistent=True, shared=True)
    pool.end_instance(1)
    pool.end_client(ALICE)
    pool.add_instance(2, client=BOB)
    time.sleep(0.01)
    pool.free(2, pool.import_pages(2, "old"))  # "old" is now the more recently used
    pool.add_instance(3, client=BOB)  # newer than the requester: would be a victim without evictions
    keep = pool.allocate(3, 2)
    pool.allocate(2, 9)  # 6 free: one export must go, the least recently imported one
    assert terminations == [] and pool.export_names(2) == ["old"]
    assert pool.stats()["num_evictions"] == 1
    assert pool.resolve(3, keep)  # instance 3 untouched
    pool.allocate(2, 1)  # the last free page; then "old" goes too before 3 is terminated
    pool.allocate(2, 4)
    assert terminations == [] and pool.export_names(2) == [] and pool.stats()["num_evictions"] == 2


def test_an_owned_export_is_evicted_only_once_idle(terminations):
    pool = PagePool(num_pages=8, page_size=4, on_terminate=lambda i, m: terminations.append((i, m)))
    pool.add_instance(1, client=ALICE)
    pool.add_instance(2, client=BOB)
    pool.export_pages(1, "cache", pool.allocate(1, 4), persistent=True)
    pool.end_instance(1)  # Alice still connected: the export is hers, not ownerless
    with pytest.raises(InstanceTerminated, match="no newer instance"):
        pool.allocate(2, 6)  # not idle (export_idle_s 0: never): Bob is the one terminated
    assert pool.export_names() == ["cache"]
    pool.end_instance(2)
    pool.set_export_idle_s(0.05)
    pool.add_instance(3, client=BOB)
    time.sleep(0.1)
    pool.allocate(3, 6)  # idle now: evicted, nobody terminated
    assert pool.export_names() == [] and len(terminations) == 1
    pool.check_invariants()
    with pytest.raises(ValueError):
        pool.set_export_idle_s(-1)


def test_eviction_that_cannot_free_enough_disturbs_nothing(pool, terminations):
    pool.add_instance(1, client=ALICE)
    pool.export_pages(1, "ours", pool.allocate(1, 4), persistent=True, shared=True)
    pool.end_instance(1)
    pool.end_client(ALICE)
    pool.add_instance(2, client=BOB)
    held = pool.import_pages(2, "ours")  # the export's pages are held by Bob too: evicting frees nothing
    with pytest.raises(InstanceTerminated):
        pool.allocate(2, 13)
    assert pool.export_names() == ["ours"] and pool.stats()["num_evictions"] == 0
    assert held and len(terminations) == 1
