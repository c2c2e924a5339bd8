"""The batch loop over a fake runner: results reach their futures, a bad request fails alone."""

from __future__ import annotations

import threading

import pytest

from pie.control import CommandFailed, CommandKind, BatchLoop, Policy

from control_fakes import EchoRequest


def test_batch_loop_runs_batches_on_the_runner_and_resolves_futures(make_scheduler, fake_runner):
    scheduler = make_scheduler(policy=Policy.EAGER)
    queues = [scheduler.create_queue(instance_id=i) for i in range(4)]
    futures = {(i, n): q.submit(CommandKind.FORWARD, EchoRequest((i, n))) for i, q in enumerate(queues) for n in range(5)}
    loop = BatchLoop(scheduler, {CommandKind.FORWARD: fake_runner})
    while loop.run_once(timeout=0.05) is not None:
        pass
    assert {key: f.result(1) for key, f in futures.items()} == {key: ("done", key) for key in futures}
    assert sorted(fake_runner.tags_run) == sorted(futures)
    assert loop.num_commands == 20


def test_a_rejected_request_fails_alone_and_the_rest_of_its_batch_runs(make_scheduler, fake_runner):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    good0 = q.submit(CommandKind.FORWARD, EchoRequest("good0"))
    bad = q.submit(CommandKind.FORWARD, EchoRequest("bad", bad=True))
    good1 = q.submit(CommandKind.FORWARD, EchoRequest("good1"))
    BatchLoop(scheduler, {CommandKind.FORWARD: fake_runner}).run_once(timeout=1)
    assert good0.result(1) == ("done", "good0") and good1.result(1) == ("done", "good1")
    with pytest.raises(CommandFailed, match="tag 'bad' is bad"):
        bad.result(1)
    assert fake_runner.batches == [["good0", "good1"]]


def test_handler_errors_fail_the_batch_and_the_loop_goes_on(make_scheduler, caplog):
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    calls = []

    def flaky(payloads):
        calls.append(list(payloads))
        if len(calls) <= 3:  # the batch, then each of its two commands alone
            raise RuntimeError("device lost")
        if len(calls) == 4:
            return [1]  # wrong number of results
        return [p * 10 for p in payloads]

    loop = BatchLoop(scheduler, {0: flaky})
    first = [q.submit(0, 1), q.submit(0, 2)]
    loop.run_once(timeout=1)
    for future in first:
        with pytest.raises(CommandFailed, match="engine error: RuntimeError: device lost"):
            future.result(1)
    second = [q.submit(0, 3), q.submit(0, 4)]
    loop.run_once(timeout=1)
    for future in second:
        with pytest.raises(CommandFailed, match="returned 1 results for 2 commands"):
            future.result(1)
    third = q.submit(0, 5)
    unknown_kind = q.submit(9, 6)
    loop.run_once(timeout=1)
    loop.run_once(timeout=1)
    assert third.result(1) == 50
    with pytest.raises(CommandFailed, match="no handler for command kind 9"):
        unknown_kind.result(1)


def test_an_unattributed_failure_fails_only_the_command_that_causes_it(make_scheduler, caplog):
    """One tenant's command that breaks the handler in a way it cannot attribute (no request_index) must not
    fail the other tenants' commands of the same batch: they run again, each alone."""
    scheduler = make_scheduler(policy=Policy.EAGER)
    queues = [scheduler.create_queue(instance_id=i) for i in (1, 2, 3)]
    calls = []

    def handler(payloads):
        calls.append(list(payloads))
        if "poison" in payloads:
            raise RuntimeError("selected index k out of range")
        return [p.upper() for p in payloads]

    loop = BatchLoop(scheduler, {0: handler})
    futures = [q.submit(0, p) for q, p in zip(queues, ["a", "poison", "c"])]
    loop.run_once(timeout=1)
    assert futures[0].result(1) == "A" and futures[2].result(1) == "C"
    with pytest.raises(CommandFailed, match="engine error: RuntimeError: selected index k out of range"):
        futures[1].result(1)
    assert calls == [["a", "poison", "c"], ["a"], ["poison"], ["c"]]


def test_batch_loop_thread_serves_blocking_producers_and_stops(make_scheduler, fake_runner):
    scheduler = make_scheduler(policy=Policy.ADAPTIVE, deadline=0.001)
    results = {}

    def inferlet(i: int) -> None:
        q = scheduler.create_queue(instance_id=i)
        # Decode-like: each step depends on the one before.
        results[i] = [q.submit(CommandKind.FORWARD, EchoRequest((i, step)), depends_on_previous=True).result(10)
                      for step in range(20)]
        q.close("finished")

    loop = BatchLoop(scheduler, {CommandKind.FORWARD: fake_runner})
    loop.record_batch_sizes = True
    with loop:
        threads = [threading.Thread(target=inferlet, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert loop.running
    assert not loop.running
    assert results == {i: [("done", (i, step)) for step in range(20)] for i in range(8)}
    assert sum(loop.batch_sizes) == 160
    # Concurrent inferlets were batched horizontally, not run one call at a time.
    assert max(loop.batch_sizes) > 1


def test_a_logged_failure_keeps_nothing_of_the_batch_alive(make_scheduler, caplog):
    """A handler that keeps log records (pytest's capture, a memory handler) must not keep the failed batch's
    payloads alive through the traceback's frames: a command pins its pages while it is alive."""
    import gc
    import weakref

    class Payload:
        pass

    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)

    def broken(payloads):
        held = list(payloads)  # noqa: F841  (a frame local: what a traceback keeps)
        raise RuntimeError("device lost")

    loop = BatchLoop(scheduler, {0: broken})
    payload = Payload()
    alive = weakref.ref(payload)
    future = q.submit(0, payload)
    del payload
    with caplog.at_level("ERROR", logger="pie.control.batch_loop"):
        loop.run_once(timeout=1)
    with pytest.raises(CommandFailed, match="device lost"):
        future.result(1)
    del future
    gc.collect()
    assert any("device lost" in r.getMessage() for r in caplog.records)
    assert alive() is None, "a log record keeps the failed batch's payload alive"


def test_the_loop_counts_batches_by_size_bucket_and_kind(make_scheduler, fake_runner):
    """What pie_batch_size reports: per command kind, batches per size bucket (BATCH_SIZE_BUCKETS, then
    larger) and the sum of their sizes."""
    from pie.control.batch_loop import BATCH_SIZE_BUCKETS

    scheduler = make_scheduler(policy=Policy.EAGER)
    loop = BatchLoop(scheduler, {CommandKind.FORWARD: fake_runner, CommandKind.COPY_PAGES: lambda p: [None] * len(p)})
    for n, kind in [(1, CommandKind.FORWARD), (3, CommandKind.FORWARD), (4, CommandKind.FORWARD),
                    (5, CommandKind.FORWARD), (2, CommandKind.COPY_PAGES)]:
        queues = [scheduler.create_queue(instance_id=100 * n + i + int(kind)) for i in range(n)]
        for q in queues:
            q.submit(kind, EchoRequest(q.instance_id) if kind == CommandKind.FORWARD else None)
        assert len(loop.run_once(timeout=1)) == n
    forward = loop.batch_size_counts[int(CommandKind.FORWARD)]
    bucket = {bound: i for i, bound in enumerate(BATCH_SIZE_BUCKETS)}
    assert forward[bucket[1]] == 1 and forward[bucket[4]] == 2 and forward[bucket[8]] == 1  # 1; 3, 4; 5
    assert sum(forward) == 4 and loop.batch_size_sums[int(CommandKind.FORWARD)] == 13
    assert loop.batch_size_counts[int(CommandKind.COPY_PAGES)][bucket[2]] == 1


def test_a_handler_with_execute_batch_gets_the_whole_batch_and_a_failure_falls_back_to_execute(make_scheduler):
    """execute_batch(batch) runs first (the ForwardHandler reads the payloads in C++ from it); when it raises,
    the same batch runs through execute(payloads), which attributes a failure to its command."""
    from pie.control import Batch

    class Handler:
        def __init__(self):
            self.whole, self.listed, self.fail_whole = [], [], False

        def execute_batch(self, batch):
            assert isinstance(batch, Batch)
            if self.fail_whole:
                raise RuntimeError("the fast path fails")
            self.whole.append(len(batch))
            return [p * 2 for p in batch.payloads]

        def execute(self, payloads):
            self.listed.append(list(payloads))
            return [p * 3 for p in payloads]

    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=1)
    handler = Handler()
    loop = BatchLoop(scheduler, {0: handler})
    first = [q.submit(0, 1), q.submit(0, 2)]
    loop.run_once(timeout=1)
    assert [f.result(1) for f in first] == [2, 4] and handler.whole == [2] and handler.listed == []
    handler.fail_whole = True
    second = [q.submit(0, 5), q.submit(0, 6)]
    loop.run_once(timeout=1)
    assert [f.result(1) for f in second] == [15, 18] and handler.listed == [[5, 6]]


def test_execute_batch_returning_none_completes_every_command_with_no_result(make_scheduler):
    """execute_batch may write its results into the commands and return None: every command of the batch
    completes with no result (Batch.complete_all); one resolved before keeps its own result."""
    scheduler = make_scheduler(policy=Policy.EAGER)
    q = scheduler.create_queue(instance_id=2)
    written = []

    class Handler:
        def execute_batch(self, batch):
            written.extend(batch.payloads)
            return None

        def execute(self, payloads):
            raise AssertionError("the fast path did not fail")

    loop = BatchLoop(scheduler, {0: Handler()})
    futures = [q.submit(0, i) for i in (7, 8, 9)]
    batch = loop.run_once(timeout=1)
    assert written == [7, 8, 9] and batch.finished
    assert [f.result(1) for f in futures] == [None, None, None]

    more = [q.submit(0, i) for i in (1, 2)]
    batch = scheduler.take(1)
    batch.set_result(0, "first")
    batch.complete_all()
    assert batch.finished and [f.result(1) for f in more] == ["first", None]


def test_the_forward_handler_packs_a_batch_in_place_as_it_packs_the_list(make_scheduler):
    """pack_forward of a Batch reads its ForwardCommands in place: the same RaggedBatch as from the list."""
    from pie.control import ForwardCommand, ForwardLimits, ForwardOutput, Sampler, SamplerKind
    from pie.control.handlers import pack_forward

    scheduler = make_scheduler(policy=Policy.EAGER)
    limits = ForwardLimits(vocab_size=100, page_size=4, num_pages=16, max_tokens=32, max_position=1000)
    q = scheduler.create_queue(instance_id=3)
    # n tokens in page n, the last one sampled
    commands = [ForwardCommand([1, 2, 3][:n], list(range(n)), [n], n,
                               outputs=[ForwardOutput(n - 1, Sampler(SamplerKind.GREEDY))]) for n in (1, 2, 3)]
    for c in commands:
        q.submit_forward(c, limits)
    batch = scheduler.take(1.0)
    whole, listed = pack_forward(batch, 4), pack_forward(commands, 4)
    for name in ("token_ids", "positions", "output_rows", "qo_lens", "last_page_len", "masks"):
        assert list(getattr(whole, name)) == list(getattr(listed, name)), name
    assert whole.page_ids.tolist() == listed.page_ids.tolist() == [1, 2, 3]
    assert whole.write_slots.tolist() == listed.write_slots.tolist()
    batch.fail_unresolved("done with it")
    batch.finish()
