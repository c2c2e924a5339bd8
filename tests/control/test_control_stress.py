"""Concurrent producers: no command lost or run twice, every future gets its own result."""

from __future__ import annotations

import random
import threading
from collections import Counter

from pie.control import CommandKind, BatchLoop, Policy, Priority, drive_native_producers

NUM_PRODUCERS = 64
COMMANDS_PER_PRODUCER = 10_000


def test_64_python_threads_x_10000_commands_no_loss_no_duplicate(make_scheduler):
    scheduler = make_scheduler(policy=Policy.EAGER, max_batch_requests=1024, max_batch_tokens=1 << 20)
    seen: list[tuple[int, int]] = []

    def echo(payloads):
        seen.extend(payloads)
        return [(producer, n * 2) for producer, n in payloads]

    errors: list[str] = []
    barrier = threading.Barrier(NUM_PRODUCERS)

    def produce(producer: int) -> None:
        rng = random.Random(producer)
        queues = [scheduler.create_queue(instance_id=producer, priority=rng.choice(list(Priority.__members__.values())))
                  for _ in range(2)]
        barrier.wait()
        window = 500
        for start in range(0, COMMANDS_PER_PRODUCER, window):
            futures = [(n, queues[n % 2].submit(CommandKind.FORWARD, (producer, n), num_tokens=1 + n % 3))
                       for n in range(start, min(start + window, COMMANDS_PER_PRODUCER))]
            for n, future in futures:
                result = future.result(timeout=60)
                if result != (producer, n * 2):
                    errors.append(f"producer {producer} command {n} got {result}")
        for q in queues:
            q.close("producer finished")

    with BatchLoop(scheduler, {CommandKind.FORWARD: echo}):
        threads = [threading.Thread(target=produce, args=(p,)) for p in range(NUM_PRODUCERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)

    assert errors == []
    total = NUM_PRODUCERS * COMMANDS_PER_PRODUCER
    counts = Counter(seen)
    assert len(seen) == total and len(counts) == total  # every command ran, none twice
    assert set(counts) == {(p, n) for p in range(NUM_PRODUCERS) for n in range(COMMANDS_PER_PRODUCER)}
    stats = scheduler.stats()
    assert stats["num_submitted"] == stats["num_dispatched"] == stats["num_completed"] == total
    assert stats["num_failed"] == stats["num_cancelled"] == stats["num_pending"] == stats["num_in_flight"] == 0
    assert stats["num_queues"] == 0  # closed and finished queues are forgotten


def test_64_native_threads_x_10000_commands_under_every_policy(make_scheduler):
    # (EAGER is exercised by the Python-thread test above.)
    policies = [dict(policy=Policy.ADAPTIVE, deadline=0.001), dict(policy=Policy.SIZE_OR_WAIT, batch_size=16, max_wait=0.001)]
    for config in policies:
        scheduler = make_scheduler(max_batch_requests=256, max_batch_tokens=1 << 16, **config)
        sizes = Counter()

        def noop(payloads):
            sizes[len(payloads)] += 1
            return [None] * len(payloads)

        with BatchLoop(scheduler, {0: noop}):
            result = drive_native_producers(scheduler, NUM_PRODUCERS, COMMANDS_PER_PRODUCER, window=64)
        total = NUM_PRODUCERS * COMMANDS_PER_PRODUCER
        assert result["num_ready"] == total, (config, result)
        assert result["num_failed"] == result["num_cancelled"] == 0
        stats = scheduler.stats()
        assert stats["num_submitted"] == stats["num_dispatched"] == stats["num_completed"] == total
        assert sum(size * count for size, count in sizes.items()) == total
        if config["policy"] == Policy.SIZE_OR_WAIT:
            assert max(sizes) <= 16
