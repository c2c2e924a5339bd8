"""Decode throughput through the control layer under each dispatch policy, with the real model.

N concurrent requests (one thread and one queue each, as inferlets) generate greedily through the
queues, the scheduler and the page pool; reported: aggregate generated tokens/s, mean batch size.
Then `--prompts-file`'s path (32 prompts concurrently) against running them one after another.

    python benchmarks/control/bench_decode_policies.py [--model smollm2-135m] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import time

from pie.control import ControlPlane, SchedulerConfig
from pie.control.generate import generate_concurrently

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colors.",
           "Describe a mountain in one sentence.", "List two facts about coffee.", "Say hello in Spanish.",
           "Give a title for a story about robots.", "Why is the sky blue?"]


def policy_configs(concurrency: int) -> dict[str, SchedulerConfig]:
    return {
        "adaptive": SchedulerConfig(policy="adaptive"),
        "eager": SchedulerConfig(policy="eager"),
        "fixed_size=8": SchedulerConfig(policy="fixed_size", batch_size=8),
        "size_or_wait(8, 5 ms)": SchedulerConfig(policy="size_or_wait", batch_size=8, max_wait=0.005),
    }


def main() -> None:
    from pie.engine.config import EngineConfig
    from pie.engine.model import Model
    from pie.control.generate import GenerationParams, generate_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 128])
    parser.add_argument("--policies", nargs="+", default=None, help='subset of: adaptive eager fixed_size=8 "size_or_wait(8, 5 ms)"')
    args = parser.parse_args()

    model = Model(args.model, EngineConfig(dtype=args.dtype, kv_cache_mb=2048), progress=False)
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    print(f"# {args.model} {args.dtype}, {os.cpu_count()} CPUs, {args.max_tokens} new tokens per request, greedy")
    print("| concurrent | policy | wall s | tok/s | mean batch |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for concurrency in args.concurrency:
        prompts = [model.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(concurrency)]
        for name, config in policy_configs(concurrency).items():
            if args.policies and name not in args.policies:
                continue
            plane = ControlPlane.for_runner(model.runner, config)
            plane.loop.record_batch_sizes = True
            with plane:
                start = time.perf_counter()
                outs = generate_concurrently(model, prompts, params, plane=plane)
                seconds = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            sizes = plane.loop.batch_sizes
            print(f"| {concurrency} | {name} | {seconds:.2f} | {tokens / seconds:.1f} | "
                  f"{sum(sizes) / max(len(sizes), 1):.1f} |", flush=True)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    ids = [model.prompt_ids(p) for p in prompts]
    start = time.perf_counter()
    for one in ids:
        generate_batch(model, [one], params)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    generate_batch(model, ids, params)
    built_in = time.perf_counter() - start
    start = time.perf_counter()
    generate_concurrently(model, ids, params)
    concurrent = time.perf_counter() - start
    print()
    print("| 32 prompts | wall s |")
    print("| --- | ---: |")
    print(f"| one after another (`pie generate` each) | {sequential:.2f} |")
    print(f"| built-in batch loop (`Engine.generate_batch`, no control layer) | {built_in:.2f} |")
    print(f"| `--prompts-file` (concurrent through the control layer, adaptive) | {concurrent:.2f} |")
    print(f"| speed-up over one after another | {sequential / concurrent:.1f}x |")


if __name__ == "__main__":
    main()
