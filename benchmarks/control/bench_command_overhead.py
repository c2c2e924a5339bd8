"""Per-command overhead of the control layer: submit -> batch -> complete, with a no-op runner.

Producers submit a command and wait for its future (window 1: what an inferlet does), or keep
`--window` commands in flight. The batch loop (Python, one thread) runs every batch on a no-op
handler. Reported per configuration:
  - wall ns/cmd: wall time / commands, all producers together (the layer's throughput cost)
  - latency us: mean submit -> result as one producer sees it
  - batch: mean batch size
Two producer paths: native C++ threads (no GIL; how the runtime's host functions submit) and Python
threads (submit + Future.result from Python).

    python benchmarks/control/bench_command_overhead.py [--commands 200000] [--policies adaptive eager]
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time

from pie.control import BatchLoop, SchedulerConfig, drive_native_producers, wakeup_round_trip_ns


def noop(payloads):
    return [None] * len(payloads)


def run_native(config: SchedulerConfig, producers: int, per_producer: int, window: int):
    scheduler = config.build(max_batch_requests=1024, max_batch_tokens=1 << 20)
    loop = BatchLoop(scheduler, {0: noop})
    with loop:
        result = drive_native_producers(scheduler, producers, per_producer, window=window)
    scheduler.stop()
    total = producers * per_producer
    assert result["num_ready"] == total, result
    return result["seconds"], result["mean_latency_ns"], loop.num_commands / max(loop.num_batches, 1)


def run_python(config: SchedulerConfig, producers: int, per_producer: int, window: int):
    scheduler = config.build(max_batch_requests=1024, max_batch_tokens=1 << 20)
    queues = [scheduler.create_queue(instance_id=i) for i in range(producers)]
    latencies = [0.0] * producers
    start_line = threading.Barrier(producers + 1)

    def produce(i: int) -> None:
        queue = queues[i]
        start_line.wait()
        spent = 0.0
        in_flight = []
        for _ in range(per_producer):
            if len(in_flight) >= window:
                submitted, future = in_flight.pop(0)
                future.result()
                spent += time.perf_counter() - submitted
            in_flight.append((time.perf_counter(), queue.submit(0)))
        for submitted, future in in_flight:
            future.result()
            spent += time.perf_counter() - submitted
        latencies[i] = spent
        queue.close("done")

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    loop = BatchLoop(scheduler, {0: noop})
    with loop:
        start_line.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    scheduler.stop()
    total = producers * per_producer
    return seconds, sum(latencies) / total * 1e9, loop.num_commands / max(loop.num_batches, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=200_000, help="commands per configuration (native)")
    parser.add_argument("--python-commands", type=int, default=50_000, help="commands per configuration (Python)")
    parser.add_argument("--producers", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--policies", nargs="+", default=["adaptive", "eager"])
    parser.add_argument("--window", type=int, default=1, help="commands each producer keeps in flight")
    args = parser.parse_args()
    threading.stack_size(256 * 1024)  # 1024 Python producer threads

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, window {args.window}, "
          f"no-op runner, max batch 1024")
    print(f"# OS floor: a condition-variable round trip between two native threads takes "
          f"{wakeup_round_trip_ns(20000):,.0f} ns")
    print("| producers | path | policy | commands | wall ns/cmd | latency us | batch |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for producers in args.producers:
        for path, runner, budget in (("native", run_native, args.commands), ("python", run_python, args.python_commands)):
            per_producer = max(1, budget // producers)
            for policy in args.policies:
                config = SchedulerConfig(policy=policy, deadline=0.0005) if policy == "adaptive" else \
                    SchedulerConfig(policy=policy)
                seconds, latency_ns, batch = runner(config, producers, per_producer, args.window)
                total = producers * per_producer
                print(f"| {producers} | {path} | {policy} | {total} | {seconds / total * 1e9:,.0f} | "
                      f"{latency_ns / 1e3:,.1f} | {batch:.1f} |", flush=True)


if __name__ == "__main__":
    main()
