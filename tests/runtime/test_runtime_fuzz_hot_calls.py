"""Fuzzing the hot host calls (hypothesis): two WAT guests (tests/runtime/wat_hot_guest.py) call kv.allocate,
kv.free, kv.fork, kv.copy-tokens, kv.mask-page, forward.submit, forward.wait and forward.ready (and
runtime.instance-id, kv.page-size) with random arguments: handles that were never issued, were freed, or belong
to the other instance; huge counts; out-of-range offsets; malformed passes; unknown and consumed futures.

A small Python model of each instance (the handles it holds, the futures it may wait for) decides every
call's outcome: a call the model deems valid must succeed (with the handles / future ids it predicts), an
invalid one must trap with the host's message, which names the call (and, where the model can tell, is
exactly the expected line). Where the outcome depends on what the model does not track (the pool running out
of pages: allocations near the pool's size, copy-on-write with few free pages), either outcome is accepted,
but an error must still name the call. After every step the pool agrees with the model handle by handle and
its invariants hold; after every example both instances are released, the pool is whole again and a fresh
instance still runs a pass.

A trap poisons the component instance: the guest is instantiated again on the same instance state (the
model keeps the handles in Python; the guest's handle table is only scratch space for the call's arguments).

PIE_FUZZ_EXAMPLES / PIE_FUZZ_STEPS: examples and steps per example (default 60 / 20). A failure is reported as
generated, not shrunk (shrinking a stateful example of real passes can take minutes); PIE_FUZZ_SHRINK=1
shrinks it to a minimal one.
"""

from __future__ import annotations

import math
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import wasmtime
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from pie.runtime.instance import explain_wasm_error
from wat_hot_guest import HOT_GUEST

EXAMPLES = int(os.environ.get("PIE_FUZZ_EXAMPLES", "60"))
STEPS = int(os.environ.get("PIE_FUZZ_STEPS", "20"))
SHRINK = os.environ.get("PIE_FUZZ_SHRINK", "") not in ("", "0")
U32 = 2**32 - 1
U64 = 2**64 - 1
OUTCOMES: Counter[str] = Counter()  # "<call>: ok" / "<call>: error <first words>" (printed with -s)
GREEDY, SAMPLE, TOP_K, LOGPROBS, RAW_LOGITS, NO_OUTPUT = range(6)  # the guest's sampler codes

# ---- the guest: HOT_GUEST plus raw-handle entry points ----------------------------------------------
# load(pages): the handle table := pages (the arguments of copy / mask / submit, which take table indices);
# alloc-list(n) / fork-list(pages): kv.allocate / kv.fork returning the host's list as is (the table holds
# 1024 handles, fewer than the pool's pages).
_CORE_ANCHOR = '(func (export "instance-id") (result i64) (call $instance-id))'
_CORE_EXTRA = r"""
    (func (export "load") (param $ptr i32) (param $len i32)
      (global.set $n (i32.const 0))
      (drop (call $append (local.get $ptr) (local.get $len))))
    (func (export "alloc-list") (param $count i32) (result i32)
      (call $allocate (local.get $count) (i32.const 16))
      (i32.const 16))
    (func (export "fork-list") (param $ptr i32) (param $len i32) (result i32)
      (call $fork (local.get $ptr) (local.get $len) (i32.const 16))
      (i32.const 16))
"""
_LIFT_ANCHOR = '(func (export "instance-id") (result u64) (canon lift (core func $m "instance-id")))'
_LIFT_EXTRA = r"""
  (func (export "load") (param "pages" (list u32))
    (canon lift (core func $m "load") (memory $mem) (realloc $realloc)))
  (func (export "alloc-list") (param "n" u32) (result (list u32))
    (canon lift (core func $m "alloc-list") (memory $mem)))
  (func (export "fork-list") (param "pages" (list u32)) (result (list u32))
    (canon lift (core func $m "fork-list") (memory $mem) (realloc $realloc)))
"""
assert HOT_GUEST.count(_CORE_ANCHOR) == 1 and HOT_GUEST.count(_LIFT_ANCHOR) == 1
FUZZ_GUEST = (HOT_GUEST.replace(_CORE_ANCHOR, _CORE_EXTRA + "    " + _CORE_ANCHOR)
              .replace(_LIFT_ANCHOR, _LIFT_EXTRA + "  " + _LIFT_ANCHOR))


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class Guest:
    """The component on a test instance state. Two of them live on this thread: each call binds its state
    first. A trap poisons the component instance: `call` instantiates it again (same state, same pages)."""

    def __init__(self, runtime, component):
        self.runtime = runtime
        self.component = component
        self.state = runtime.bind_test_instance()
        self.id = self.state.id
        self.released = False
        self.instantiate()

    def instantiate(self) -> None:
        self.store = wasmtime.Store(self.runtime.wasm_engine)
        self.store.set_epoch_deadline(1 << 40)
        self.instance = self.runtime.linker.instantiate(self.store, self.component)

    def call(self, name: str, *args):
        """(True, result) or (False, the host's one-line message)."""
        self.state.bind()
        func = self.instance.get_func(self.store, name)
        assert func is not None, name
        try:
            return True, func(self.store, *args)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            self.instantiate()
            return False, explain_wasm_error(e, 0.0, 0.0)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.runtime.release_test_instance(self.state)


@dataclass
class Pass:
    num_out: int
    kind: int
    args: list[int]  # the sampler argument of each output
    uncertain: bool = False  # its instance was terminated (pool exhausted) after it was submitted


@dataclass
class Model:
    """What one instance holds, as the host must see it."""
    guest: Guest
    held: set[int] = field(default_factory=set)
    freed: set[int] = field(default_factory=set)  # issued, no longer held
    next_handle: int = 0
    terminated: bool = False  # by the pool, when it ran out of pages
    pending: dict[int, Pass] = field(default_factory=dict)  # futures it may wait for
    consumed: set[int] = field(default_factory=set)
    next_future: int = 1

    @property
    def id(self) -> int:
        return self.guest.id

    def issue(self, count: int) -> list[int]:
        handles = list(range(self.next_handle, self.next_handle + count))
        self.next_handle += count
        self.held.update(handles)
        return handles


# What a call must do: None (succeed), ("exact", rest) (trap with "<call>: <rest>"), ("prefix", rest) (trap
# with a message starting "<call>: <rest>"), ("any", [rest, ...]) (trap like "prefix", with one of them),
# ("either", rest) (succeed, or trap like "prefix").
Expect = tuple[str, "str | list[str]"] | None


class HotCallFuzz(RuleBasedStateMachine):
    runtime = None  # set by the test
    component = None

    # ---- set-up / tear-down ---------------------------------------------------------------------
    @initialize()
    def start(self):
        rt = type(self).runtime
        self.rt = rt
        self.pool = rt.plane.kv_pages
        self.ps = rt.page_size
        self.vocab = rt.vocab_size
        self.num_pages = rt.num_pages
        self.max_tokens = rt.plane.limits.max_tokens
        self.max_position = rt.plane.limits.max_position
        assert_pool_whole(rt)
        self.ended: list[Model] = []  # released instances (their handles and futures are foreign now)
        self.may_terminate = False  # this step may let the pool terminate an instance (exhaustion)
        self.guests: list[Guest] = []  # every instance started, released by teardown whatever happened
        self.models: list[Model] = []
        self.models += [self.new_model()]
        self.models += [self.new_model()]

    def new_guest(self) -> Guest:
        g = Guest(self.rt, type(self).component)
        self.guests.append(g)
        return g

    def new_model(self) -> Model:
        """A new instance (the newest) holding a few pages to play with."""
        m = Model(self.new_guest())
        count = min(3, self.free_pages())
        ok, handles = m.guest.call("alloc-list", count)
        assert ok and handles == m.issue(count), handles
        return m

    def teardown(self):
        if not hasattr(self, "guests"):
            return
        for g in self.guests:
            g.release()
        self.assert_pool_whole()
        # the server is alive: a fresh instance allocates, runs a pass and frees
        g = self.new_guest()
        try:
            ok, pages = g.call("alloc-list", 1)
            assert ok and len(pages) == 1, pages
            assert g.call("load", pages)[0]
            ok, token = g.call("forward-greedy", [1, 2, 3], 0, 0, 1, 3)
            assert ok and 0 <= token < self.vocab, token
            ok, err = g.call("free-handles", pages)
            assert ok, err
        finally:
            g.release()
            self.assert_pool_whole()

    def assert_pool_whole(self) -> None:
        """No instance holds anything: every page is free once the commands still queued (which pin their
        pages) have run or been dropped; the instances ended are gone from the pool."""
        assert_pool_whole(self.rt, [g.id for g in self.guests])

    # ---- helpers ----------------------------------------------------------------------------------
    def check(self, call: str, expect: Expect, ok: bool, result) -> bool:
        """Checks the outcome against the model's expectation; True when the call succeeded."""
        what = "ok" if ok else "error " + re.sub(r"\d+", "N", " ".join(str(result)[len(call) + 2:].split(" ")[:3]))
        OUTCOMES[f"{call}: {what}"] += 1
        if not ok:
            assert result.startswith(call + ": "), f"the error does not name {call}: {result!r}"
        if expect is None:
            assert ok, f"a valid {call} was rejected: {result!r}"
            return True
        how, rest = expect
        if how == "either" and ok:
            return True
        assert not ok, f"an invalid {call} was accepted (expected the error {call}: {rest}...), returned {result!r}"
        if how == "exact":
            assert result == f"{call}: {rest}", f"{result!r} != {call + ': ' + rest!r}"
        elif how == "any":
            assert any(result.startswith(f"{call}: {r}") for r in rest), f"{result!r} starts with none of {rest!r}"
        else:
            assert result.startswith(f"{call}: {rest}"), f"{result!r} does not start with {call + ': ' + rest!r}"
        return False

    @staticmethod
    def terminated_msg(m: Model) -> str:
        return f"instance {m.id} terminated: "

    @staticmethod
    def unheld(m: Model, handles, field: str) -> Expect:
        """The pool's error for the first of `handles` the instance does not hold (None: it holds them all)."""
        missing = [h for h in handles if h not in m.held]
        if missing:
            return ("exact", f"{field}: instance {m.id}: KV page handle {missing[0]} is not held by this instance")
        return None

    def pick(self, inst: int) -> tuple[Model, Model]:
        return self.models[inst], self.models[1 - inst]

    def foreign_handles(self, m: Model) -> list[int]:
        """Handles of the other instances (live or ended)."""
        others = [o for o in self.models + self.ended if o is not m]
        return sorted(set().union(*(o.held | o.freed for o in others)))

    def handle_strategy(self, m: Model):
        """Mostly a handle the instance holds; else one it freed, another instance's, or one never issued."""
        held = sorted(m.held)
        groups = [held] * 4 + [sorted(m.freed), self.foreign_handles(m),
                               [m.next_handle, m.next_handle + 1, m.next_handle + 1000, 2**31, U32]]
        return st.one_of(*[st.sampled_from(g) for g in groups if g])

    def draw_handles(self, data, m: Model, max_size: int = 5, unique: bool = True) -> list[int]:
        """Half the time handles the instance holds (distinct unless `unique` is False), else anything."""
        anything = st.lists(self.handle_strategy(m), max_size=max_size)
        if not m.held:
            return data.draw(anything, label="handles")
        mine = st.lists(st.sampled_from(sorted(m.held)), min_size=1, max_size=max_size, unique=unique)
        return data.draw(st.one_of(mine, anything), label="handles")

    def draw_future(self, data, m: Model) -> int:
        others = [o for o in self.models + self.ended if o is not m]
        foreign = sorted(set().union(*(set(o.pending) | o.consumed for o in others)))
        groups = [sorted(m.pending)] * 4 + [sorted(m.consumed), foreign,
                                            [0, m.next_future, m.next_future + 7, 2**32, U64]]
        return data.draw(st.one_of(*[st.sampled_from(g) for g in groups if g]), label="future")

    def free_pages(self) -> int:
        """The pool's free pages once the commands queued so far are done (they pin their pages until
        then): what decides whether the next call finds enough pages, the same on every run of an example."""
        deadline = time.monotonic() + 60  # a pass that never completes: the server is stuck
        for m in self.models:
            for f in sorted(m.pending):
                while (r := m.guest.call("ready", f)) != (True, True):
                    assert r == (True, False), f"forward.ready of a pending pass failed: {r}"
                    assert time.monotonic() < deadline, f"pass {f} of instance {m.id} never completed"
                    time.sleep(0.001)
        # copies are not waited for: they unpin their pages once run (a failed pass keeps its pins until
        # it is waited for)
        last, since = -1, time.monotonic()
        while (pinned := (stats := self.pool.stats())["num_pinned"]) and time.monotonic() - since < 0.05:
            if pinned != last:
                last, since = pinned, time.monotonic()
            time.sleep(0.001)
        return stats["num_free"]

    # ---- instances ----------------------------------------------------------------------------------
    @rule(inst=st.integers(0, 1))
    def ids(self, inst):
        m = self.models[inst]
        assert m.guest.call("instance-id") == (True, m.id)
        assert m.guest.call("page-size") == (True, self.ps)

    @rule(inst=st.integers(0, 1))
    def restart(self, inst):
        """The instance ends (whatever it holds, pending passes included) and a new one takes its place."""
        m = self.models[inst]
        m.guest.release()
        assert m.id not in self.pool.stats()["instances"]
        m.freed |= m.held
        m.held.clear()
        m.consumed |= set(m.pending)
        m.pending.clear()
        self.ended.append(m)
        self.models[inst] = self.new_model()

    # ---- kv -------------------------------------------------------------------------------------------
    @rule(data=st.data(), inst=st.integers(0, 1))
    def allocate(self, data, inst):
        m, _ = self.pick(inst)
        free = self.free_pages()
        how = data.draw(st.sampled_from(["small"] * 12 + ["over", "huge", "free", "free+1", "pool"]), label="how")
        count = {
            "small": lambda: data.draw(st.integers(0, 4), label="count"),
            "free": lambda: free,
            "free+1": lambda: free + 1,
            "pool": lambda: self.num_pages,
            "over": lambda: data.draw(st.sampled_from([self.num_pages + 1, 2**31, U32]), label="count"),
            "huge": lambda: data.draw(st.integers(self.num_pages + 1, U32), label="count"),
        }[how]()
        if count > self.num_pages:  # refused before the pool is asked, whatever the instance's state
            expect = ("exact", f"count: {count} pages requested, more than the pool's {self.num_pages}")
        elif m.terminated:
            expect = ("prefix", "count: " + self.terminated_msg(m))
        elif count <= free:
            expect = None
        else:  # the pool is short: the newer instance, or this one, is terminated (or pins came free)
            expect = ("either", "count: " + self.terminated_msg(m) + "the KV page pool is exhausted")
            self.may_terminate = True
        ok, result = m.guest.call("alloc-list", count)
        if self.check("kv.allocate", expect, ok, result):
            assert result == m.issue(count)
        elif expect[0] == "either":
            m.terminated = True  # checked against the pool by the invariant

    @rule(data=st.data(), inst=st.integers(0, 1))
    def free(self, data, inst):
        m, _ = self.pick(inst)
        handles = self.draw_handles(data, m, max_size=6)
        expect = None
        if m.terminated:
            expect = ("prefix", "pages: " + self.terminated_msg(m))
        else:
            seen = set()
            for h in handles:
                if h in seen:
                    expect = ("exact", f"pages: instance {m.id}: KV page handle {h} is listed twice")
                    break
                seen.add(h)
            else:
                expect = self.unheld(m, handles, "pages")
        ok, result = m.guest.call("free-handles", handles)
        if self.check("kv.free", expect, ok, result):
            m.held.difference_update(handles)
            m.freed.update(handles)

    @rule(data=st.data(), inst=st.integers(0, 1))
    def fork(self, data, inst):
        m, _ = self.pick(inst)
        handles = self.draw_handles(data, m, unique=False)  # repeats are allowed: a fork of each
        expect = None
        if m.terminated:
            expect = ("prefix", "pages: " + self.terminated_msg(m))
        else:
            expect = self.unheld(m, handles, "pages")
        ok, result = m.guest.call("fork-list", handles)
        if self.check("kv.fork", expect, ok, result):
            assert result == m.issue(len(handles))

    @rule(data=st.data(), inst=st.integers(0, 1))
    def copy_tokens(self, data, inst):
        m, _ = self.pick(inst)
        ps = self.ps
        hs = self.handle_strategy(m)
        src, dst = data.draw(hs, label="src"), data.draw(hs, label="dst")
        if data.draw(st.booleans(), label="offsets in range"):
            count = data.draw(st.integers(0, ps), label="count")
            src_off = data.draw(st.integers(0, ps - count), label="src_off")
            dst_off = data.draw(st.integers(0, ps - count), label="dst_off")
        else:
            offset = st.one_of(st.integers(0, ps + 1), st.sampled_from([2**31, U32 - ps, U32]),
                               st.integers(0, U32))
            src_off, dst_off, count = (data.draw(offset, label=n) for n in ("src_off", "dst_off", "count"))
        if src_off + count > ps:
            expect = ("exact", f"src-offset + count = {src_off + count} exceeds the page size {ps}")
        elif dst_off + count > ps:
            expect = ("exact", f"dst-offset + count = {dst_off + count} exceeds the page size {ps}")
        elif m.terminated or src not in m.held:
            expect = ("exact", f"src: {src} is not a page handle of this instance")
        elif dst not in m.held:
            expect = ("exact", f"dst: {dst} is not a page handle of this instance")
        elif count == 0 or self.free_pages() >= 1:  # a shared dst gets its own copy first: one page
            expect = None
        else:
            expect = ("either", "dst: " + self.terminated_msg(m))
            self.may_terminate = True
        assert m.guest.call("load", [src, dst])[0]
        ok, result = m.guest.call("copy", 0, 1, src_off, dst_off, count)
        if not self.check("kv.copy-tokens", expect, ok, result) and expect[0] == "either":
            m.terminated = True  # checked against the pool by the invariant

    @rule(data=st.data(), inst=st.integers(0, 1))
    def mask_page(self, data, inst):
        m, _ = self.pick(inst)
        h = data.draw(self.handle_strategy(m), label="page")
        ps = self.ps
        cuts = st.lists(st.integers(0, ps), max_size=5).map(
            lambda c: [b - a for a, b in zip([0] + sorted(c), sorted(c) + [ps])])  # runs adding up to ps
        runs = data.draw(st.one_of(cuts, st.lists(st.one_of(st.integers(0, 2 * ps),
                                                            st.sampled_from([2**31, U32])), max_size=6)),
                         label="runs")
        if sum(runs) != ps:
            expect = ("exact", f"mask: runs add up to {sum(runs)}, not the page size {ps}")
        elif m.terminated or h not in m.held:
            expect = ("exact", f"p: {h} is not a page handle of this instance")
        else:
            expect = None
        assert m.guest.call("load", [h])[0]
        ok, result = m.guest.call("mask", 0, runs)
        self.check("kv.mask-page", expect, ok, result)

    # ---- forward ------------------------------------------------------------------------------
    @rule(data=st.data(), inst=st.integers(0, 1))
    def submit(self, data, inst):
        """A pass that fits the instance's pages, then (half the time) one thing about it made wrong; the
        model (submit_expectation) decides from the result alone."""
        m, _ = self.pick(inst)
        ps, vocab = self.ps, self.vocab
        if m.held:
            pages = data.draw(st.lists(st.sampled_from(sorted(m.held)), min_size=1, max_size=3, unique=True),
                              label="pages")
        else:
            pages = self.draw_handles(data, m, max_size=3)
        last_len = data.draw(st.integers(1, ps), label="last_len")
        kv_len = max(len(pages) - 1, 0) * ps + last_len
        t = data.draw(st.integers(1, max(1, min(kv_len, 8))), label="t")
        tokens = data.draw(st.lists(st.integers(0, vocab - 1), min_size=t, max_size=t), label="tokens")
        num_pos = t
        first_pos = data.draw(st.one_of(st.integers(0, 64), st.sampled_from([4096, 2**31 - 1, U32 - 3])),
                              label="first_pos")
        kind = data.draw(st.integers(0, 5), label="sampler")
        arg = data.draw({TOP_K: st.sampled_from([1, 5, vocab]),
                         LOGPROBS: st.sampled_from([0, 1, vocab - 1])}.get(kind, st.integers(0, U32)), label="arg")
        repeat = data.draw(st.sampled_from([1, 1, 1, 0, 2, 3]), label="repeat")
        params = data.draw(st.tuples(st.sampled_from([0.8, 1.0, 1e-3]), st.sampled_from([0, 1, 20, vocab, vocab + 1]),
                                     st.sampled_from([0.9, 1.0, 0.5]), st.sampled_from([0.0, 0.05, 1.0])),
                           label="sample_params")
        wrong = data.draw(st.sampled_from([None] * 7 + ["pages", "last_len", "no tokens", "too few pages",
                                                        "token id", "positions", "too many tokens",
                                                        "sampler", "sample params", "written twice"]),
                          label="wrong")
        if wrong == "pages":
            pages = self.draw_handles(data, m, max_size=4, unique=False)
        elif wrong == "last_len":
            last_len = data.draw(st.sampled_from([0, ps + 1, 2**31, U32]), label="last_len")
        elif wrong == "no tokens":
            tokens, num_pos = [], 0
        elif wrong == "too few pages":
            t = min(kv_len + 1, 12)
            tokens, num_pos = tokens + [1] * (t - len(tokens)), t
        elif wrong == "token id":
            i = data.draw(st.integers(0, len(tokens) - 1), label="i")
            tokens = tokens[:i] + [data.draw(st.sampled_from([vocab, vocab + 1, U32]), label="id")] + tokens[i + 1:]
        elif wrong == "positions":
            num_pos = data.draw(st.sampled_from([0, t + 1, t - 1, 5000]), label="num_pos")
        elif wrong == "too many tokens":
            tokens, num_pos = [7] * (self.max_tokens + 1), self.max_tokens + 1
        elif wrong == "sampler":
            kind = data.draw(st.sampled_from([TOP_K, LOGPROBS]), label="sampler")
            arg = data.draw({TOP_K: st.sampled_from([0, vocab + 1, U32, vocab - 1]),  # + i: vocab + 1, 0
                             LOGPROBS: st.sampled_from([vocab, U32, vocab - 1])}[kind], label="arg")
        elif wrong == "sample params":
            kind = SAMPLE
            params = data.draw(st.tuples(
                st.sampled_from([0.8, 0.0, -1.0, math.inf, math.nan]),
                st.sampled_from([0, 1, vocab + 1, U32]),  # top-k: any (0: off)
                st.sampled_from([0.9, 0.0, 1.5, -0.1, math.nan]),
                st.sampled_from([0.0, 1.5, -0.5, math.nan])), label="sample_params")
        elif wrong == "written twice":
            pages = pages + pages[-1:]
            last_len = data.draw(st.integers(1, ps), label="last_len")
        temperature, top_k, top_p, min_p = params
        seeded = data.draw(st.booleans(), label="seeded")
        num_out = repeat if kind < NO_OUTPUT else 0
        args = [(arg + i) & U32 for i in range(num_out)]
        expect = self.submit_expectation(m, tokens, num_pos, pages, last_len, kind, args,
                                         (f32(temperature), top_k, f32(top_p), f32(min_p)), first_pos)
        if expect is None:  # pages of the pass it writes that are shared get their own copy first
            written = pages[((len(pages) - 1) * ps + last_len - len(tokens)) // ps:]
            if self.free_pages() < len(written):
                expect = ("either", "fwd.pages: " + self.terminated_msg(m))
                self.may_terminate = True
        g = m.guest
        assert g.call("set-repeat", repeat)[0] and g.call("set-sample", temperature, top_k, top_p, min_p, seeded)[0]
        assert g.call("load", pages)[0]
        ok, result = g.call("submit", tokens, first_pos, num_pos, 0, len(pages), last_len, kind, arg)
        if self.check("forward.submit", expect, ok, result):
            assert result == m.next_future, (result, m.next_future)
            m.next_future += 1
            m.pending[result] = Pass(num_out, kind, args)
            then = data.draw(st.sampled_from([None, "ready", "wait", "wait"]), label="then")
            if then == "ready":
                self.ready_for(m, result)
            elif then == "wait":
                self.wait_for(m, result)
        elif expect[0] == "either" and self.terminated_msg(m) in result:
            m.terminated = True  # checked against the pool by the invariant

    def submit_expectation(self, m: Model, tokens, num_pos, pages, last_len, kind, args, params,
                           first_pos: int = 0) -> Expect:
        """The host's checks, in its order (host_calls.cpp forward_submit, then check_forward)."""
        ps, vocab = self.ps, self.vocab
        temperature, top_k, top_p, min_p = params
        if kind == SAMPLE and args and not temperature > 0:  # parsing the samplers: the WIT's own rule
            return ("prefix", "fwd.samplers[0]: sample: temperature ")
        if not pages:
            return ("exact", "fwd.pages: empty: the sequence must hold at least the input tokens")
        if m.terminated:
            return ("prefix", "fwd.pages: " + self.terminated_msg(m))
        if (unheld := self.unheld(m, pages, "fwd.pages")) is not None:
            return unheld
        t = len(tokens)
        if t == 0:
            return ("exact", "fwd.tokens: empty request: a pass needs at least one input token (or input embedding)")
        if t > self.max_tokens:
            return ("exact", f"fwd.tokens: {t} tokens exceed max-batch-tokens {self.max_tokens} (split the pass)")
        for i, token in enumerate(tokens):
            if token >= vocab:
                return ("exact", f"fwd.tokens[{i}]: token id {token} is outside the vocabulary [0, {vocab})")
        if num_pos != t:
            return ("exact", f"fwd.positions: {num_pos} positions for {t} tokens")
        for i in range(t):  # the guest adds in u32: positions past 2**32 - 1 wrap around
            if (first_pos + i) % 2**32 >= self.max_position:
                return ("exact", f"fwd.positions[{i}]: position {(first_pos + i) % 2**32} is past the model's "
                                 f"{self.max_position} positions")
        if not 1 <= last_len <= ps:
            return ("exact", f"fwd.last-page-len: {last_len} is not in [1, {ps}]")
        kv_len = (len(pages) - 1) * ps + last_len
        if kv_len < t:
            return ("exact", f"fwd.pages: the sequence holds {kv_len} tokens, fewer than the {t} input tokens")
        later = self.written_expectation(m, pages, kv_len, t)
        for j, a in enumerate(args):
            if kind == SAMPLE:
                # any top-k runs: 0 and >= the vocabulary filter nothing
                if not math.isfinite(temperature):
                    return ("prefix", f"fwd.samplers[{j}]: sample: temperature ")
                if not 0 < top_p <= 1:
                    return ("prefix", f"fwd.samplers[{j}]: sample: top-p ")
                if not 0 <= min_p <= 1:
                    return ("prefix", f"fwd.samplers[{j}]: sample: min-p ")
            elif kind == TOP_K:
                if a == 0:
                    return ("exact", f"fwd.samplers[{j}]: top-k-distribution: k must be >= 1")
                if a > vocab:
                    return ("exact", f"fwd.samplers[{j}]: top-k-distribution: k exceeds the vocabulary size {vocab}")
            elif kind == LOGPROBS and a >= vocab:
                return ("exact", f"fwd.samplers[{j}]: logprobs: token id {a} is outside the vocabulary [0, {vocab})")
        return later

    def written_expectation(self, m: Model, pages, kv_len: int, t: int) -> Expect:
        """The pages the pass writes (its last t slots) get their own copies first: each listed once."""
        seen = set()
        for h in pages[(kv_len - t) // self.ps:]:
            if h in seen:
                return ("exact", f"fwd.pages: instance {m.id}: KV page handle {h} is listed twice")
            seen.add(h)
        return None

    @rule(data=st.data(), inst=st.integers(0, 1))
    def wait(self, data, inst):
        m, _ = self.pick(inst)
        self.wait_for(m, self.draw_future(data, m))

    def wait_for(self, m: Model, f: int) -> None:
        p = m.pending.pop(f, None)
        if p is None:
            expect = ("exact", f"f: {f} is not a pending future of this instance")
        elif p.uncertain:
            expect = ("either", "")
        else:
            expect = None
            deadline = time.monotonic() + 60  # a pass that never completes: the server is stuck
            while m.guest.call("ready", f) == (True, False):
                assert time.monotonic() < deadline, f"pass {f} of instance {m.id} never completed"
                time.sleep(0.002)
        m.consumed.add(f)
        ok, result = m.guest.call("wait", f)
        if self.check("forward.wait", expect, ok, result) and p is not None:
            assert result == p.num_out
            for i, a in enumerate(p.args[:2]):
                ok, ids = m.guest.call("out-ids", i)
                assert ok, ids
                if p.kind in (GREEDY, SAMPLE):
                    assert len(ids) == 1 and 0 <= ids[0] < self.vocab, ids
                elif p.kind == LOGPROBS:
                    ok, values = m.guest.call("out-values", i)
                    assert ids == [a] and ok and len(values) == 1 and values[0] <= 0, (ids, values)
                elif p.kind == TOP_K and a <= 64:
                    ok, values = m.guest.call("out-values", i)
                    assert ok and len(ids) == len(values) == a, (ids, values)
                elif p.kind == RAW_LOGITS:
                    assert ids == []

    @rule(data=st.data(), inst=st.integers(0, 1))
    def ready(self, data, inst):
        m, _ = self.pick(inst)
        self.ready_for(m, self.draw_future(data, m))

    def ready_for(self, m: Model, f: int) -> None:
        expect = None if f in m.pending else ("exact", f"f: {f} is not a pending future of this instance")
        ok, result = m.guest.call("ready", f)
        if self.check("forward.ready", expect, ok, result):
            assert result in (True, False)

    # ---- the pool agrees with the model -------------------------------------------------------
    @invariant()
    def pool_agrees(self):
        if not hasattr(self, "models"):
            return
        self.pool.check_invariants()
        stats = self.pool.stats()
        assert stats["num_used"] + stats["num_free"] == self.num_pages
        for m in self.models:
            usage = stats["instances"][m.id]
            if usage["terminated"] and not m.terminated:
                assert self.may_terminate, f"instance {m.id} was terminated by a step that cannot exhaust the pool"
                m.terminated = True
            if m.terminated:
                assert usage["terminated"] and usage["num_handles"] == 0, usage
                m.freed |= m.held
                m.held.clear()
                for p in m.pending.values():
                    p.uncertain = True
            else:
                assert self.pool.handles(m.id) == sorted(m.held)
                assert usage["num_handles"] == len(m.held)
        self.may_terminate = False


def assert_pool_whole(runtime, ended: Sequence[int] = ()) -> None:
    """Every page is free (once the commands still queued, which pin their pages, have run or been
    dropped), the pool's invariants hold, and the instances `ended` are gone from it."""
    deadline = time.monotonic() + 30
    while runtime.num_free_pages != runtime.num_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    pool = runtime.plane.kv_pages
    pool.check_invariants()
    stats = pool.stats()
    assert stats["num_free"] == stats["num_pages"], f"pages leaked: {stats}"
    assert not set(ended) & set(stats["instances"]), f"instances not released: {stats}"


def test_hot_calls_fuzz(runtime):
    """Random hot calls from two guests: each error names its call, valid calls succeed, the pool stays
    consistent, and everything comes back when the instances end."""
    HotCallFuzz.runtime = runtime
    HotCallFuzz.component = runtime.load_component(FUZZ_GUEST.encode())
    try:
        run_state_machine_as_test(HotCallFuzz, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            phases=[p for p in Phase if SHRINK or p is not Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]))
    finally:
        HotCallFuzz.runtime = HotCallFuzz.component = None
        print("\n".join(f"{n:6d}  {what}" for what, n in sorted(OUTCOMES.items())))
    assert_pool_whole(runtime)


def test_sample_top_k_beyond_the_vocabulary(runtime):
    """sample-params.top-k larger than the vocabulary (the WIT bounds it nowhere; 0 = no filter) filters
    nothing, as on the CUDA path; another instance's passes queued around it run. (Found by test_hot_calls_fuzz:
    the engine's sampler raised "selected index k out of range" and the batch loop failed the whole batch,
    other instances' passes included.)"""
    component = runtime.load_component(FUZZ_GUEST.encode())
    a, b = Guest(runtime, component), Guest(runtime, component)
    try:
        ok, pages_a = a.call("alloc-list", 1)
        assert ok and a.call("load", pages_a)[0]
        ok, pages_b = b.call("alloc-list", 2)
        assert ok and b.call("load", pages_b)[0]
        assert a.call("set-sample", 0.8, runtime.vocab_size + 1, 1.0, 0.0, True)[0]
        ok, fb0 = b.call("submit", [1, 2, 3], 0, 3, 0, 1, 3, GREEDY, 0)
        assert ok, fb0
        ok, fa = a.call("submit", [1, 2, 3], 0, 3, 0, 1, 3, SAMPLE, 5)
        assert ok, fa
        ok_b1, fb1 = b.call("submit", [1, 2, 3], 0, 3, 1, 1, 3, GREEDY, 0)
        assert ok_b1, fb1
        waited_a = a.call("wait", fa)
        waited_b = [b.call("wait", fb0), b.call("wait", fb1)]
        assert waited_b == [(True, 1), (True, 1)], f"another instance's pass broke this one's: {waited_b}"
        assert waited_a == (True, 1), f"forward.submit accepted the pass, then it failed: {waited_a}"
    finally:
        a.release()
        b.release()
        assert_pool_whole(runtime, [a.id, b.id])
