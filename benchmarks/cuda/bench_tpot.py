"""End-to-end decode speed on the GPU: pie's model runner against HF transformers with a static cache.

  python3 benchmarks/cuda/bench_tpot.py [--out DIR] [--models 1b,3b,8b] [--batches 1,32,128]

Random-weight Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes in bf16. Every request has a
128-token prompt and decodes 64 tokens greedily. TPOT (time per output token, per step of the whole
batch) is measured on:
- pie: ModelRunner.execute, one batch of B one-token requests per step, CUDA kernels + CUDA graphs
  (and, beside it, the same runner with graphs off); host-side work (validation, planning, sampling,
  the ids back to the host) included, as a serving step pays it;
- HF: `generate(..., cache_implementation="static", do_sample=False)`; TPOT = (time for 64 new tokens -
  time for 1) / 63, so the prefill cancels out.
Each configuration runs once to warm up (graph capture, cuBLAS heuristics) and then is timed
(median of 3). Writes tpot_<device>.json / .md to benchmarks/results/ (and --out); prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pie.engine.batch import ForwardRequest, Greedy  # noqa: E402
from pie.engine.config import EngineConfig, ModelConfig  # noqa: E402
from pie.engine.runner import ModelRunner  # noqa: E402
from results import write_results  # noqa: E402  (benchmarks/cuda/results.py)

SHAPES = {  # name: (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied)
    "1b": ("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, True),
    "3b": ("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True),
    "8b": ("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
}
PROMPT, NEW = 128, 64
PAGE = 16


def hf_model(key: str):
    import transformers

    _, hidden, layers, heads, kv_heads, head_dim, inter, vocab, tied = SHAPES[key]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.02)
    return model.eval(), ModelConfig.from_hf(cfg.to_dict())


def hf_tpot(model, prompts: torch.Tensor) -> float:
    """Seconds per decode step of the batch under HF generate with a static cache."""
    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(NEW)  # warm-up
    full = statistics.median(gen(NEW) for _ in range(3))
    first = statistics.median(gen(1) for _ in range(3))
    return (full - first) / (NEW - 1)


def pie_tpot(runner: ModelRunner, prompts: list[list[int]]) -> float:
    """Seconds per decode step of the batch through ModelRunner.execute (prefill excluded)."""
    pages_per = -(-(PROMPT + NEW) // PAGE)

    def run() -> float:
        seqs = [list(p) for p in prompts]
        pages = [list(range(i * pages_per, (i + 1) * pages_per)) for i in range(len(prompts))]

        def req(i: int, start: int) -> ForwardRequest:
            n = len(seqs[i])
            used = -(-n // PAGE)
            return ForwardRequest(token_ids=seqs[i][start:], positions=list(range(start, n)),
                                  kv_page_ids=pages[i][:used], kv_last_page_len=n - (used - 1) * PAGE,
                                  outputs=[(n - start - 1, Greedy())])

        for i, res in enumerate(runner.execute([req(i, 0) for i in range(len(seqs))])):  # prefill
            seqs[i].append(res.outputs[0])
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            for i, res in enumerate(runner.execute([req(i, len(seqs[i]) - 1) for i in range(len(seqs))])):
                seqs[i].append(res.outputs[0])
        return (time.perf_counter() - t0) / (NEW - 1)  # each step ends on the ids reaching the host

    run()  # warm-up: graph capture, allocator, cuBLAS heuristics
    return statistics.median(run() for _ in range(3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--models", default="1b,3b,8b")
    ap.add_argument("--batches", default="1,32,128")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0)
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    for key in args.models.split(","):
        model, config = hf_model(key)
        state = model.state_dict()
        max_batch = max(batches)
        engine_kwargs = dict(dtype="bfloat16", device="cuda", page_size=PAGE,
                      num_pages=max_batch * -(-(PROMPT + NEW) // PAGE), max_batch_requests=max(256, max_batch),
                      max_batch_tokens=max_batch * PROMPT)
        runners = {"graphs": ModelRunner(config, state, EngineConfig(**engine_kwargs)),
                   "eager": ModelRunner(config, state, EngineConfig(**engine_kwargs, cuda_graphs=False))}
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, config.vocab_size, (batch, PROMPT), generator=g)
            ours = {name: pie_tpot(r, prompts.tolist()) for name, r in runners.items()}
            theirs = hf_tpot(model, prompts.cuda())
            row = dict(model=SHAPES[key][0], batch=batch, pie_ms=ours["graphs"] * 1e3,
                       pie_eager_ms=ours["eager"] * 1e3, hf_static_ms=theirs * 1e3,
                       speedup=theirs / ours["graphs"], tokens_per_s=batch / ours["graphs"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            table = write_table(device, rows, args.out)  # after every row: a run cut short keeps its rows
        del runners, model, state
        gc.collect()
        torch.cuda.empty_cache()
    print("\n".join(table))
    return 0


def write_table(device: str, rows: list[dict], out: str | None) -> list[str]:
    import transformers

    result = dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                  prompt_tokens=PROMPT, new_tokens=NEW, rows=rows)
    lines = [f"# End-to-end TPOT on {device} (bf16, random weights, prompt {PROMPT}, {NEW} new tokens)", "",
             "| model | batch | pie (graphs) ms | pie (eager) ms | HF static cache ms | HF / pie | pie tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['pie_ms']:.2f} | {r['pie_eager_ms']:.2f} | "
                     f"{r['hf_static_ms']:.2f} | {r['speedup']:.2f}x | {r['tokens_per_s']:.0f} |")
    write_results("tpot", device, result, lines, out)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
