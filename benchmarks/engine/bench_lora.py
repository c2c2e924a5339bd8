"""The cost of LoRA: decode time per output token (TPOT) of a batch of 32 sequences with 0, 1 and 4
distinct adapters (random, rank 16, on all seven projections), on the default model.

    python benchmarks/engine/bench_lora.py [--batch 32] [--context 64] [--steps 8] [--rank 16]

Each sequence is prefilled with `context` tokens, then `steps` decode passes of the whole batch are
timed (after one warm-up pass); with k adapters, sequence i uses adapter 1 + i % k.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pie.engine.batch import ForwardRequest, Greedy
from pie.engine.config import EngineConfig
from pie.engine.lora import save_random_adapter
from pie.engine.machine import cpu_name
from pie.engine.model import Model


def tpot(runner, batch: int, context: int, steps: int, num_adapters: int) -> float:
    """Median seconds of one decode pass of the batch (every sequence one token)."""
    ps = runner.page_size
    pages_per_seq = -(-(context + steps + 1) // ps)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, runner.vocab_size, (context,), generator=gen).tolist() for _ in range(batch)]
    pages = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(batch)]
    adapters = [0 if num_adapters == 0 else 1 + i % num_adapters for i in range(batch)]

    def request(i: int, start: int) -> ForwardRequest:
        n = len(seqs[i])
        used = -(-n // ps)
        return ForwardRequest(token_ids=seqs[i][start:], positions=list(range(start, n)), kv_page_ids=pages[i][:used],
                              kv_last_page_len=n - (used - 1) * ps, outputs=[(n - start - 1, Greedy())],
                              adapter=adapters[i])

    for i in range(batch):  # prefill, one sequence at a time
        seqs[i].append(runner.execute([request(i, 0)])[0].outputs[0])
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        results = runner.execute([request(i, len(seqs[i]) - 1) for i in range(batch)])
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        for i, r in enumerate(results):
            seqs[i].append(r.outputs[0])
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = p.parse_args()
    pages = args.batch * -(-(args.context + args.steps + 1) // 16) + 8
    model = Model(config=EngineConfig(device=args.device, dtype=args.dtype, num_pages=pages, page_size=16),
                  progress=False)
    runner = model.runner
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(4):
            folder = save_random_adapter(runner.model_config, Path(tmp) / f"a{k}", rank=args.rank, seed=k)
            runner.load_adapter(f"a{k}", folder)
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"{model.name}, {args.device} ({device}), {args.dtype}, batch {args.batch}, context {args.context}, "
          f"rank {args.rank}, {torch.get_num_threads()} threads")
    print("| distinct adapters | TPOT (ms) | vs. none |")
    print("|---|---|---|")
    base = None
    for k in (0, 1, 4):
        t = tpot(runner, args.batch, args.context, args.steps, k)
        base = base or t
        print(f"| {k} | {t * 1e3:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
