"""Control layer (pie._ext._control, C++): command submit -> batch -> complete, the scheduler's decision,
the KV page pool.

- submit -> batch -> complete: native producer threads (how the runtime's host functions submit, no
  GIL) each submit a command and wait for it (window 1, what an inferlet does); the batch loop runs every
  batch on a no-op handler. Measured: the producers' wall time, as `drive_native_producers` times it
  (thread start excluded), per round of about 4-10 thousand commands. Also from Python threads (submit +
  Future.result), 1 and 64 producers.
- scheduler decision: N queues with one command each ready; the time of `Scheduler.take()` forming the
  batch (the default policy, adaptive); the batch is completed outside the measurement.
- page pool: allocate + free, fork + free, export + unexport, import + free, of 1 or 64 pages.
- generation streams: N streams (one instance and queue each) decode K tokens each, the control layer
  running every step; the batch loop's FORWARD handler only writes a token into each command. Measured:
  wall time from the streams' start to the last one's end, per request-step.
"""

from __future__ import annotations

import threading
import time

import pytest

from pie.control import (
    BatchLoop,
    CommandKind,
    ForwardLimits,
    GenerationStream,
    PagePool,
    Sampler,
    SamplerKind,
    SchedulerConfig,
    drive_native_producers,
)
from pie_bench import REPORTED, injected_sleep_s, measure_reported, ops


def noop(payloads):
    return [None] * len(payloads)


def build_scheduler():
    return SchedulerConfig().build(max_batch_requests=1024, max_batch_tokens=1 << 20)


# ---- submit -> batch -> complete ---------------------------------------------------------------------
NATIVE = {1: 4000, 64: 64, 1024: 8}  # producers -> commands per producer (per round)


@REPORTED
@pytest.mark.parametrize("producers", list(NATIVE))
def test_submit_batch_complete_native(benchmark, producers):
    per = NATIVE[producers]

    def sample() -> float:
        scheduler = build_scheduler()
        with BatchLoop(scheduler, {0: noop}):
            result = drive_native_producers(scheduler, producers, per, window=1)
        scheduler.stop()
        assert result["num_ready"] == producers * per, result
        return result["seconds"]

    ops(benchmark, producers * per, "command")
    measure_reported(benchmark, sample, rounds=21)


PYTHON = {1: 2000, 64: 40}


@REPORTED
@pytest.mark.parametrize("producers", list(PYTHON))
def test_submit_batch_complete_python(benchmark, producers):
    per = PYTHON[producers]

    def sample() -> float:
        scheduler = build_scheduler()
        queues = [scheduler.create_queue(instance_id=i + 1) for i in range(producers)]
        start_line = threading.Barrier(producers + 1)

        def produce(queue) -> None:
            start_line.wait()
            for _ in range(per):
                queue.submit(0).result(timeout=30)
            queue.close("done")

        threads = [threading.Thread(target=produce, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        with BatchLoop(scheduler, {0: noop}):
            start_line.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
        scheduler.stop()
        return seconds

    ops(benchmark, producers * per, "command")
    measure_reported(benchmark, sample, rounds=15)


# ---- the scheduler's decision ------------------------------------------------------------------------
@pytest.mark.parametrize("queued", [1, 64, 1024])
def test_scheduler_take(benchmark, queued):
    scheduler = build_scheduler()
    queues = [scheduler.create_queue(instance_id=i + 1) for i in range(queued)]
    taken = []

    def setup():
        for q in queues:
            q.submit(0)

    def take():
        batch = scheduler.take(timeout=5)
        taken.append(batch)
        return batch

    def teardown():
        batch = taken.pop()
        assert len(batch) == queued
        batch.complete([None] * len(batch))
        batch.finish()

    benchmark.pedantic(take, setup=setup, teardown=teardown, rounds=200 if queued < 1024 else 60, warmup_rounds=3)
    scheduler.stop()


# ---- the page pool -----------------------------------------------------------------------------------------
INSTANCE = 1


@pytest.fixture
def pool():
    p = PagePool(num_pages=8192, page_size=16)
    p.add_instance(INSTANCE)
    keep = p.allocate(INSTANCE, 100)  # a pool in use, not a fresh one
    yield p
    p.free(INSTANCE, keep)
    p.end_instance(INSTANCE)


@pytest.mark.parametrize("pages", [1, 64])
def test_page_pool_allocate_free(benchmark, pool, pages):
    sleep_s = injected_sleep_s()  # PIE_BENCH_INJECT_SLEEP_US: the regression demonstration only

    def allocate_free():
        if sleep_s:
            time.sleep(sleep_s)
        pool.free(INSTANCE, pool.allocate(INSTANCE, pages))

    benchmark(allocate_free)


def test_page_pool_fork_free(benchmark, pool):
    handles = pool.allocate(INSTANCE, 64)
    benchmark(lambda: pool.free(INSTANCE, pool.fork(INSTANCE, handles)))
    pool.free(INSTANCE, handles)


def test_page_pool_export_unexport(benchmark, pool):
    handles = pool.allocate(INSTANCE, 64)

    def export_unexport():
        pool.export_pages(INSTANCE, "bench", handles)
        pool.unexport("bench", INSTANCE)

    benchmark(export_unexport)
    pool.free(INSTANCE, handles)


def test_page_pool_import_free(benchmark, pool):
    handles = pool.allocate(INSTANCE, 64)
    pool.export_pages(INSTANCE, "bench", handles)
    benchmark(lambda: pool.free(INSTANCE, pool.import_pages(INSTANCE, "bench")))
    pool.unexport("bench", INSTANCE)
    pool.free(INSTANCE, handles)


# ---- generation streams ----------------------------------------------------------------------------------
STREAMS = {1: 400, 32: 40}  # streams -> tokens each (per round)


def write_a_token(commands):
    """A FORWARD handler without a model: every output gets token 7."""
    for command in commands:
        command.write_outputs([7] * len(command.outputs))
    return [None] * len(commands)


@REPORTED
@pytest.mark.parametrize("streams", list(STREAMS))
def test_generation_stream_steps(benchmark, streams):
    tokens = STREAMS[streams]
    limits = ForwardLimits(vocab_size=32000, page_size=16, num_pages=4096, max_tokens=8192)
    greedy = Sampler(SamplerKind.GREEDY)

    def sample() -> float:
        scheduler = build_scheduler()
        pool = PagePool(num_pages=4096, page_size=16)
        with BatchLoop(scheduler, {CommandKind.FORWARD: write_a_token}):
            t0 = time.perf_counter()
            running = []
            for i in range(streams):
                pool.add_instance(i + 1)
                running.append(GenerationStream.start(scheduler.create_queue(i + 1), pool, i + 1, limits,
                                                      [1 + i, 2, 3, 4], 0, [], greedy, tokens))
            for stream in running:
                assert stream.wait(60) and len(stream.generated) == tokens
            seconds = time.perf_counter() - t0
        scheduler.stop()
        return seconds

    ops(benchmark, streams * tokens, "request-step")
    measure_reported(benchmark, sample, rounds=11)
