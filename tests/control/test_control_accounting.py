"""The accounting invariant under random operation sequences (hypothesis).

A plain Python model tracks who holds which page; after every step the pool must agree with it
page by page, and whenever an instance ends, everything it held is back except persistent exports.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pie.control import InstanceTerminated, PagePool, QuotaExceeded

NUM_PAGES = 24


class PoolModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.terminated_now: list[int] = []
        self.pool = PagePool(NUM_PAGES, 4, on_terminate=lambda i, _m: self.terminated_now.append(i))
        self.handles: dict[int, dict[int, int]] = {}  # live instance -> handle -> page
        self.quota: dict[int, int] = {}
        self.terminated: set[int] = set()
        self.exports: dict[str, tuple[int | None, bool, list[int]]] = {}  # name -> (live owner, persistent, pages)
        self.next_instance = 1
        self.next_export = 0

    # ---- model helpers ------------------------------------------------------------------------
    def expected_refcounts(self) -> list[int]:
        counts = [0] * NUM_PAGES
        for handles in self.handles.values():
            for page in handles.values():
                counts[page] += 1
        for _owner, _persistent, pages in self.exports.values():
            for page in pages:
                counts[page] += 1
        return counts

    def release(self, instance: int) -> None:
        self.handles.pop(instance, None)
        for name, (owner, persistent, pages) in list(self.exports.items()):
            if owner == instance:
                if persistent:
                    self.exports[name] = (None, True, pages)
                else:
                    del self.exports[name]

    def apply_terminations(self) -> None:
        for instance in self.terminated_now:
            self.release(instance)
            self.terminated.add(instance)
        self.terminated_now.clear()

    def live(self) -> list[int]:
        return sorted(self.handles)

    def charged(self, instance: int) -> int:
        """What counts toward an instance's quota: its handles and the pages of the exports it owns."""
        exported = sum(len(pages) for owner, _persistent, pages in self.exports.values() if owner == instance)
        return len(self.handles[instance]) + exported

    # ---- rules --------------------------------------------------------------------------------
    @rule(quota=st.sampled_from([0, 0, 3, 8]))
    def add_instance(self, quota):
        instance = self.next_instance
        self.next_instance += 1
        self.pool.add_instance(instance, quota)
        self.handles[instance] = {}
        self.quota[instance] = quota

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), count=st.integers(1, 10))
    def allocate(self, data, count):
        instance = data.draw(st.sampled_from(self.live()))
        free_before = NUM_PAGES - sum(1 for c in self.expected_refcounts() if c)
        try:
            got = self.pool.allocate(instance, count)
        except QuotaExceeded:
            assert self.quota[instance] and self.charged(instance) + count > self.quota[instance]
            assert not self.terminated_now
            return
        except InstanceTerminated:
            assert self.terminated_now == [instance] and count > free_before
            self.apply_terminations()
            return
        assert (count > free_before) == bool(self.terminated_now)
        assert all(victim > instance for victim in self.terminated_now)  # only newer ones
        self.apply_terminations()
        pages = self.pool.resolve(instance, got)
        assert all(self.expected_refcounts()[p] == 0 for p in pages)  # came from the free pages
        self.handles[instance].update(zip(got, pages))

    def draw_handles(self, data, instance):
        owned = sorted(self.handles[instance])
        return data.draw(st.lists(st.sampled_from(owned), unique=True, max_size=len(owned))) if owned else []

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def free(self, data):
        instance = data.draw(st.sampled_from(self.live()))
        handles = self.draw_handles(data, instance)
        self.pool.free(instance, handles)
        for handle in handles:
            del self.handles[instance][handle]

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def fork(self, data):
        instance = data.draw(st.sampled_from(self.live()))
        handles = self.draw_handles(data, instance)
        try:
            forked = self.pool.fork(instance, handles)
        except QuotaExceeded:
            return
        for old, new in zip(handles, forked):
            self.handles[instance][new] = self.handles[instance][old]

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def prepare_write(self, data):
        instance = data.draw(st.sampled_from(self.live()))
        handles = self.draw_handles(data, instance)
        counts = self.expected_refcounts()
        shared = []  # handles that get a copy: in order, while their page is still shared
        for handle in handles:
            page = self.handles[instance][handle]
            if counts[page] > 1:
                counts[page] -= 1
                shared.append(handle)
        try:
            copies = self.pool.prepare_write(instance, handles)
        except InstanceTerminated:
            assert self.terminated_now and self.terminated_now[-1] == instance
            self.apply_terminations()
            return
        self.apply_terminations()
        assert [src for src, _ in copies] == [self.handles[instance][h] for h in shared]
        for handle, (_src, dst) in zip(shared, copies):
            assert self.expected_refcounts()[dst] == 0
            self.handles[instance][handle] = dst
        assert self.pool.resolve(instance, handles) == [self.handles[instance][h] for h in handles]

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), persistent=st.booleans())
    def export(self, data, persistent):
        instance = data.draw(st.sampled_from(self.live()))
        handles = self.draw_handles(data, instance)
        name = f"export-{self.next_export}"
        self.next_export += 1
        try:
            self.pool.export_pages(instance, name, handles, persistent)
        except QuotaExceeded:  # an export's pages count toward its owner's quota
            assert self.quota[instance] and self.charged(instance) + len(handles) > self.quota[instance]
            return
        assert not self.quota[instance] or self.charged(instance) + len(handles) <= self.quota[instance]
        self.exports[name] = (instance, persistent, [self.handles[instance][h] for h in handles])

    @precondition(lambda self: self.handles and self.exports)
    @rule(data=st.data())
    def import_(self, data):
        instance = data.draw(st.sampled_from(self.live()))
        name = data.draw(st.sampled_from(sorted(self.exports)))
        try:
            got = self.pool.import_pages(instance, name)
        except QuotaExceeded:
            return
        self.handles[instance].update(zip(got, self.exports[name][2]))

    @precondition(lambda self: self.exports)
    @rule(data=st.data())
    def unexport(self, data):
        name = data.draw(st.sampled_from(sorted(self.exports)))
        owner = self.exports[name][0]
        self.pool.unexport(name, owner)
        del self.exports[name]

    @precondition(lambda self: self.handles or self.terminated)
    @rule(data=st.data(), how=st.sampled_from(["end", "terminate-then-end"]))
    def end_instance(self, data, how):
        instance = data.draw(st.sampled_from(sorted(set(self.handles) | self.terminated)))
        kept_by_others = self.expected_refcounts()
        mine = list(self.handles.get(instance, {}).values())
        if how == "terminate-then-end" and instance in self.handles:
            self.pool.terminate(instance, "trapped")
        released = self.pool.end_instance(instance)
        assert released == (0 if how == "terminate-then-end" or instance in self.terminated else len(mine))
        self.release(instance)
        self.terminated.discard(instance)
        # Everything it held is back, except what others (and persistent exports) still hold.
        after = self.expected_refcounts()
        for page in mine:
            assert self.pool.refcount(page) == after[page] <= kept_by_others[page]
        assert instance not in self.pool.stats()["instances"]

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def pool_agrees_with_the_model(self):
        self.pool.check_invariants()
        expected = self.expected_refcounts()
        assert [self.pool.refcount(p) for p in range(NUM_PAGES)] == expected
        stats = self.pool.stats()
        assert stats["num_used"] == sum(1 for c in expected if c)
        assert stats["num_used"] + stats["num_free"] == NUM_PAGES
        assert sorted(self.pool.export_names()) == sorted(self.exports)
        for instance, handles in self.handles.items():
            assert self.pool.handles(instance) == sorted(handles)
            assert stats["instances"][instance]["num_handles"] == len(handles)
        assert {i for i, usage in stats["instances"].items() if usage["terminated"]} == self.terminated


TestPoolAccounting = PoolModel.TestCase
TestPoolAccounting.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
