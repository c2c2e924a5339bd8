"""Batch formation: what each policy groups, priorities, vertical batching, barriers, limits."""

from __future__ import annotations

import threading
import time

import pytest

from pie.control import (
    CommandCancelled,
    CommandFailed,
    Policy,
    Priority,
    QueueClosed,
)

NOTHING_YET = 0.05  # seconds a take() waits to show that nothing is dispatched


def run(batch, results=None):
    """Completes a batch: each command's result is its payload (or `results`)."""
    batch.complete(results if results is not None else batch.payloads)
    return batch


def take_payloads(scheduler, timeout=2.0):
    batch = scheduler.take(timeout)
    assert batch is not None, "expected a batch"
    payloads = batch.payloads
    run(batch)
    return payloads


# ---- eager: grouping by kind, queue order, limits ---------------------------------------------


def test_eager_batches_everything_ready_across_queues_and_within_a_queue(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    a, b, c = (scheduler.create_queue(instance_id=i) for i in (1, 2, 3))
    futures = [a.submit(0, "a0"), b.submit(0, "b0"), a.submit(0, "a1"), c.submit(0, "c0"), a.submit(0, "a2")]
    batch = scheduler.take(2.0)
    # Slots go by depth in the queue, then age: all heads first, then second commands.
    assert batch.payloads == ["a0", "b0", "c0", "a1", "a2"]
    assert batch.instance_ids == [1, 2, 3, 1, 1]
    assert batch.queue_ids == [a.id, b.id, c.id, a.id, a.id]
    run(batch)
    assert [f.result(1) for f in futures] == ["a0", "b0", "a1", "c0", "a2"]
    assert scheduler.take(NOTHING_YET) is None


def test_a_batch_holds_one_kind_chosen_by_the_oldest_ready_head(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    a, b, c = (scheduler.create_queue(instance_id=i) for i in (1, 2, 3))
    a.submit(7, "a-kind7")
    b.submit(3, "b-kind3")
    c.submit(7, "c-kind7")
    first = scheduler.take(2.0)
    assert first.kind == 7 and first.payloads == ["a-kind7", "c-kind7"]
    run(first)
    second = scheduler.take(2.0)
    assert second.kind == 3 and second.payloads == ["b-kind3"]
    run(second)


def test_a_queue_runs_in_order_across_kinds(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    for kind, tag in [(0, "x0"), (1, "y1"), (0, "z0")]:
        q.submit(kind, tag)
    assert [take_payloads(scheduler) for _ in range(3)] == [["x0"], ["y1"], ["z0"]]


def test_depends_on_previous_splits_vertical_batches_and_waits_for_the_previous_to_finish(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    q.submit(0, "p0")
    q.submit(0, "p1")
    q.submit(0, "d2", depends_on_previous=True)
    q.submit(0, "p3")
    first = scheduler.take(2.0)
    assert first.payloads == ["p0", "p1"]
    # d2 depends on p1's result: not dispatched while p1 is in flight.
    assert scheduler.take(NOTHING_YET) is None
    run(first)
    assert take_payloads(scheduler) == ["d2", "p3"]


def test_max_batch_requests_and_token_budget_cap_batches(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_requests=4, max_batch_tokens=100)
    queues = [scheduler.create_queue(instance_id=i) for i in range(10)]
    for i, q in enumerate(queues):
        q.submit(0, i)
    assert [len(take_payloads(scheduler)) for _ in range(3)] == [4, 4, 2]

    q = scheduler.create_queue(instance_id=99)
    for tokens in (60, 30, 20, 5):
        q.submit(0, tokens, num_tokens=tokens)
    batch = scheduler.take(2.0)
    # 60 + 30 fit; 20 would exceed 100 and blocks the rest of its queue (in-order).
    assert batch.payloads == [60, 30] and batch.num_tokens == 90 and batch.token_counts == [60, 30]
    run(batch)
    assert take_payloads(scheduler) == [20, 5]


def test_token_budget_first_fit_across_queues(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_tokens=100)
    big, small = scheduler.create_queue(instance_id=1), scheduler.create_queue(instance_id=2)
    first = scheduler.create_queue(instance_id=3)
    first.submit(0, "first-80", num_tokens=80)
    big.submit(0, "big-50", num_tokens=50)
    small.submit(0, "small-20", num_tokens=20)
    assert take_payloads(scheduler) == ["first-80", "small-20"]
    assert take_payloads(scheduler) == ["big-50"]


def test_submit_rejects_what_can_never_be_batched(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_tokens=100)
    q = scheduler.create_queue(instance_id=4)
    with pytest.raises(ValueError, match="101 tokens exceeds the batch token budget"):
        q.submit(0, None, num_tokens=101)
    with pytest.raises(ValueError, match="kind must be >= 0"):
        q.submit(-1, None)
    with pytest.raises(ValueError, match="needs batch_size >= 1"):
        make_scheduler(policy=Policy.FIXED_SIZE)
    with pytest.raises(ValueError, match="needs max_wait > 0"):
        make_scheduler(policy=Policy.SIZE_OR_WAIT, batch_size=2)


# ---- priorities ------------------------------------------------------------------------------


def test_higher_priority_queues_fill_batches_first(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_requests=2)
    low = scheduler.create_queue(instance_id=1, priority=Priority.LOW)
    normal = scheduler.create_queue(instance_id=2)
    high = scheduler.create_queue(instance_id=3, priority=Priority.HIGH)
    low.submit(0, "low")
    normal.submit(0, "normal")
    high.submit(0, "high-0")
    high.submit(0, "high-1")
    assert take_payloads(scheduler) == ["high-0", "high-1"]
    assert take_payloads(scheduler) == ["normal", "low"]


def test_priority_picks_the_kind_and_can_change(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    old = scheduler.create_queue(instance_id=1)
    new = scheduler.create_queue(instance_id=2)
    old.submit(1, "old-kind1")
    new.submit(2, "new-kind2")
    new.priority = Priority.HIGH
    assert new.priority == Priority.HIGH
    batch = scheduler.take(2.0)
    assert batch.kind == 2 and batch.payloads == ["new-kind2"]
    run(batch)
    assert take_payloads(scheduler) == ["old-kind1"]


# ---- policies --------------------------------------------------------------------------------


def test_fixed_size_dispatches_exactly_batch_size_and_waits_for_the_rest(make_scheduler):
    scheduler = make_scheduler(policy=Policy.FIXED_SIZE, batch_size=3)
    queues = [scheduler.create_queue(instance_id=i) for i in range(8)]
    for i in range(5):
        queues[i].submit(0, i)
    assert take_payloads(scheduler) == [0, 1, 2]
    assert scheduler.take(NOTHING_YET) is None  # 2 ready, 3 idle queues could still add
    queues[5].submit(0, 5)
    assert take_payloads(scheduler) == [3, 4, 5]
    queues[6].submit(0, 6)
    assert scheduler.take(NOTHING_YET) is None
    # When no open queue is left that could add a command, waiting would never end.
    for i in (0, 1, 2, 3, 4, 5, 7):
        queues[i].close("done")
    assert take_payloads(scheduler) == [6]


def test_fixed_wait_waits_max_wait_from_the_oldest_command(make_scheduler):
    t = 0.15
    scheduler = make_scheduler(policy=Policy.FIXED_WAIT, max_wait=t)
    queues = [scheduler.create_queue(instance_id=i) for i in range(3)]
    start = time.monotonic()
    for i, q in enumerate(queues):
        q.submit(0, i)
    assert scheduler.take(t / 3) is None
    batch = scheduler.take(5.0)
    assert time.monotonic() - start >= t
    assert batch.payloads == [0, 1, 2]
    run(batch)


def test_fixed_wait_still_dispatches_a_full_batch_at_once(make_scheduler):
    scheduler = make_scheduler(policy=Policy.FIXED_WAIT, max_wait=10.0, max_batch_requests=2)
    for i in range(2):
        scheduler.create_queue(instance_id=i).submit(0, i)
    start = time.monotonic()
    assert take_payloads(scheduler) == [0, 1]
    assert time.monotonic() - start < 5.0


def test_size_or_wait_dispatches_on_whichever_comes_first(make_scheduler):
    t = 0.2
    scheduler = make_scheduler(policy=Policy.SIZE_OR_WAIT, batch_size=3, max_wait=t)
    queues = [scheduler.create_queue(instance_id=i) for i in range(6)]
    for i in range(4):
        queues[i].submit(0, i)
    start = time.monotonic()
    assert take_payloads(scheduler) == [0, 1, 2]  # k reached: at once, at most k
    assert time.monotonic() - start < t
    batch = scheduler.take(5.0)  # the fourth waits for t
    assert batch.payloads == [3]
    assert time.monotonic() - start >= t * 0.9
    run(batch)


def test_adaptive_dispatches_at_once_when_idle_then_waits_for_the_high_water_size(make_scheduler):
    deadline = 0.3
    scheduler = make_scheduler(policy=Policy.ADAPTIVE, deadline=deadline)
    queues = [scheduler.create_queue(instance_id=i) for i in range(6)]
    start = time.monotonic()
    queues[0].submit(0, "cold")
    assert take_payloads(scheduler) == ["cold"]  # idle engine: at once
    assert time.monotonic() - start < deadline

    # The engine was idle for longer than the deadline: a batch of 4 goes at once.
    time.sleep(deadline)
    for i in range(4):
        queues[i].submit(0, i)
    assert take_payloads(scheduler) == [0, 1, 2, 3]
    assert scheduler.stats()["high_water"] == 4

    # Right after a batch the producers are expected back: accumulate up to the high-water size.
    queues[0].submit(0, "r0")
    queues[1].submit(0, "r1")
    assert scheduler.take(NOTHING_YET) is None
    queues[2].submit(0, "r2")
    queues[3].submit(0, "r3")
    start = time.monotonic()
    assert take_payloads(scheduler) == ["r0", "r1", "r2", "r3"]
    assert time.monotonic() - start < deadline

    # Fewer than the high-water size: dispatched once the deadline passes.
    queues[0].submit(0, "late")
    start = time.monotonic()
    assert take_payloads(scheduler) == ["late"]
    assert time.monotonic() - start >= deadline * 0.5


def test_adaptive_does_not_wait_for_queues_that_cannot_add(make_scheduler):
    scheduler = make_scheduler(policy=Policy.ADAPTIVE, deadline=10.0)
    queues = [scheduler.create_queue(instance_id=i) for i in range(4)]
    for i, q in enumerate(queues):
        q.submit(0, i)
    assert take_payloads(scheduler) == [0, 1, 2, 3]
    queues[3].close("finished")
    for i in range(3):
        queues[i].submit(0, i)
    start = time.monotonic()
    assert take_payloads(scheduler) == [0, 1, 2]  # every open queue has submitted
    assert time.monotonic() - start < 5.0


# ---- barriers, futures, errors ---------------------------------------------------------------


def test_synchronize_resolves_after_everything_before_it_and_holds_what_follows(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    before = [q.submit(0, "b0"), q.submit(0, "b1")]
    barrier = q.synchronize()
    after = q.submit(0, "after")
    batch = scheduler.take(2.0)
    assert batch.payloads == ["b0", "b1"]
    assert scheduler.take(NOTHING_YET) is None  # "after" waits behind the barrier
    assert not barrier.done()
    run(batch)
    assert barrier.wait(2.0) and barrier.result() is None
    assert all(f.done() for f in before)
    assert take_payloads(scheduler) == ["after"]
    assert after.result(1) == "after"


def test_each_future_gets_its_own_result_or_error(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    queues = [scheduler.create_queue(instance_id=i) for i in range(3)]
    futures = {(i, j): q.submit(0, (i, j)) for i, q in enumerate(queues) for j in range(3)}
    batch = scheduler.take(2.0)
    payloads = batch.payloads
    for index, payload in enumerate(payloads):
        if payload == (1, 1):
            batch.set_error(index, "bad input at (1, 1)")
        else:
            batch.set_result(index, {"for": payload})
    assert batch.finished
    for key, future in futures.items():
        if key == (1, 1):
            with pytest.raises(CommandFailed, match=r"bad input at \(1, 1\)"):
                future.result(1)
            assert future.failed()
        else:
            assert future.result(1) == {"for": key}


def test_future_timeout_and_unfinished_batch(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    f0, f1 = q.submit(0, 0), q.submit(0, 1)
    with pytest.raises(TimeoutError, match="did not complete"):
        f0.result(timeout=0.01)
    assert not f0.wait(0.01)
    batch = scheduler.take(2.0)
    batch.set_result(0, "ok")
    with pytest.raises(RuntimeError, match="already resolved"):
        batch.set_result(0, "twice")
    with pytest.raises(IndexError):
        batch.set_result(5, "nowhere")
    del batch  # dropped with f1 unresolved
    assert f0.result(1) == "ok"
    with pytest.raises(CommandFailed, match="without a result"):
        f1.result(1)


def test_ending_an_instance_cancels_its_pending_and_in_flight_futures_only(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_requests=2)
    doomed = scheduler.create_queue(instance_id=7)
    other = scheduler.create_queue(instance_id=8)
    in_flight = doomed.submit(0, "in-flight")
    survivor = other.submit(0, "survivor")
    pending = doomed.submit(0, "pending")
    batch = scheduler.take(2.0)
    assert batch.payloads == ["in-flight", "survivor"]

    waiter_saw = []
    waiter = threading.Thread(target=lambda: waiter_saw.append(_outcome(pending)))
    waiter.start()
    assert scheduler.end_instance(7, "client went away") == 2
    waiter.join(5)
    assert waiter_saw and "instance 7 ended: client went away" in waiter_saw[0]
    with pytest.raises(CommandCancelled, match="instance 7 ended"):
        in_flight.result(1)
    with pytest.raises(QueueClosed, match="is closed"):
        doomed.submit(0, "too late")

    run(batch)  # the engine finishes the batch: the cancelled future stays cancelled
    assert in_flight.cancelled()
    assert survivor.result(1) == "survivor"
    assert scheduler.take(NOTHING_YET) is None  # "pending" never runs
    stats = scheduler.stats()
    assert stats["num_cancelled"] == 2 and stats["num_completed"] == 1 and stats["num_pending"] == 0


def _outcome(future):
    try:
        return f"result {future.result(5)}"
    except CommandCancelled as error:
        return str(error)


def test_stop_wakes_take_and_cancels_everything(make_scheduler):
    scheduler = make_scheduler(policy=Policy.FIXED_SIZE, batch_size=10)
    q = scheduler.create_queue(instance_id=1)
    scheduler.create_queue(instance_id=2)
    future = q.submit(0, "never")
    taken = []
    taker = threading.Thread(target=lambda: taken.append(scheduler.take()))
    taker.start()
    time.sleep(0.05)
    scheduler.stop("shutting down")
    taker.join(5)
    assert not taker.is_alive() and taken == [None]
    with pytest.raises(CommandCancelled, match="scheduler stopped: shutting down"):
        future.result(1)
    with pytest.raises(QueueClosed):
        scheduler.create_queue(instance_id=3)


def test_blocking_calls_release_the_gil(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    future = q.submit(0, "x")
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        before = counter[0]
        assert not future.wait(0.2)
        assert counter[0] > before + 1000  # the spinner ran while we waited
        empty = scheduler.create_queue(instance_id=2)
        del empty
        run(scheduler.take(1.0))
        before = counter[0]
        assert scheduler.take(0.2) is None
        assert counter[0] > before + 1000
    finally:
        stop.set()
        spinner.join()


def test_adaptive_waits_for_every_recently_served_queue_so_groups_do_not_stay_out_of_phase(make_scheduler):
    deadline = 0.5
    scheduler = make_scheduler(policy=Policy.ADAPTIVE, deadline=deadline, high_water_window=4)
    queues = [scheduler.create_queue(instance_id=i) for i in range(9)]
    # Two groups of 4 served in separate batches (as after a staggered start): batches of 4.
    for group in (range(0, 4), range(4, 8)):
        time.sleep(deadline)  # idle engine: the batch goes at once
        for i in group:
            queues[i].submit(0, i)
        assert take_payloads(scheduler) == list(group)
    assert scheduler.stats()["high_water"] == 4
    # Right after a batch, the first group alone is not enough: all 8 served queues are expected.
    # (Queue 8 never submits, so "every open queue has submitted" does not trigger either.)
    for i in range(0, 4):
        queues[i].submit(0, i)
    assert scheduler.take(NOTHING_YET) is None
    for i in range(4, 8):
        queues[i].submit(0, i)
    assert take_payloads(scheduler) == list(range(8))


# ---- the first release's policy names ---------------------------------------------------------

@pytest.mark.parametrize("old, new, params, new_params", [
    ("k", "fixed_size", {"k": 4}, {"batch_size": 4}),
    ("t", "fixed_wait", {"t": 0.01}, {"max_wait": 0.01}),
    ("k_or_t", "size_or_wait", {"k": 4, "t": 0.01}, {"batch_size": 4, "max_wait": 0.01}),
])
def test_old_policy_names_are_read_with_a_deprecation_warning(old, new, params, new_params):
    from pie.control import SchedulerConfig

    with pytest.warns(DeprecationWarning, match=f"'{old}' is now called '{new}'"):
        config = SchedulerConfig.from_dict({"policy": old, **params})
    assert config == SchedulerConfig(policy=new, **new_params)
    assert config.build(8, 64).policy.name == new.upper()
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        SchedulerConfig.from_dict({"policy": new, "k": 1, "batch_size": 1})
