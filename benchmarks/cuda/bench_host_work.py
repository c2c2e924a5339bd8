"""Host work per decode step on the runner's CUDA path, measurable without a GPU.

  python benchmarks/cuda/bench_host_work.py [--batches 1,32,128] [--steps 200] [--profile]

ModelRunner.execute on B one-token requests (190-token sequences over 12 pages each, Greedy), with
the device forward (`ModelRunner.forward` of the RaggedBatch) replaced by a stub that returns zero
logits: what is left is the Python work a serving step pays before and after the GPU (validation,
flattening the batch, write slots, sampler dispatch, splitting the outputs). The attention plan, the
graph refill and the copies to the device are not in it.
Prints ms per step for each batch size (and a cProfile of the largest with --profile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pie  # noqa: E402,F401  (before torch)
import torch  # noqa: E402

from pie.engine.batch import ForwardRequest, Greedy  # noqa: E402
from pie.engine.config import EngineConfig, ModelConfig  # noqa: E402
from pie.engine.device_sampling import DeviceSampling  # noqa: E402
from pie.engine.runner import ModelRunner  # noqa: E402
from tiny_models import tiny_hf_model  # noqa: E402

SEQ, PAGE = 190, 16


class StubForward:
    """Stands in for ModelRunner.forward: logits (M, vocab) of zeros, no device work."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, batch):
        return torch.zeros(len(batch.output_rows), self.vocab)


def decode_batch(batch: int) -> list[ForwardRequest]:
    pages_per = -(-SEQ // PAGE)
    return [ForwardRequest(token_ids=[5], positions=[SEQ - 1], kv_page_ids=list(range(i * pages_per, (i + 1) * pages_per)),
                           kv_last_page_len=SEQ - (pages_per - 1) * PAGE, outputs=[(0, Greedy())])
            for i in range(batch)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    hf, cfg = tiny_hf_model("llama")
    config = ModelConfig.from_hf(cfg)
    runner = ModelRunner(config, hf.state_dict(),
                         EngineConfig(num_pages=max(batches) * -(-SEQ // PAGE), page_size=PAGE))
    runner.forward = StubForward(config.vocab_size)
    runner.device_sampling = DeviceSampling(runner.sampling)
    print("| batch | host work per step (ms) |\n| --- | --- |")
    for b in batches:
        requests = decode_batch(b)
        for _ in range(20):
            runner.execute(requests)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.execute(requests)
        print(f"| {b} | {1e3 * (time.perf_counter() - t0) / args.steps:.3f} |")
    if args.profile:
        requests = decode_batch(max(batches))
        profile = cProfile.Profile()
        profile.runcall(lambda: [runner.execute(requests) for _ in range(50)])
        pstats.Stats(profile).sort_stats("cumtime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
