"""The page pool's prefix cache (automatic prefix caching): keyed full pages in a cache scope, reused as
shared pages, copy-on-write when written, private to their scope, dropped least recently used first under
pressure, before any export is evicted or instance terminated."""

from __future__ import annotations

import pytest

from pie.control import InvalidHandle


def test_a_lookup_finds_the_longest_run_of_stored_keys_as_shared_pages(pool):
    pool.add_instance(1, cache_scope=5)
    pool.add_instance(2, cache_scope=5)
    pages = pool.allocate(1, 3)
    assert pool.cache_store(1, ["a", "b", "c"], pages) == 3
    assert pool.cache_store(1, ["a", "b"], pages[:2]) == 0  # already there: nothing new
    physical = pool.resolve(1, pages)
    assert [pool.refcount(p) for p in physical] == [2, 2, 2]  # the instance's handle and the cache's entry
    found = pool.cache_lookup(2, ["a", "b", "x", "c"])  # stops at the first miss
    assert pool.resolve(2, found) == physical[:2]
    assert pool.cache_lookup(2, ["x", "a"]) == []
    assert pool.stats()["num_cached"] == 3 and pool.stats()["num_cache_hits"] == 2
    # a pass writing into a cached page gets its own copy: the cache's page keeps what it held
    [(src, dst)] = pool.prepare_write(2, [found[1]])
    assert src == physical[1] and dst not in physical and pool.resolve(2, [found[1]]) == [dst]
    pool.end_instance(1)
    pool.end_instance(2)
    assert pool.stats()["num_used"] == 3  # the cache alone keeps its pages
    assert pool.cache_clear() == 3 and pool.stats()["num_used"] == 0


def test_the_cache_is_private_to_its_scope_and_an_instance_without_one_has_none(pool):
    pool.add_instance(1, cache_scope=5)
    pool.add_instance(2, cache_scope=6)
    pool.add_instance(3)  # no scope
    [page] = pool.allocate(1, 1)
    pool.cache_store(1, ["k"], [page])
    assert pool.cache_lookup(2, ["k"]) == [] and pool.cache_lookup(3, ["k"]) == []
    [other] = pool.allocate(3, 1)
    assert pool.cache_store(3, ["k"], [other]) == 0  # stores nothing
    [mine] = pool.allocate(2, 1)
    assert pool.cache_store(2, ["k"], [mine]) == 1  # its own scope's "k"
    assert pool.resolve(2, pool.cache_lookup(2, ["k"])) == pool.resolve(2, [mine])
    assert pool.resolve(1, pool.cache_lookup(1, ["k"])) == pool.resolve(1, [page])
    with pytest.raises(InvalidHandle, match="not held"):
        pool.cache_store(1, ["z"], [99])  # a handle it does not hold
    with pytest.raises(ValueError, match="2 keys for 1 pages"):
        pool.cache_store(1, ["y", "z"], [page])
    assert pool.cache_clear(5) == 1 and pool.stats()["num_cached"] == 1


def test_a_lookup_takes_no_more_than_the_quota_allows(pool):
    pool.add_instance(1, cache_scope=5)
    pool.add_instance(2, quota=3, cache_scope=5)
    pool.cache_store(1, ["a", "b", "c", "d"], pool.allocate(1, 4))
    pool.allocate(2, 1)
    assert len(pool.cache_lookup(2, ["a", "b", "c", "d"])) == 2  # 1 held + 2 found = its quota of 3


def test_under_pressure_the_least_recently_used_entries_go_first_and_before_anyone_else(pool, terminations):
    pool.add_instance(1, cache_scope=5)
    chain1, chain2 = pool.allocate(1, 4), pool.allocate(1, 4)
    pool.cache_store(1, ["p1", "p2", "p3", "p4"], chain1)
    pool.cache_store(1, ["q1", "q2", "q3", "q4"], chain2)
    pool.free(1, chain1 + chain2)  # the cache alone holds the 8 pages
    pool.add_instance(2, cache_scope=5)
    assert pool.resolve(2, pool.cache_lookup(2, ["p1", "p2", "p3", "p4"])) != []  # "p" used last: kept longer
    held = pool.cache_lookup(2, ["p1", "p2"])
    pool.free(2, [h for h in pool.handles(2) if h not in held])
    # 8 free + 8 cached: 11 more needs 3 entries to go: the oldest whose pages come free: q4, q3, q2 (a
    # chain's later pages are older than its first, so a chain is cut from its end)
    pool.allocate(2, 11)
    assert terminations == [] and pool.stats()["num_cache_evictions"] == 3
    assert len(pool.cache_lookup(2, ["q1", "q2"])) == 1
    # p1 and p2 are held by instance 2 too: dropping them frees nothing, so they are passed over
    pool.add_instance(3, cache_scope=5)
    pool.allocate(3, 2)  # q1's page was taken again by the lookup above: p3, p4 go
    assert pool.stats()["num_cache_evictions"] == 5 and terminations == []
    assert len(pool.cache_lookup(3, ["p1", "p2", "p3"])) == 2


def test_a_page_is_filed_under_one_key_at_most_so_entries_never_outnumber_pages(pool):
    """A hostile store of one page under many keys files it once: the cache's entries (and the memory they
    take) are bounded by the pool's pages."""
    pool.add_instance(1, cache_scope=5)
    pool.add_instance(2, cache_scope=6)
    [page] = pool.allocate(1, 1)
    assert pool.cache_store(1, [f"k{i}" for i in range(100)], [page] * 100) == 1
    other = pool.allocate(2, 1)
    assert pool.cache_store(2, ["other"], other) == 1
    assert pool.stats()["num_cached"] == 2 and pool.refcount(pool.resolve(1, [page])[0]) == 2
    pool.cache_clear()
    assert pool.cache_store(1, ["again"], [page]) == 1  # its entry gone, the page may be filed anew
